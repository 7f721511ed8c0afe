"""``batchjobs report``: one self-contained HTML file, ``<output>/_report.html``, that says
what a job did and cost, from its output root alone.

It reads the manifest, the run records (``_runs.jsonl``: every run, with the spec it ran,
secrets already hidden), the progress samples (``_progress.jsonl``), ``_eval.json`` and
``_pilot.json`` where present, and a sample of the output rows (at most ``MAX_ROWS``) for the
distributions; nothing else, so a root copied from an object store to a laptop reports the
same. The plots are PNGs (matplotlib, no display needed) embedded in the page: no network,
no scripts. Several runs of one root (a job resumed) are one job, its runs marked.

What is read is gathered here; the plots are drawn in ``report_plots`` and
``report_charts``, and the page is built in ``report_page``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchjobs.display import device_unit
from batchjobs.errors import OutputError
from batchjobs.layout import EVAL_JSON, PILOT_JSON, REPORT, RUNS, read_records, unstamped
from batchjobs.progress import read_samples
from batchjobs.report_page import build_html

if TYPE_CHECKING:
    from batchjobs.manifest import ShardRecord
    from batchjobs.sink import OutputRoot

MAX_ROWS = 200_000  # output rows read for the distributions
MAX_VECTORS = 20_000  # embeddings read for the norm distribution


def read_runs(out: OutputRoot) -> list[dict[str, Any]]:
    """Every record in ``_runs.jsonl``, oldest first (lines that do not parse are skipped)."""
    return sorted(read_records(out, RUNS), key=lambda r: r.get("started_at") or 0)


@dataclass
class JobData:
    """What the report shows, as read from the output root."""

    url: str
    records: list[ShardRecord]
    runs: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    eval: dict[str, Any] | None = None
    pilot: dict[str, Any] | None = None
    rows: pa.Table | None = None  # a sample of the output rows (the columns the plots use)
    rows_read: int = 0
    vectors: list[float] = field(default_factory=list)  # embedding norms of the rows read

    @property
    def unit(self) -> str:
        return device_unit(self.runs)

    @property
    def spec(self) -> dict[str, Any] | None:
        for run in reversed(self.runs):
            if run.get("spec"):
                return run["spec"]
        return None

    @property
    def task(self) -> str:
        return next((r["task"] for r in reversed(self.runs) if r.get("task")), "generate")


def _read_json(out: OutputRoot, name: str) -> dict[str, Any] | None:
    raw = out.read(name)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return unstamped(name, data, f"{out.url}/{name}") if isinstance(data, dict) else None


def load(out: OutputRoot) -> JobData:
    """Everything the report needs from the output root ``out``."""
    from batchjobs.manifest import COMMITTED, Manifest

    records = list(Manifest(out).records.values())
    runs = read_runs(out)
    if not records and not runs:
        raise OutputError(
            f"{out.url} has no manifest and no run records: not a batchjobs output root, or "
            "no run has started there"
        )
    data = JobData(out.url, records, runs, read_samples(out))
    data.eval = _read_json(out, EVAL_JSON)
    data.pilot = _read_json(out, PILOT_JSON)
    _read_rows(out, [r for r in records if r.status == COMMITTED], data)
    return data


def _read_rows(out: OutputRoot, records: list[ShardRecord], data: JobData) -> None:
    """Up to ``MAX_ROWS`` output rows from files spread over the committed shards, found
    under the root by name (the manifest's paths may be where the root was written)."""
    files = [
        out.path(r.shard_id, posixpath.basename(f))
        for r in sorted(records, key=lambda r: r.shard_id)
        for f in r.files
    ]
    total = sum(r.rows for r in records)
    if not files or not total:
        return
    step = max(1, round(total / MAX_ROWS / max(1, total / len(files))))
    wanted = ("latency_s", "completion_tokens", "prompt_tokens", "error", "finish_reason")
    tables, vectors, read = [], [], 0
    for path in files[::step]:
        try:
            names = pq.read_schema(path, filesystem=out.fs).names
            cols = [c for c in wanted if c in names]
            embed = "embedding" in names and len(vectors) < MAX_VECTORS
            t = pq.read_table(
                path, columns=cols + (["embedding"] if embed else []), filesystem=out.fs
            )
        except (OSError, pa.ArrowInvalid):
            continue  # a file moved or removed since: the plots use the rest
        if embed:
            vectors.extend(_norms(t.column("embedding")))
            t = t.drop_columns(["embedding"])
        tables.append(t)
        read += t.num_rows
        if read >= MAX_ROWS:
            break
    if tables:
        data.rows = pa.concat_tables(tables, promote_options="default")
        data.rows_read = read
    data.vectors = vectors[:MAX_VECTORS]


def _norms(column: pa.ChunkedArray) -> list[float]:
    import numpy as np

    out = []
    for chunk in column.chunks:
        valid = chunk.drop_null()
        if len(valid) == 0:
            continue
        flat = valid.flatten().to_numpy(zero_copy_only=False)
        dim = len(flat) // len(valid)
        out.extend(np.linalg.norm(flat.reshape(len(valid), dim), axis=1).tolist())
    return out


def write_report(output: str, storage_options: dict | None = None) -> str:
    """Build the report of the output root ``output`` and write it there as
    ``_report.html``; returns where it is."""
    from batchjobs.sink import OutputRoot

    out = OutputRoot(output, storage_options)
    page = build_html(load(out))
    out.write_atomic(REPORT, page.encode())
    return f"{output.rstrip('/')}/{REPORT}"
