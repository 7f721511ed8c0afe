"""Writing results: staged Parquet files per shard, committed atomically by the driver.

Where it writes (every name in ``layout.py``): staged files under
``_staging/<shard_id>/<uuid>.parquet`` while a shard is in flight, then
``<shard_id>/<uuid>.parquet`` once it is committed (all its rows, nothing else).

Ray tasks write staged files and return one small summary row per file; the driver
counts rows per shard and commits a shard the moment all its rows are staged: on a local
or POSIX filesystem by renaming the staging directory (atomic), elsewhere by moving the
files and writing ``_SUCCESS`` last. Staged files nobody reported (a write task that died
after writing) are deleted, never committed, so a retried task cannot duplicate rows.
Readers that ignore names starting with ``_`` (pyarrow, Spark, polars) never see a
partial shard.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchjobs import retries
from batchjobs.errors import OutputError
from batchjobs.layout import STAGING, SUCCESS
from batchjobs.readers import ROW_ID, SHARD_ID, SHARD_ROWS, filesystem
from batchjobs.records import BOOKKEEPING_COLUMNS, COUNT_TYPES, DEFAULT_ID_COLUMN
from batchjobs.retries import RetryPolicy
from batchjobs.safety import child
from batchjobs.secrets import lift_url_credentials

T = TypeVar("T")
CACHED = "_cached_tokens"  # the engine stage's per-row prefix-cache hits (actor.CACHED)


def write_staged(
    batch: pa.Table,
    root: str,
    storage_options: dict[str, Any],
    id_column: str | None,
    metadata: dict[str, str] | None = None,
    spec: Any = None,
) -> pa.Table:
    """Ray Data UDF: write each shard's rows of a batch to one staged file; return summaries.

    The file holds the id column, the bookkeeping columns and the task's result columns as
    the engine stage typed them (the internal ``shard_rows`` and ``_cached_tokens`` are dropped),
    with ``metadata`` plus each fixed-size list column's size in the Parquet schema. With the
    job's ``spec``, a summary also carries the task's sums over the file (``Task.summarize``:
    an eval's rows correct), as JSON."""
    summarize = None
    if spec is not None:
        from batchjobs.tasks import task_for

        summarize = task_for(spec).summarize
    from batchjobs.shard_errors import split_failed

    batch, failed = split_failed(batch)  # shards that could not be read: summaries only
    fs, path = filesystem(root, storage_options)
    policy = RetryPolicy.of(spec.output) if spec is not None else RetryPolicy()
    summaries = failed + [
        _write_part(
            fs,
            path,
            shard_id,
            batch.filter(pc.equal(batch.column(SHARD_ID), shard_id)),
            id_column or DEFAULT_ID_COLUMN,
            metadata or {},
            summarize,
            policy,
        )
        for shard_id in pc.unique(batch.column(SHARD_ID)).to_pylist()
    ]
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


def output_table(part: pa.Table, id_column: str, metadata: dict[str, str]) -> pa.Table:
    """The rows of a staged file as written: id, bookkeeping, then the task's columns."""
    results = [c for c in part.column_names if c not in (ROW_ID, SHARD_ROWS, CACHED)]
    results = [c for c in results if c not in BOOKKEEPING_COLUMNS]
    out = part.select([ROW_ID, *BOOKKEEPING_COLUMNS, *results])
    out = out.rename_columns([id_column, *out.column_names[1:]]).sort_by("row_index")
    meta = dict(metadata)
    for f in out.schema:
        if pa.types.is_fixed_size_list(f.type):
            meta[f"batchjobs.{f.name}.dim"] = str(f.type.list_size)
    return out.replace_schema_metadata(meta)


def _write_part(
    fs,
    root: str,
    shard_id: str,
    part: pa.Table,
    id_column: str,
    metadata: dict[str, str],
    summarize=None,
    policy: RetryPolicy | None = None,
) -> dict[str, Any]:
    out = output_table(part, id_column, metadata)
    name = f"{uuid.uuid4().hex}.parquet"
    path = child(root, STAGING, shard_id, name)

    def write() -> None:  # whole again on a retry: a failed upload leaves no object
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        _write_parquet(fs, path, out)

    what = f"write {fs.unstrip_protocol(path)}"
    try:
        retries.call(write, policy=policy, what=what)
    except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
        raise retries.failure(what, exc) from None
    return {
        "shard_id": shard_id,
        "shard_rows": part.column(SHARD_ROWS)[0].as_py(),
        "file": name,
        "rows": part.num_rows,
        "error_rows": part.num_rows - part.column("error").null_count,
        "prompt_tokens": _sum(part, "prompt_tokens"),
        "completion_tokens": _sum(part, "completion_tokens"),
        "cached_tokens": _sum(part, CACHED),
        "metadata": json.dumps(
            out.schema.metadata and {k.decode(): v.decode() for k, v in out.schema.metadata.items()}
        ),
        "metrics": json.dumps(summarize(out) if summarize else {}),
        "errors": json.dumps(_error_kinds(part)),
    }


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh)


def _error_kinds(part: pa.Table) -> dict[str, int]:
    """The file's error rows by kind (``progress.error_kind``), for the live display."""
    from batchjobs.progress import error_kind

    kinds: dict[str, int] = {}
    if part.column("error").null_count < part.num_rows:
        for message in part.column("error").drop_null().to_pylist():
            kind = error_kind(message)
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _sum(part: pa.Table, column: str) -> int:
    """A count column's sum; 0 for a task without that column (embed: no completions)."""
    if column not in part.column_names:
        return 0
    return pc.sum(part.column(column)).as_py() or 0


SUMMARY_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("shard_rows", pa.int64()),
        ("file", pa.string()),
        *COUNT_TYPES.items(),
        ("metadata", pa.string()),  # the file's Parquet schema metadata, as JSON
        ("metrics", pa.string()),  # the task's sums over the file (Task.summarize), as JSON
        ("errors", pa.string()),  # the file's error rows by kind, as JSON
    ]
)


class OutputRoot:
    """The driver's handle on the output root: staging, commit, cleanup. Every operation
    on the store is retried where its error may pass (``retries``)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        compact_bytes: int = 0,
    ):
        try:
            url, storage_options = lift_url_credentials(url, storage_options, "the output path")
        except ValueError as exc:
            raise OutputError(str(exc)) from None
        self.url = url  # without credentials: it is shown and recorded
        self.fs, self.root = filesystem(url, storage_options)
        self.local = "file" in _protocols(self.fs)
        self.retry = retry or RetryPolicy()
        self.compact_bytes = compact_bytes  # commit staged files up to this total as one

    def io(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the store, retried (``retries.call``); the last error
        is raised as it came."""

        def attempt() -> T:
            return fn(*args, **kwargs)

        def fresh(wait: float) -> None:
            time.sleep(wait)
            self.fs.invalidate_cache()  # listings cached before the failure may be stale

        return retries.call(attempt, policy=self.retry, what=what, sleep=fresh)

    def path(self, *parts: str) -> str:
        return child(self.root, *parts)  # never outside the root (safety.child)

    def shard_dir(self, shard_id: str) -> str:
        return self.path(shard_id)

    def clear_shard(self, shard_id: str) -> None:
        """Remove any staged or half-committed output of a shard before it is redone."""
        what = f"remove earlier output of shard {shard_id} under {self.url}"
        try:
            for p in (self.path(STAGING, shard_id), self.shard_dir(shard_id)):
                self.io(what, self._rm_tree, p)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise retries.failure(what, exc) from None

    def commit(self, shard_id: str, files: list[str]) -> list[str]:
        """Make a shard's reported staged files visible at once; returns the final paths.

        Each step is retried on its own and may run twice: a file an interrupted attempt
        already moved is not moved again."""
        staging = self.path(STAGING, shard_id)
        final = self.shard_dir(shard_id)
        keep = set(files)
        sizes: dict[str, int] = {}  # bytes of each reported staged file, as listed
        what = f"commit shard {shard_id} under {self.url}"
        try:
            if files:
                self.fs.invalidate_cache(staging)  # written by the write tasks' processes
                for info in self.io(what, self.fs.ls, staging, detail=True):
                    name = posixpath.basename(info["name"])
                    if name in keep:
                        sizes[name] = info.get("size") or 0
                    else:
                        # written by an attempt that never reported: not ours
                        self.io(what, self._rm_tree, info["name"])
            if len(files) > 1 and self.compact_bytes and sum(sizes.values()) <= self.compact_bytes:
                files = self._compact(staging, files, what)
            self.io(what, self._rm_tree, final)
            if not files:
                self.io(what, self.fs.makedirs, final, exist_ok=True)
            elif self.local:
                self.io(what, self.fs.mv, staging, final, recursive=True)  # one rename: atomic
            else:
                for name in files:
                    src, dst = posixpath.join(staging, name), posixpath.join(final, name)
                    self.io(what, self._move, src, dst)
            if not self.local or not files:
                self.io(what, self.fs.pipe_file, posixpath.join(final, SUCCESS), b"")
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise retries.failure(what, exc) from None
        return [posixpath.join(final, name) for name in sorted(files)]

    def _compact(self, staging: str, files: list[str], what: str) -> list[str]:
        """A shard's staged files (together at most ``compact_bytes``) as one staged file,
        its rows in input order; the names to commit. The new file is written before the
        old ones are removed: a failure in between leaves the shard uncommitted, and a
        rerun redoes it."""
        paths = [posixpath.join(staging, name) for name in files]

        def read(p: str) -> pa.Table:
            with self.fs.open(p, "rb") as fh:
                return pq.read_table(fh)

        tables = [self.io(what, read, p) for p in paths]
        meta = tables[0].schema.metadata
        table = pa.concat_tables(tables, promote_options="permissive").sort_by("row_index")
        table = table.replace_schema_metadata(meta)
        name = f"{uuid.uuid4().hex}.parquet"
        self.io(what, _write_parquet, self.fs, posixpath.join(staging, name), table)
        for p in paths:
            self.io(what, self._rm_tree, p)
        return [name]

    def _rm_tree(self, p: str) -> None:
        """Remove a file or folder if it is there (also when an earlier try removed part)."""
        if self.fs.exists(p):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(p, recursive=True)

    def _move(self, src: str, dst: str) -> None:
        """Move one file; done already if an earlier try moved it (source gone, target there)."""
        try:
            self.fs.mv(src, dst)
        except FileNotFoundError:
            self.fs.invalidate_cache()
            if self.fs.exists(src) or not self.fs.exists(dst):
                raise

    def remove_empty_staging(self) -> None:
        staging = self.path(STAGING)
        self.fs.invalidate_cache(staging)

        def remove() -> None:
            if self.fs.exists(staging) and not self.fs.ls(staging, detail=False):
                self.fs.rm(staging, recursive=True)

        try:
            self.io(f"remove {self.url}/{STAGING}", remove)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise retries.failure(f"clean up {self.url}/{STAGING}", exc) from None

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace a small file at the root in one step (rename locally, one PUT on object stores)."""
        target = self.path(name)

        def write() -> None:
            self.fs.makedirs(self.root, exist_ok=True)
            if self.local:
                tmp = self.path(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
                with self.fs.open(tmp, "wb") as fh:
                    fh.write(data)
                self.fs.mv(tmp, target)
            else:
                self.fs.pipe_file(target, data)

        what = f"write {self.fs.unstrip_protocol(target)}"
        try:
            self.io(what, write)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise retries.failure(what, exc) from None

    def read(self, name: str) -> bytes | None:
        target = self.path(name)

        def read() -> bytes | None:
            try:
                return self.fs.cat_file(target)
            except (FileNotFoundError, NotADirectoryError):  # no such file
                return None

        what = f"read {self.fs.unstrip_protocol(target)}"
        try:
            return self.io(what, read)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise retries.failure(what, exc) from None

    def is_empty(self) -> bool:
        def empty() -> bool:
            return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

        self.fs.invalidate_cache(self.root)
        try:
            return self.io(f"list {self.url}", empty)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise retries.failure(f"list {self.url}", exc) from None

    def wipe(self) -> None:
        try:
            self.io(f"delete {self.url}", self._rm_tree, self.root)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise retries.failure(f"delete {self.url}", exc) from None


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
