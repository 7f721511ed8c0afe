"""The output root's layout: every name batchjobs writes beside the results, and the schema
version of each kind of record it writes there.

::

    <output>/
      <shard_id>/part-*.parquet     a committed shard (``_SUCCESS`` too on object stores)
      _manifest.jsonl                one record per shard, compacted ("v": MANIFEST_V)
      _manifest.d/<seq>.jsonl        shard records committed since the last compaction
      _runs.jsonl                    one record per run, succeeded or failed ("v": RUN_V)
      _staging/<shard_id>/           files of shards still in flight
      _pilot.json                    the pilot's decision ("v": PILOT_V)
      _pilot/<candidate>/            the pilot's own output roots
      _progress.jsonl                progress samples of every run, bounded ("v": PROGRESS_V)
      _eval.json                     an eval job's accuracy per metric and group ("v": EVAL_V)
      _logs/run-<start>.log          Ray's and the engines' output of a run (cleaned, rotated)
      _report.html                   the job's report (``batchjobs report``)

Every name starts with ``_``, so readers that skip such names (pyarrow, Spark, polars) see
only committed rows. A record carries its kind's schema version as ``"v"``; readers accept
records without one (written before versions existed) and refuse a newer version than they
know, so an old batchjobs never misreads a newer output root.
"""

from __future__ import annotations

import json
from typing import Any

from batchjobs.errors import BatchJobError, OutputError
from batchjobs.secrets import redact
from batchjobs.secrets import secret_values as secret_values  # its home before secrets.py

MANIFEST = "_manifest.jsonl"
MANIFEST_DELTAS = "_manifest.d"
RUNS = "_runs.jsonl"
STAGING = "_staging"
SUCCESS = "_SUCCESS"
PILOT_JSON = "_pilot.json"
PILOT_DIR = "_pilot"
PROGRESS = "_progress.jsonl"  # progress samples (progress.py)
EVAL_JSON = "_eval.json"
LOGS = "_logs"  # the runs' logs (logs.py)
REPORT = "_report.html"  # the report (report.py); "_": readers of the results skip it

# Schema version per record kind; raise one when its fields change meaning or go away
# (adding a field readers may ignore does not need it).
MANIFEST_V = 1
RUN_V = 1
PILOT_V = 1
EVAL_V = 1
PROGRESS_V = 1
VERSIONS = {
    MANIFEST: MANIFEST_V,
    RUNS: RUN_V,
    PILOT_JSON: PILOT_V,
    EVAL_JSON: EVAL_V,
    PROGRESS: PROGRESS_V,
}

SUCCEEDED = "succeeded"
FAILED = "failed"
STOPPED = "stopped"  # by a signal or Ctrl-C (stopping.py)
INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C
MAX_REASON = 500  # characters of a failure's reason kept in the run record


def stamped(kind: str, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the schema version of ``kind`` (one of the names above) as ``"v"``."""
    return {**record, "v": VERSIONS[kind]}


def unstamped(kind: str, record: dict[str, Any], where: str) -> dict[str, Any]:
    """``record`` without its ``"v"``; refuses a version newer than this batchjobs writes.
    A record without ``"v"`` is version 1. ``where`` names the file (and line) for the error."""
    rest = dict(record)
    v = rest.pop("v", 1)
    if not isinstance(v, int) or v > VERSIONS[kind]:
        raise OutputError(
            f"{where} has schema version {v!r}; this batchjobs reads up to "
            f"{VERSIONS[kind]}: upgrade batchjobs to read it, or run with --fresh"
        )
    return rest


def read_records(out, kind: str) -> list[dict[str, Any]]:
    """Every record of the JSON Lines file ``kind`` (one of the names above) at the output
    root ``out`` (an ``OutputRoot``), without its ``"v"``; none if the file is missing.
    Lines that do not parse (a file cut short) are skipped."""
    raw = out.read(kind)
    found = []
    for n, line in enumerate((raw or b"").decode(errors="replace").splitlines(), start=1):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            found.append(unstamped(kind, data, f"{out.url}/{kind} line {n}"))
    return found


def run_record(
    summary: dict[str, Any],
    *,
    started_at: float,
    ended_at: float,
    failure: BaseException | None = None,
    secrets: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """One line of ``_runs.jsonl``: the run's counters, how it ended and why.

    ``status`` is ``succeeded``, ``failed``, or ``stopped`` (SIGTERM, SIGINT or Ctrl-C);
    ``exit_code`` is what the CLI exits with (``BatchJobError.exit_code``, 128 + the signal
    for a stop: 143, 130; 1 for anything else); ``reason`` is
    the error's one-line message (null on success) with every string in ``secrets`` (storage
    options, engine env values) masked, in case an error quoted one.
    """
    code, reason = (0, None) if failure is None else exit_status(failure, secrets)
    return stamped(
        RUNS,
        {
            **summary,
            "status": _status(failure),
            "exit_code": code,
            "reason": reason,
            "started_at": started_at,
            "ended_at": ended_at,
        },
    )


def _status(failure: BaseException | None) -> str:
    if failure is None:
        return SUCCEEDED
    return STOPPED if isinstance(failure, KeyboardInterrupt) else FAILED


def exit_status(exc: BaseException, secrets: list[str] | tuple[str, ...] = ()) -> tuple[int, str]:
    """The exit code and one-line reason of a failure, as the CLI reports it."""
    if isinstance(exc, KeyboardInterrupt):  # stopping.Stopped carries its own code
        return getattr(exc, "exit_code", INTERRUPTED_EXIT), str(exc) or "interrupted"
    if isinstance(exc, BatchJobError):
        code, text = exc.exit_code, str(exc)
    else:
        code, text = 1, f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = redact(lines[0] if lines else type(exc).__name__, secrets)
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3] + "..."
    return code, reason
