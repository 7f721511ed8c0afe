"""Shards that cannot be read, and the job's verdict on its rows.

A shard that cannot be read at all (a truncated Parquet file, a missing or mistyped
column, a file deleted after planning, damage that stops the reader mid-file) fails alone:
the other shards run and commit, and the run then exits non-zero naming each failed shard,
so that a rerun, after the input is fixed, runs just those.

- At planning, ``preflight_all`` checks the shards' columns and sets aside the ones that
  fail; if every shard checked fails, the job stops before any engine starts.
- While reading, ``read_or_mark`` turns a shard's read failure into one *marker* row
  (``shard_rows`` -1, its error in ``input_error``), which passes the engine stage as an
  error row and is taken out by the sink (``split_failed``), which reports it to the
  driver as a summary of its own. The tracker then drops that shard's rows, if any came
  before the failure, and never commits it.
- At the end, ``check_outcome`` raises for failed shards (exit 3) and for more error rows
  than ``output.max_error_rate`` allows (exit 7), after every other row is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from batchjobs.errors import InputError, RowErrorRateError, ShardsFailedError
from batchjobs.readers import (
    INPUT_ERROR,
    PARAMS,
    PAYLOAD,
    ROW_ID,
    ROW_INDEX,
    SHARD_ID,
    SHARD_ROWS,
    WHERE,
    Columns,
    Shard,
    preflight,
    read_shard,
)

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.spec import JobSpec

FAILED_ROWS = -1  # shard_rows of a marker row
SHOWN = 10  # failed shards named in one error message


def preflight_all(
    shards: list[Shard], cols: Columns, storage_options: dict | None, strict: bool
) -> dict[str, str]:
    """Check each shard's columns (``readers.preflight``); the shards that fail, by id,
    with why. ``strict`` (``batchjobs validate``) raises for any that fails; otherwise only
    when every shard checked fails, for then the spec, not the data, is wrong."""
    failed: dict[str, str] = {}
    for shard in shards:
        try:
            preflight(shard, cols, storage_options)
        except InputError as exc:
            failed[shard.shard_id] = str(exc)
    if failed and (strict or len(failed) == len(shards)):
        messages = list(failed.values())
        if len(messages) == 1:
            raise InputError(messages[0])
        raise InputError(
            f"{len(messages)} of {len(shards)} input shards cannot be read:\n"
            + "\n".join(f"  - {m}" for m in messages[:SHOWN])
            + (f"\n  … and {len(messages) - SHOWN} more" if len(messages) > SHOWN else "")
        )
    return failed


def read_or_mark(
    shard: Shard, cols: Columns, batch_rows: int, storage_options: dict | None
) -> Iterator[pa.Table]:
    """``read_shard``, ending in a marker row instead of raising where the shard cannot
    be read (the rows read before stay: the tracker drops them)."""
    try:
        yield from read_shard(shard, cols, batch_rows, storage_options)
    except InputError as exc:
        yield marker(shard, str(exc))


def marker(shard: Shard, message: str) -> pa.Table:
    """The one row that tells the driver ``shard`` failed, and why."""
    return pa.table(
        {
            SHARD_ID: pa.array([shard.shard_id], pa.string()),
            ROW_INDEX: pa.array([FAILED_ROWS], pa.int64()),
            SHARD_ROWS: pa.array([FAILED_ROWS], pa.int64()),
            ROW_ID: pa.array([f"{shard.shard_id}:failed"], pa.string()),
            PAYLOAD: pa.array([None], pa.string()),
            INPUT_ERROR: pa.array([message], pa.string()),
            PARAMS: pa.array([None], pa.string()),
            WHERE: pa.array([shard.url], pa.string()),
        }
    )


def split_failed(batch: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
    """A batch of the engine stage's output without its marker rows, and a write summary
    (``sink.SUMMARY_SCHEMA``) for each: ``shard_rows`` -1, the error in ``errors``."""
    failed = pc.equal(batch.column(SHARD_ROWS), FAILED_ROWS)
    if not pc.any(failed).as_py():
        return batch, []
    marks = batch.filter(failed).to_pylist()
    summaries = [
        {
            "shard_id": m[SHARD_ID],
            "shard_rows": FAILED_ROWS,
            "file": "",
            "rows": 0,
            "error_rows": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "metadata": "null",
            "metrics": "{}",
            "errors": json.dumps({"shard_error": m.get("error") or "cannot be read"}),
        }
        for m in marks
    ]
    return batch.filter(pc.invert(failed)), summaries


def failure_of(summary: dict[str, Any]) -> str | None:
    """The error of a failed shard's write summary, or None for an ordinary one."""
    if summary.get("shard_rows") != FAILED_ROWS:
        return None
    return json.loads(summary.get("errors") or "{}").get("shard_error") or "cannot be read"


# ------------------------------------------------------------------ the run's verdict


def check_outcome(spec: JobSpec, failed: dict[str, str], committed: list[Any], summary: Any):
    """Raise when the run must exit non-zero though every row it could read is written:
    shards that failed (``ShardsFailedError``, exit 3), or more error rows among the
    committed shards (``committed``: their manifest records, this run's and earlier runs')
    than ``output.max_error_rate`` allows (``RowErrorRateError``, exit 7). ``summary``
    travels with the error, for the CLI to print."""
    limit = getattr(spec.output, "max_error_rate", None)
    rows = sum(r.rows for r in committed)
    errors = sum(r.error_rows for r in committed)
    over = limit is not None and rows > 0 and errors / rows > limit
    rate = (
        f"{errors:,} of {rows:,} rows ({errors / rows:.1%}) are error rows, above "
        f"output.max_error_rate {limit:g}"
        if over
        else ""
    )
    if failed:
        names = list(failed.values())
        message = (
            f"{len(names)} input shard(s) could not be read; their rows are not in the output "
            f"(the other shards are committed; fix these and rerun to finish them):\n"
            + "\n".join(f"  - {m}" for m in names[:SHOWN])
            + (f"\n  … and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
            + (f"\nalso: {rate}" if rate else "")
        )
        raise ShardsFailedError(message, summary)
    if over:
        raise RowErrorRateError(
            f"{rate}; every row is written (select them with `error IS NOT NULL`); fix the "
            "input and rerun with --fresh, or raise output.max_error_rate",
            summary,
        )
