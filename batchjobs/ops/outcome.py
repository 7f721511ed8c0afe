"""How a submitted job stands or ended, from Ray's job details and the driver's logs: Ray's
state mapped to batchjobs' exit codes, the reason, the run's summary (the line
``batchjobs run --summary-json -`` prints) and the last progress line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SUMMARY_PREFIX = "batchjobs-summary: "
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOPPED_EXIT = 130  # a job stopped by someone: interrupted, as `batchjobs run` records Ctrl-C
TIMEOUT_EXIT = 124
EXIT_CODES = (1, 2, 3, 4, 5, 130)  # batchjobs run's own; anything else from the driver is 1
_PROGRESS = re.compile(
    r"^\[(?P<job>[^\]]+)\] (?P<rows>\d+) rows \((?P<pct>\d+)%\), (?P<errors>\d+) errors, "
    r"(?P<done>\d+)/(?P<total>\d+) shards committed"
)


@dataclass(frozen=True)
class Outcome:
    """How a submitted job ended (or stands, for ``status``), as batchjobs' exit code."""

    submission_id: str
    status: str
    exit_code: int | None  # None while the job runs
    reason: str | None = None
    summary: dict[str, Any] | None = None
    progress: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A small, token-free record for schedulers (Airflow's XCom): the status, the exit
        code and reason, and the run's rows, tokens, $ and output."""
        d: dict[str, Any] = {
            "submission_id": self.submission_id,
            "status": self.status,
            "exit_code": self.exit_code,
            "reason": self.reason,
        }
        s = self.summary or {}
        tokens = int(s.get("prompt_tokens", 0)) + int(s.get("completion_tokens", 0))
        cost = s.get("cost_usd")
        for key in (
            "name",
            "output",
            "rows",
            "error_rows",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "wall_s",
            "shards_run",
            "shards_skipped",
        ):
            if key in s:
                d[key] = s[key]
        if s:
            d["tokens"] = tokens
            d["usd_per_1m_tokens"] = cost / (tokens / 1e6) if cost is not None and tokens else None
        if self.progress:
            d["progress"] = dict(self.progress)
        return d


def outcome_of(sid: str, info, logs: str) -> Outcome:
    """The job's state as batchjobs' exit code, reason, summary and last progress."""
    state = str(info.status)
    summary = _summary(logs)
    progress = _progress(logs)
    if state not in TERMINAL:
        return Outcome(sid, state, None, None, summary, progress)
    if state == "SUCCEEDED":
        return Outcome(sid, state, 0, None, summary, progress)
    if state == "STOPPED":
        return Outcome(sid, state, STOPPED_EXIT, "the Ray job was stopped", summary, progress)
    code = getattr(info, "driver_exit_code", None)
    reason = _error_line(logs)
    if code == 127:
        reason = (
            "`batchjobs` was not found on the cluster (exit 127): install batchjobs where "
            "the head runs jobs (its image or virtualenv)"
        )
    if reason is None:
        reason = first_line(Exception(info.message or "the Ray job failed"))
    exit_code = code if code in EXIT_CODES else 1
    return Outcome(sid, state, exit_code, reason, summary, progress)


def _summary(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(SUMMARY_PREFIX):
            try:
                return json.loads(line[len(SUMMARY_PREFIX) :])
            except ValueError:
                return None
    return None


def _progress(logs: str) -> dict[str, int] | None:
    for line in reversed(logs.splitlines()):
        m = _PROGRESS.match(line.strip())
        if m:
            return {k: int(v) for k, v in m.groupdict().items() if k != "job"}
    return None


def _error_line(logs: str) -> str | None:
    for line in reversed(logs.splitlines()):
        if line.startswith("error: "):
            return line[len("error: ") :].strip()
    return None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message, at most 300 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
