"""Submit a job spec to a Ray cluster through Ray's job API, re-attach to it, wait for it,
stop it, and list batchjobs' jobs.

A submission's id is deterministic: the job's name, a fingerprint of what it computes and
where (``JobSpec.fingerprint`` plus input and output), and a run key (an Airflow logical
date, say). Submitting the same id while that job runs re-attaches to it; after a failed or
stopped attempt the next attempt gets ``<id>-a2``, ``-a3`` … and resumes from the committed
shards; after a succeeded one nothing is submitted unless forced. So a retried Airflow task
or a re-run cron line never starts a second copy of a running job.

The driver runs ``batchjobs run`` on the cluster and prints its summary as one line
(``SUMMARY_PREFIX`` + JSON) at the end; ``wait`` reads it from the job's logs, and maps the
Ray job's end to batchjobs' exit codes (the driver's own exit code where Ray reports it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchjobs.ops import auth, checks, ship
from batchjobs.ops.auth import ClusterError
from batchjobs.ops.outcome import (  # noqa: F401 - part of this module's API
    STOPPED_EXIT,
    SUMMARY_PREFIX,
    TERMINAL,
    TIMEOUT_EXIT,
    Outcome,
    first_line,
    outcome_of,
)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STOP_WAIT_S = 60.0  # how long a stop waits for Ray to report the job stopped
_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

Say = Callable[[str], None]


@dataclass(frozen=True)
class Submission:
    """What ``submit`` did: ``submitted`` a new attempt, ``attached`` to the running one, or
    found it ``succeeded`` already (nothing submitted)."""

    submission_id: str
    address: str
    action: str
    status: str
    attempt: int
    shipped: list[tuple[str, int]] = field(default_factory=list)


# --- ids ----------------------------------------------------------------------------------


def submission_id(job, run_key: str | None = None) -> str:
    """``bj-<name>-<fingerprint>[-<run key>]``: the same job, inputs, output and run key give
    the same id. A run key with characters Ray ids avoid is slugged plus a short hash."""
    what = json.dumps(
        {
            "fingerprint": job.fingerprint(),
            "input": job.input.path,
            "output": job.output.path,
        },
        sort_keys=True,
    )
    fp = hashlib.sha256(what.encode()).hexdigest()[:12]
    out = f"bj-{_ID_SAFE.sub('-', job.name)[:60]}-{fp}"
    if run_key:
        slug = _ID_SAFE.sub("-", run_key).strip("-")[:40]
        if slug != run_key:
            slug += "-" + hashlib.sha256(run_key.encode()).hexdigest()[:6]
        out += f"-{slug}"
    return out


def attempt_id(base: str, attempt: int) -> str:
    return base if attempt <= 1 else f"{base}-a{attempt}"


# --- the head -----------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http:// RAY_ADDRESS, else the local
    head's default (what ``ray job submit`` uses too)."""
    if address:
        return (address if "://" in address else f"http://{address}").rstrip("/")
    for env in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(env, "")
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    return DEFAULT_ADDRESS


class Head:
    """A Ray head's job API, with the token found as ``auth.find_token`` says. Every
    failure is a ``ClusterError`` with one line that never holds the token."""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        token_source: str | None = None,
    ):
        self.address = resolve_address(address)
        self.lookup = auth.find_token(token, token_source)
        headers = self.lookup.token.header() if self.lookup.token else {}
        self.client = self._call(self._connect, headers)

    def _connect(self, headers: dict[str, str]):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=headers)

    def _call(self, fn: Callable, *args, missing_ok: bool = False, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            status = 401 if "Authentication required" in str(exc) else 403
            raise auth.auth_error(self.address, status, self.lookup) from None
        except ConnectionError as exc:
            raise ClusterError(
                f"cannot reach the Ray head's job API at {self.address} ({first_line(exc)}): is "
                "the head up, started with the dashboard (ray[default]) on an address this "
                "machine reaches (ray start --head --dashboard-host ...)?"
            ) from None
        except RuntimeError as exc:
            if missing_ok and "status code 404" in str(exc):
                return None
            raise ClusterError(
                auth.scrub(f"{self.address}: {first_line(exc)}", self.lookup)
            ) from None

    def info(self, sid: str):
        """The job's details, or None where the head has no job with that id."""
        return self._call(self.client.get_job_info, sid, missing_ok=True)

    def logs(self, sid: str) -> str:
        return auth.scrub(self._call(self.client.get_job_logs, sid), self.lookup)

    def stop(self, sid: str) -> bool:
        """Ask Ray to stop the job (never delete it); True if it was running."""
        return bool(self._call(self.client.stop_job, sid))

    def batchjobs_jobs(self) -> list:
        jobs = [j for j in self._call(self.client.list_jobs) if (j.metadata or {}).get("batchjobs")]
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def latest_attempt(self, base: str) -> tuple[int, Any]:
        """(number, details) of the newest attempt of ``base``; (0, None) if none exists."""
        n, found = 0, None
        while True:
            info = self.info(attempt_id(base, n + 1))
            if info is None:
                return n, found
            n, found = n + 1, info


# --- submit -------------------------------------------------------------------------------


def submit(
    spec: str | Path,
    *,
    address: str | None = None,
    overrides: list[str] | None = None,
    run_key: str | None = None,
    working_dir: str | Path = ".",
    runtime_env: dict[str, Any] | None = None,
    token: str | None = None,
    token_source: str | None = None,
    force: bool = False,
    ship_limit_mb: float = ship.DEFAULT_LIMIT_MB,
    say: Say | None = None,
) -> Submission:
    """Check the spec here, then submit it to the head at ``address`` under its
    deterministic id, re-attach to it, or leave a succeeded one alone (``force``: submit a
    new attempt anyway). ``runtime_env`` is merged over the one built here; one with its own
    ``working_dir`` replaces the upload. Relative paths in the spec resolve against
    ``working_dir``, as on the cluster: the process's current directory is switched to it
    while the spec is checked. Raises ``BatchJobError`` (exit codes as ``run``'s;
    ``ClusterError`` for the head)."""
    say = say or (lambda line: None)
    wd = Path(working_dir).resolve()
    spec_path = Path(spec).resolve()
    user_env = dict(runtime_env or {})
    with _chdir(wd):  # relative paths in the spec mean what they mean in the job's directory
        checked = checks.check_here(spec_path, overrides, for_cluster=True)
        job = checked.spec
        if user_env.get("working_dir"):  # the caller's own package: nothing to ship
            shipment, entry_spec, env = None, Path(spec).as_posix(), {}
        else:
            shipment = ship.plan(job, spec_path, wd, ship_limit_mb)
            entry_spec, env = shipment.spec_rel, shipment.runtime_env()
    for note in checked.notes:
        say(f"note: {note}")
    base = submission_id(job, run_key)
    env_vars = {**env.get("env_vars", {}), **user_env.pop("env_vars", {})}
    excludes = [*env.get("excludes", []), *user_env.pop("excludes", [])]
    env.update(user_env)
    if env_vars:
        env["env_vars"] = env_vars
    if excludes and "working_dir" in env:
        env["excludes"] = excludes

    head = Head(address, token, token_source)
    attempt, latest = head.latest_attempt(base)
    if latest is not None:
        state = str(latest.status)
        sid = attempt_id(base, attempt)
        if state not in TERMINAL:
            say(f"attached to {sid} ({state}) on {head.address}")
            return Submission(sid, head.address, "attached", state, attempt)
        if state == "SUCCEEDED" and not force:
            say(
                f"{sid} already succeeded on {head.address}: nothing submitted (--force submits a new attempt)"
            )
            return Submission(sid, head.address, "succeeded", state, attempt)
        if state != "SUCCEEDED":
            say(
                f"{sid} {state.lower()}: submitting attempt {attempt + 1}, which resumes from the committed shards"
            )
    sid = attempt_id(base, attempt + 1)
    entrypoint = " ".join(
        ["batchjobs", "run", shlex.quote(entry_spec)]
        + [f"--set {shlex.quote(o)}" for o in overrides or []]
        + ["--summary-json", "-"]
    )
    metadata = {
        "batchjobs": "1",
        "job": job.name,
        "spec": entry_spec,
        "output": job.output.path,
        "run_key": run_key or "",
        "attempt": str(attempt + 1),
    }
    for rel, size in shipment.shipped if shipment else []:
        say(f"shipping git-ignored {rel} ({size / 2**20:.1f} MiB) with the working directory")
    try:
        with shipment.upload_context() if shipment else _nothing():
            head._call(
                head.client.submit_job,
                entrypoint=entrypoint,
                submission_id=sid,
                runtime_env=env,
                metadata=metadata,
                entrypoint_num_cpus=0,
                entrypoint_num_gpus=0,
            )
    except ClusterError as exc:
        if "already exists" not in str(exc):
            raise
        info = head.info(sid)  # another submitter won the race: that job is ours too
        say(f"attached to {sid} (submitted at the same moment elsewhere)")
        return Submission(
            sid, head.address, "attached", str(info.status if info else "PENDING"), attempt + 1
        )
    say(f"submitted {sid} to {head.address}")
    return Submission(
        sid, head.address, "submitted", "PENDING", attempt + 1, shipment.shipped if shipment else []
    )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# --- status and wait ----------------------------------------------------------------------


def status(
    sid: str,
    *,
    address: str | None = None,
    token: str | None = None,
    token_source: str | None = None,
    head: Head | None = None,
) -> Outcome:
    head = head or Head(address, token, token_source)
    info = head.info(sid)
    if info is None:
        raise ClusterError(f"no job {sid} on {head.address} (batchjobs list shows the jobs there)")
    return outcome_of(sid, info, head.logs(sid))


def wait(
    sid: str,
    *,
    address: str | None = None,
    token: str | None = None,
    token_source: str | None = None,
    timeout: float | None = None,
    poll_s: float = 2.0,
    on_log: Say | None = None,
    stop_on_signals: bool = True,
) -> Outcome:
    """Follow the job to its end and return its ``Outcome``; ``on_log`` gets its new log
    lines as they come. On SIGINT or SIGTERM (main thread only) and after ``timeout``
    seconds, the Ray job is stopped (never deleted) and the outcome says so (exit 130, 143,
    or 124)."""
    head = Head(address, token, token_source)
    seen = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    with _signals(stop_on_signals) as waker:
        while True:
            info = head.info(sid)
            if info is None:
                raise ClusterError(f"no job {sid} on {head.address}")
            if on_log is not None:
                logs = head.logs(sid)
                for line in logs[seen:].splitlines():
                    on_log(line)
                seen = len(logs)
            if str(info.status) in TERMINAL:
                return outcome_of(sid, info, head.logs(sid))
            why = None
            if waker.got:
                sig = waker.got[0]
                why = (128 + sig, f"stopped on {signal.Signals(sig).name}")
            elif deadline is not None and time.monotonic() > deadline:
                why = (TIMEOUT_EXIT, f"still running after {timeout:.0f}s: stopped")
            if why is not None:
                head.stop(sid)
                info = _await_end(head, sid)
                base = outcome_of(sid, info, head.logs(sid))
                return Outcome(sid, base.status, why[0], why[1], base.summary, base.progress)
            waker.event.wait(poll_s)


def _await_end(head: Head, sid: str):
    end = time.monotonic() + STOP_WAIT_S
    while True:
        info = head.info(sid)
        if info is None or str(info.status) in TERMINAL or time.monotonic() > end:
            return info
        time.sleep(0.5)


@dataclass
class _Waker:
    got: list[int] = field(default_factory=list)  # signals received
    event: threading.Event = field(default_factory=threading.Event)


@contextmanager
def _signals(enabled: bool) -> Iterator[_Waker]:
    """Catch SIGINT and SIGTERM while waiting (only possible in the main thread): the
    signal is noted and the wait wakes at once."""
    waker = _Waker()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield waker
        return

    def handler(signum, frame):
        waker.got.append(signum)
        waker.event.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield waker
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop(
    sid: str,
    *,
    address: str | None = None,
    token: str | None = None,
    token_source: str | None = None,
) -> Outcome:
    """Stop the job and wait (up to a minute) until Ray reports it ended."""
    head = Head(address, token, token_source)
    if head.info(sid) is None:
        raise ClusterError(f"no job {sid} on {head.address}")
    head.stop(sid)
    info = _await_end(head, sid)
    return outcome_of(sid, info, head.logs(sid))


def list_jobs(
    *,
    address: str | None = None,
    token: str | None = None,
    token_source: str | None = None,
    limit: int = 20,
) -> list[tuple[Any, Outcome]]:
    """batchjobs' jobs on the head, newest first, each with its outcome so far."""
    head = Head(address, token, token_source)
    return [
        (info, outcome_of(info.submission_id, info, head.logs(info.submission_id)))
        for info in head.batchjobs_jobs()[:limit]
    ]
