"""``BatchJobTrigger``: follows a submitted Ray job from Airflow's triggerer, so a job that
runs all night holds no worker slot. It polls the job's status and logs (its new log lines
go to the task's log) and fires one event with the job's outcome (``Outcome.to_dict``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from batchjobs.airflow.hooks import RayJobHook


class BatchJobTrigger(BaseTrigger):
    def __init__(
        self,
        submission_id: str,
        ray_conn_id: str = RayJobHook.default_conn_name,
        poll_interval: float = 10.0,
        deadline: float | None = None,
        log_lines: bool = True,
    ):
        super().__init__()
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.poll_interval = poll_interval
        self.deadline = deadline  # epoch seconds; past it the job is stopped
        self.log_lines = log_lines

    def serialize(self) -> tuple[str, dict[str, Any]]:
        # No token here: the trigger reads it from the connection where it runs.
        return (
            "batchjobs.airflow.triggers.BatchJobTrigger",
            {
                "submission_id": self.submission_id,
                "ray_conn_id": self.ray_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "log_lines": self.log_lines,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from batchjobs.errors import BatchJobError
        from batchjobs.ops import jobs

        sid = self.submission_id
        try:
            target = await RayJobHook(self.ray_conn_id).atarget()
            head = await asyncio.to_thread(jobs.Head, **target)
            seen = 0
            while True:
                info = await asyncio.to_thread(head.info, sid)
                if info is None:
                    yield TriggerEvent(_failed(sid, "MISSING", f"no job {sid} on {head.address}"))
                    return
                logs = await asyncio.to_thread(head.logs, sid)
                if self.log_lines:
                    for line in logs[seen:].splitlines():
                        if not line.startswith(jobs.SUMMARY_PREFIX):
                            self.log.info("%s", line)
                seen = len(logs)
                if str(info.status) in jobs.TERMINAL:
                    yield TriggerEvent(jobs.outcome_of(sid, info, logs).to_dict())
                    return
                if self.deadline is not None and time.time() > self.deadline:
                    await asyncio.to_thread(head.stop, sid)
                    yield TriggerEvent(
                        _failed(
                            sid,
                            "STOPPED",
                            "past the task's job timeout: stopped",
                            jobs.TIMEOUT_EXIT,
                        )
                    )
                    return
                await asyncio.sleep(self.poll_interval)
        except BatchJobError as exc:
            yield TriggerEvent(_failed(sid, "UNKNOWN", str(exc)))


def _failed(sid: str, status: str, reason: str, code: int = 1) -> dict[str, Any]:
    return {"submission_id": sid, "status": status, "exit_code": code, "reason": reason}
