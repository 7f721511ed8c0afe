"""Input shards: listing them (planning) and reading one into row batches.

A shard is one input file. Its id is stable across runs (relative path + size + mtime/ETag)
so that resume can recognise committed work, and safe to use as a file name.

Readers know file formats, not tasks: they read the columns a ``Columns`` names (the
task's, by role) and carry each row's values on as one JSON object (``payload``), checked
by the task's ``check_row``. Row-level problems (malformed JSON line, non-UTF-8 bytes, a
value the task cannot use) do not stop the job: the row gets an ``input_error`` and flows
on, so every input row still yields exactly one output row. Shard-level problems (file
vanished, corrupt Parquet, missing column) raise ``InputError`` naming the file, the row
or line, and the column.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from batchjobs.errors import InputError

PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
GLOB_CHARS = "*?["

# Internal columns a read batch carries into the engine stage.
SHARD_ID, ROW_INDEX, SHARD_ROWS, ROW_ID, PAYLOAD, INPUT_ERROR, PARAMS = (
    "shard_id",
    "row_index",
    "shard_rows",
    "row_id",
    "payload",  # JSON object of the row's task values by role ({"prompt": ...}), or null
    "input_error",
    "params",  # JSON object of per-row sampling overrides, or null
)


@dataclass(frozen=True)
class Columns:
    """What to read from each row: the task's columns by role, the id column, per-row
    sampling columns, and the task's checks of a value (``check_row``) and of a Parquet
    column's type (``check_type``); each returns why not, or None."""

    fields: dict[str, str]
    id_column: str | None = None
    sampling: dict[str, str] = field(default_factory=dict)
    check_row: Callable[[dict[str, Any]], str | None] | None = None
    check_type: Callable[[str, pa.DataType], str | None] | None = None
    # Columns by role that a JSON Lines row may leave out (null), carried in the payload
    # and checked like ``fields`` (a LoRA adapter name, a row's own output constraint).
    optional: dict[str, str] = field(default_factory=dict)
    # Also carry each row's file and line (row number for Parquet) in its payload, as
    # "_source" and "_line", for a task that names them in what it writes per row.
    locate: bool = False

    def spec_key(self, column: str) -> str:
        """The spec key that names ``column``, for the hint in an error."""
        for role, col in {**self.fields, **self.optional}.items():
            if col == column:
                return f"input.{role}_column"
        return "input.id_column" if column == self.id_column else "input.sampling_columns"

    def names(self) -> list[str]:
        cols = [*self.fields.values(), *([self.id_column] if self.id_column else [])]
        return list(
            dict.fromkeys(cols + list(self.optional.values()) + list(self.sampling.values()))
        )


@dataclass(frozen=True)
class Shard:
    shard_id: str
    url: str  # what fsspec opens (protocol included)
    rel: str  # path relative to the input root, for people
    format: str  # "parquet" | "jsonl"
    size: int
    version: str  # mtime or ETag: a changed file is a new shard

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def list_shards(path: str, fmt: str = "auto", storage_options: dict | None = None) -> list[Shard]:
    """Expand a file, directory, glob or URL into shards, sorted by relative path."""
    fs, root = filesystem(path, storage_options)
    if any(c in root for c in GLOB_CHARS):
        base = root[: min(root.find(c) for c in GLOB_CHARS if c in root)].rpartition("/")[0]
        files = [p for p in fs.glob(root) if fs.isfile(p)]
    elif fs.isdir(root):
        base = root.rstrip("/")
        files = [p for p in fs.find(root) if _format_of(p, fmt)]
    elif fs.exists(root):
        base, files = posixpath.dirname(root), [root]
    else:
        raise InputError(f"input.path {path!r} does not exist")
    # Hidden and underscore names (".cache/", "_staging/", "_SUCCESS") are never input.
    files = [
        f
        for f in files
        if not any(part.startswith((".", "_")) for part in _rel(f, base).split("/"))
    ]
    if not files:
        raise InputError(
            f"input.path {path!r} matched no input files "
            f"(looked for {', '.join(PARQUET_EXT + JSONL_EXT)})"
        )
    shards = []
    for f in sorted(files):
        info = fs.info(f)
        rel = _rel(f, base)
        kind = _format_of(f, fmt)
        if kind is None:
            raise InputError(f"{f}: cannot tell the format from the name; set input.format")
        version = str(
            info.get("ETag")
            or info.get("mtime")
            or info.get("LastModified")
            or info.get("created")
            or ""
        )
        shards.append(
            Shard(
                shard_id=shard_id_for(rel, info.get("size") or 0, version),
                url=fs.unstrip_protocol(f),
                rel=rel,
                format=kind,
                size=int(info.get("size") or 0),
                version=version,
            )
        )
    return shards


def _rel(path: str, base: str) -> str:
    return posixpath.relpath(path, base) if base else path


def shard_id_for(rel: str, size: int, version: str) -> str:
    """A file-name-safe id: readable stem of the relative path + hash of path, size, version."""
    digest = hashlib.sha256(f"{rel}\0{size}\0{version}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("._")[:80] or "shard"
    return f"{stem}-{digest}"


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith(PARQUET_EXT):
        return "parquet"
    if lower.endswith(JSONL_EXT):
        return "jsonl"
    return None


def preflight(shard: Shard, cols: Columns, storage_options=None) -> None:
    """Check a shard's columns before any engine starts (cheap: footer or first line)."""
    fs, path = filesystem(shard.url, storage_options)
    if shard.format == "parquet":
        try:
            schema = pq.ParquetFile(fs.open(path, "rb")).schema_arrow
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a Parquet file"
            raise InputError(f"{shard.url}: not a readable Parquet file ({exc})") from None
        for col in cols.names():
            if col not in schema.names:
                raise InputError(
                    f"{shard.url}: no column {col!r} (columns: {', '.join(schema.names)}); "
                    f"set {cols.spec_key(col)}"
                )
        for role, col in {**cols.fields, **cols.optional}.items():
            problem = cols.check_type(role, schema.field(col).type) if cols.check_type else None
            if problem:
                raise InputError(
                    f"{shard.url}: column {col!r} has type {schema.field(col).type}, {problem}"
                )
        return
    with fs.open(path, "rb", compression="infer") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{shard.url} line {lineno}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{shard.url} line {lineno}: expected a JSON object per line")
                for col in [*cols.fields.values(), *([cols.id_column] if cols.id_column else [])]:
                    if col not in obj:
                        raise InputError(
                            f"{shard.url} line {lineno}: no column {col!r} "
                            f"(columns: {', '.join(obj)}); set {cols.spec_key(col)}"
                        )
                return


def read_shard(
    shard: Shard,
    cols: Columns,
    batch_rows: int = 1024,
    storage_options: dict | None = None,
) -> Iterator[pa.Table]:
    """Yield batches with shard_id, row_index, shard_rows, row_id, payload, input_error, params."""
    fs, path = filesystem(shard.url, storage_options)
    try:
        if shard.format == "parquet":
            yield from _read_parquet(shard, fs, path, cols, batch_rows)
        else:
            yield from _read_jsonl(shard, fs, path, cols, batch_rows)
    except FileNotFoundError:
        raise InputError(f"{shard.url}: file vanished after planning") from None


def _read_parquet(shard, fs, path, cols: Columns, batch_rows):
    try:
        pf = pq.ParquetFile(fs.open(path, "rb"))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{shard.url}: not a readable Parquet file ({exc})") from None
    total = pf.metadata.num_rows
    columns = cols.names()
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(
            f"{shard.url}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})"
        )
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            values = {c: batch.column(c).to_pylist() for c in columns}
            rows = [{c: values[c][i] for c in columns} for i in range(batch.num_rows)]
            yield _make_batch(shard, start, total, rows, [None] * len(rows), cols, "row")
            start += batch.num_rows
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{shard.url}: corrupt Parquet data after row {start} ({exc})") from None


def _read_jsonl(shard, fs, path, cols: Columns, batch_rows):
    with fs.open(path, "rb", compression="infer") as fh:
        raw_lines = [
            (n, line) for n, line in enumerate(fh.read().split(b"\n"), start=1) if line.strip()
        ]
    total = len(raw_lines)
    for start in range(0, total, batch_rows) if total else ():
        rows, errors, linenos = [], [], []
        for lineno, line in raw_lines[start : start + batch_rows]:
            linenos.append(lineno)
            obj, err = _parse_line(line, lineno, shard.url)
            if err is None:
                absent = [c for c in cols.fields.values() if c not in obj]
                if absent:
                    err = f"{shard.url} line {lineno}: no column {absent[0]!r}"
            rows.append(obj)  # {} when unparsed; else its id names the error row
            errors.append(err)
        yield _make_batch(shard, start, total, rows, errors, cols, "line", linenos)


def _parse_line(line: bytes, lineno: int, url: str) -> tuple[dict, str | None]:
    try:
        text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return {}, f"{url} line {lineno}: not UTF-8 (byte {exc.start})"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return {}, f"{url} line {lineno}: not valid JSON ({exc})"
    if not isinstance(obj, dict):
        return {}, f"{url} line {lineno}: expected a JSON object, got {type(obj).__name__}"
    return obj, None


def _make_batch(shard, start, total, rows, errors, cols: Columns, unit, linenos=None):
    """One read batch: each row's task values as a JSON payload, or its input error."""
    n = len(rows)
    payloads: list[str | None] = [None] * n
    params: list[str | None] = [None] * n
    ids: list[str] = [f"{shard.shard_id}:{i}" for i in range(start, start + n)]
    for i, row in enumerate(rows):
        if cols.id_column and row.get(cols.id_column) is not None:
            ids[i] = str(row[cols.id_column])
        if errors[i] is not None:
            continue
        where = f"{shard.url} {unit} {linenos[i] if linenos else start + i}"
        if cols.id_column and row.get(cols.id_column) is None:
            errors[i] = f"{where}: id column {cols.id_column!r} is null or missing"
            continue
        values = {role: row.get(col) for role, col in {**cols.fields, **cols.optional}.items()}
        problem = cols.check_row(values) if cols.check_row else None
        if problem:
            errors[i] = f"{where}: {problem}"
            continue
        if cols.locate:
            values["_source"] = shard.url
            values["_line"] = linenos[i] if linenos else start + i + 1
        payloads[i] = json.dumps(values, ensure_ascii=False)
        overrides = {p: row[c] for p, c in cols.sampling.items() if row.get(c) is not None}
        params[i] = json.dumps(overrides) if overrides else None
    # A row whose id is unknown (null id, unparseable line) keeps the generated id, so that
    # its error row can still be found and joined back.
    return pa.table(
        {
            SHARD_ID: pa.array([shard.shard_id] * n, pa.string()),
            ROW_INDEX: pa.array(range(start, start + n), pa.int64()),
            SHARD_ROWS: pa.array([total] * n, pa.int64()),
            ROW_ID: pa.array(ids, pa.string()),
            PAYLOAD: pa.array(payloads, pa.string()),
            INPUT_ERROR: pa.array(errors, pa.string()),
            PARAMS: pa.array(params, pa.string()),
        }
    )


# JSON Lines inputs up to this size are counted line by line; past it, rows are estimated
# from the bytes per row of the first JSON Lines shard.
COUNT_JSONL_BYTES = 256 << 20


def count_rows(shards: list[Shard], storage_options: dict | None = None) -> tuple[int, bool]:
    """Rows in the shards and whether that is an estimate.

    Parquet: the footer's row count. JSON Lines: non-empty lines, counted while the JSON
    Lines total is at most ``COUNT_JSONL_BYTES``; past that, the first JSON Lines shard is
    counted and the rest estimated from its bytes per row.
    """
    rows, estimated = 0, False
    jsonl = [s for s in shards if s.format != "parquet"]
    rows += sum(shard_rows(s, storage_options) for s in shards if s.format == "parquet")
    if sum(s.size for s in jsonl) <= COUNT_JSONL_BYTES:
        rows += sum(shard_rows(s, storage_options) for s in jsonl)
    else:
        first = shard_rows(jsonl[0], storage_options)
        per_byte = first / jsonl[0].size if jsonl[0].size else 0.0
        rows += first + round(sum(s.size for s in jsonl[1:]) * per_byte)
        estimated = True
    return rows, estimated


def shard_rows(shard: Shard, storage_options: dict | None = None) -> int:
    """A shard's row count, as ``read_shard`` will yield it: the Parquet footer's count, or
    the non-empty lines of a JSON Lines file (one pass, no parsing)."""
    fs, path = filesystem(shard.url, storage_options)
    if shard.format == "parquet":
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    with fs.open(path, "rb", compression="infer") as fh:
        return sum(1 for line in fh if line.strip())
