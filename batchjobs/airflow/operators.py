"""``BatchJobOperator``: run a batchjobs job spec on a Ray cluster from an Airflow task.

The task submits the spec under its deterministic id (job name, what it computes and where,
and ``run_key``, by default the run's logical date), then defers to ``BatchJobTrigger``
until the Ray job ends. A retried task submits the same id again: a job still running is
re-attached to, a failed or stopped one gets a new attempt that resumes from the committed
shards, a succeeded one is not run again. ``on_kill`` stops the Ray job. The task's return
value (XCom) is the job's outcome: status, exit code, rows, error rows, tokens, $, $ per 1M
tokens and the output path; never the token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from batchjobs.airflow.hooks import RayJobHook
from batchjobs.airflow.triggers import BatchJobTrigger


class BatchJobFailed(Exception):
    """The Ray job ended without success; the message carries batchjobs' reason."""


class BatchJobOperator(BaseOperator):
    """Submit ``spec`` (a path, relative to ``working_dir``) and wait for the job.

    :param spec: the job spec, a YAML file inside ``working_dir``.
    :param ray_conn_id: an Airflow connection of type ``ray`` (``RayJobHook``).
    :param overrides: ``KEY=VALUE`` spec overrides (``--set``), templated.
    :param run_key: part of the submission id; the default, the logical date, makes each
        DAG run one job and each retry of it the same job.
    :param working_dir: what the job gets uploaded, and what relative paths in the spec
        resolve against. Default: the current directory.
    :param runtime_env: a Ray runtime_env merged over the one built (``batchjobs submit``).
    :param force: submit a new attempt even when this one already succeeded.
    :param poll_interval: seconds between status polls.
    :param job_timeout: seconds after which the job is stopped and the task fails.
    :param deferrable: wait in the triggerer (default) or in the worker.
    """

    template_fields: Sequence[str] = ("spec", "overrides", "run_key", "working_dir")
    ui_color = "#d9ecff"

    def __init__(
        self,
        *,
        spec: str,
        ray_conn_id: str = RayJobHook.default_conn_name,
        overrides: list[str] | None = None,
        run_key: str | None = "{{ ts }}",
        working_dir: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        force: bool = False,
        poll_interval: float = 10.0,
        job_timeout: float | None = None,
        deferrable: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.ray_conn_id = ray_conn_id
        self.overrides = list(overrides or [])
        self.run_key = run_key
        self.working_dir = working_dir
        self.runtime_env = runtime_env
        self.force = force
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.deferrable = deferrable
        self.submission_id: str | None = None

    def submit(self):
        """Submit (or re-attach to) the job; the ``Submission``."""
        from batchjobs.ops import jobs

        wd = Path(self.working_dir or os.getcwd())
        spec = Path(self.spec) if Path(self.spec).is_absolute() else wd / self.spec
        sub = jobs.submit(
            spec,
            overrides=self.overrides,
            run_key=self.run_key,
            working_dir=wd,
            runtime_env=self.runtime_env,
            force=self.force,
            say=self.log.info,
            **RayJobHook(self.ray_conn_id).target(),
        )
        self.submission_id = sub.submission_id
        return sub

    def execute(self, context) -> dict[str, Any]:
        from batchjobs.ops import jobs

        sub = self.submit()
        context["ti"].xcom_push(key="submission_id", value=sub.submission_id)
        target = RayJobHook(self.ray_conn_id).target()
        if sub.action == "succeeded":
            return self._finish(jobs.status(sub.submission_id, **target).to_dict())
        if not self.deferrable:
            outcome = jobs.wait(
                sub.submission_id,
                timeout=self.job_timeout,
                poll_s=self.poll_interval,
                on_log=self.log.info,
                stop_on_signals=False,
                **target,
            )
            return self._finish(outcome.to_dict())
        deadline = None if self.job_timeout is None else time.time() + self.job_timeout
        self.defer(
            trigger=BatchJobTrigger(
                sub.submission_id, self.ray_conn_id, self.poll_interval, deadline
            ),
            method_name="execute_complete",
        )
        raise AssertionError("defer() returns only by raising")  # pragma: no cover

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        self.submission_id = event.get("submission_id")
        return self._finish(event)

    def _finish(self, outcome: dict[str, Any]) -> dict[str, Any]:
        if outcome.get("exit_code") != 0:
            raise BatchJobFailed(
                f"batchjobs job {outcome.get('submission_id')} {outcome.get('status')} "
                f"(exit {outcome.get('exit_code')}): {outcome.get('reason')}"
            )
        self.log.info(
            "%s: %s rows (%s errors), %s tokens, $%s, output %s",
            outcome.get("submission_id"),
            outcome.get("rows"),
            outcome.get("error_rows"),
            outcome.get("tokens"),
            outcome.get("cost_usd"),
            outcome.get("output"),
        )
        return outcome

    def on_kill(self) -> None:
        """Stop the Ray job (never delete it): its committed shards stay, and a retry
        resumes from them."""
        if not self.submission_id:
            return
        from batchjobs.ops import jobs

        head = jobs.Head(**RayJobHook(self.ray_conn_id).target())
        if head.stop(self.submission_id):
            self.log.info("stopped the Ray job %s", self.submission_id)
