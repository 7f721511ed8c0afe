"""Input shards: listing them (planning) and reading one into row batches.

A shard is one input file. Its id is stable across runs (relative path + size + mtime/ETag)
so that resume can recognise committed work, and safe to use as a file name.

Readers know file formats, not tasks: they read the columns a ``Columns`` names (the
task's, by role) and carry each row's values on as one JSON object (``payload``), checked
by the task's ``check_row``. Row-level problems (malformed JSON line, non-UTF-8 bytes, a
value the task cannot use, anything else one row holds: ``rowcheck``) do not stop the job:
the row gets an ``input_error`` and flows on, so every input row still yields exactly one
output row; each row also carries its place (``where``: file and line or row), which every
error of that row starts with. Shard-level problems (file vanished, corrupt Parquet,
missing or mistyped column) raise ``InputError`` naming the file, the row or line, and the
column; the job reads around them (``shard_errors``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from batchjobs.errors import InputError
from batchjobs.rowcheck import exception_text, python_rows, row_values, text
from batchjobs.secrets import lift_url_credentials

log = logging.getLogger("batchjobs")

PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
GLOB_CHARS = "*?["

# Internal columns a read batch carries into the engine stage.
SHARD_ID, ROW_INDEX, SHARD_ROWS, ROW_ID, PAYLOAD, INPUT_ERROR, PARAMS, WHERE = (
    "shard_id",
    "row_index",
    "shard_rows",
    "row_id",
    "payload",  # JSON object of the row's task values by role ({"prompt": ...}), or null
    "input_error",
    "params",  # JSON object of per-row sampling overrides, or null
    "where",  # the row's place for people: "<url> line <n>" or "<url> row <i>"
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
    # A row's sampling overrides checked: ({param: value}, {param: column}) -> (params, why)
    # (rowcheck.sampling_check); None: passed on as read.
    check_params: Callable[[dict[str, Any], dict[str, str]], Any] | None = None
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
    """The fsspec filesystem of ``url`` and the path in it; an ``s3://KEY:SECRET@`` URL's
    credentials become storage options (``secrets.lift_url_credentials``)."""
    url, storage_options = lift_url_credentials(url, storage_options)
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path


def list_shards(path: str, fmt: str = "auto", storage_options: dict | None = None) -> list[Shard]:
    """Expand a file, directory, glob or URL into shards, sorted by relative path."""
    fs, root = filesystem(path, storage_options)
    if any(c in root for c in GLOB_CHARS):
        base = root[: min(root.find(c) for c in GLOB_CHARS if c in root)].rpartition("/")[0]
        files = [p for p in fs.glob(root) if fs.isfile(p)]
    elif fs.isdir(root):
        base = root.rstrip("/")
        files = [p for p in _files_under(fs, root) if _format_of(p, fmt)]
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


def _files_under(fs, root: str) -> list[str]:
    """The files under a directory. A symbolic link counts when it leads to a file (it is
    named by its own path, inside the tree); one that leads to a directory is not followed,
    so a link back up the tree cannot loop, and a broken one is not a file."""
    found = fs.find(root, detail=True)
    files = []
    for p, info in found.items():
        if info.get("type") == "file" or (info.get("islink") and fs.isfile(p)):
            files.append(p)
        elif info.get("islink") and not fs.exists(p) and _format_of(p, "auto"):
            log.warning("%s is a broken link (what it leads to does not exist): not read", p)
    return files


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


# JSON Lines preflight reads up to this many non-blank lines for one that has the columns.
PREFLIGHT_LINES = 100


def preflight(shard: Shard, cols: Columns, storage_options=None) -> None:
    """Check a shard's columns before any engine starts (cheap: the Parquet footer, or the
    first JSON Lines rows); raise ``InputError`` naming the file and the column."""
    fs, path = filesystem(shard.url, storage_options)
    with _shard_error(shard):
        if shard.format == "parquet":
            _preflight_parquet(shard, fs, path, cols)
        else:
            _preflight_jsonl(shard, fs, path, cols)


@contextmanager
def _shard_error(shard: Shard) -> Iterator[None]:
    """A shard that cannot be read, in any way, as one ``InputError`` naming its file."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{shard.url}: file vanished after planning") from None
    except Exception as exc:  # noqa: BLE001 - unreadable in any way: this shard's error
        raise InputError(f"{shard.url}: cannot be read ({exception_text(exc)})") from None


def _preflight_parquet(shard: Shard, fs, path: str, cols: Columns) -> None:
    try:
        schema = pq.ParquetFile(fs.open(path, "rb")).schema_arrow
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a Parquet file"
        raise InputError(f"{shard.url}: not a readable Parquet file ({exc})") from None
    for col in cols.names():
        if col not in schema.names:
            raise InputError(
                f"{shard.url}: no column {col!r} (columns: {', '.join(schema.names)}); "
                f"set {cols.spec_key(col)}"
            )
    for role, col in {**cols.fields, **cols.optional}.items():
        dtype = schema.field(col).type
        problem = _type_problem(cols, role, dtype)
        if problem:
            raise InputError(f"{shard.url}: column {col!r} has type {dtype}, {problem}")


def _type_problem(cols: Columns, role: str, dtype: pa.DataType) -> str | None:
    """Why a Parquet column of ``dtype`` cannot serve ``role``. A column of type null (every
    value null) passes: each of its rows is an error row. A dictionary-encoded column (a
    pandas category) is judged by its values' type."""
    if pa.types.is_null(dtype) or cols.check_type is None:
        return None
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_string_view(dtype):
        dtype = pa.string()
    return cols.check_type(role, dtype)


def _preflight_jsonl(shard: Shard, fs, path: str, cols: Columns) -> None:
    """Pass when one of the first ``PREFLIGHT_LINES`` rows that parse has the columns, or
    none parses (each such row is an error row); else the columns are missing."""
    need = [*cols.fields.values(), *([cols.id_column] if cols.id_column else [])]
    first: tuple[int, dict] | None = None
    seen = 0
    with fs.open(path, "rb", compression="infer") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            seen += 1
            obj, err = _parse_line(line, lineno, shard.url)
            if err is None:
                if all(col in obj for col in need):
                    return
                first = first or (lineno, obj)
            if seen >= PREFLIGHT_LINES:
                break
    if first is not None:
        lineno, obj = first
        col = next(c for c in need if c not in obj)
        raise InputError(
            f"{shard.url} line {lineno}: no column {col!r} (columns: {', '.join(obj)}); "
            f"set {cols.spec_key(col)}"
        )


def read_shard(
    shard: Shard,
    cols: Columns,
    batch_rows: int = 1024,
    storage_options: dict | None = None,
) -> Iterator[pa.Table]:
    """Yield batches with shard_id, row_index, shard_rows, row_id, payload, input_error,
    params and where. A shard that cannot be read raises ``InputError``; a row that cannot
    be used is an error row."""
    fs, path = filesystem(shard.url, storage_options)
    with _shard_error(shard):
        if shard.format == "parquet":
            yield from _read_parquet(shard, fs, path, cols, batch_rows)
        else:
            yield from _read_jsonl(shard, fs, path, cols, batch_rows)


def _read_parquet(shard, fs, path, cols: Columns, batch_rows):
    try:
        pf = pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{shard.url}: not a readable Parquet file ({exc})") from None
    total = pf.metadata.num_rows
    columns = cols.names()
    schema = pf.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(
            f"{shard.url}: no column {missing[0]!r} (columns: {', '.join(schema.names)}); "
            f"set {cols.spec_key(missing[0])}"
        )
    for role, col in {**cols.fields, **cols.optional}.items():
        problem = _type_problem(cols, role, schema.field(col).type)
        if problem:
            raise InputError(
                f"{shard.url}: column {col!r} has type {schema.field(col).type}, {problem}"
            )
    start = 0
    batches = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # noqa: BLE001 - a damaged page or row group
            raise InputError(
                f"{shard.url}: corrupt Parquet data after row {start} ({exception_text(exc)})"
            ) from None
        if batch is None:
            break
        rows, errors = python_rows(batch, columns, shard.url, start)
        yield _make_batch(shard, start, total, rows, errors, cols, "row")
        start += batch.num_rows


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
        data = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return {}, f"{url} line {lineno}: not UTF-8 (byte {exc.start})"
    try:
        obj = json.loads(data)
    except ValueError as exc:
        return {}, f"{url} line {lineno}: not valid JSON ({text(exc)})"
    except RecursionError:
        return {}, f"{url} line {lineno}: not valid JSON (nested too deeply)"
    except Exception as exc:  # noqa: BLE001 - whatever else json raises is this line's
        return {}, f"{url} line {lineno}: not valid JSON ({exception_text(exc)})"
    if not isinstance(obj, dict):
        return {}, f"{url} line {lineno}: expected a JSON object, got {type(obj).__name__}"
    return obj, None


def _make_batch(shard, start, total, rows, errors, cols: Columns, unit, linenos=None):
    """One read batch: each row's task values as a JSON payload, or its input error."""
    n = len(rows)
    payloads: list[str | None] = [None] * n
    params: list[str | None] = [None] * n
    ids: list[str] = [f"{shard.shard_id}:{i}" for i in range(start, start + n)]
    wheres = [f"{shard.url} {unit} {linenos[i] if linenos else start + i}" for i in range(n)]
    for i, row in enumerate(rows):
        try:
            payloads[i], params[i], ids[i], errors[i] = row_values(
                row,
                errors[i],
                ids[i],
                wheres[i],
                cols,
                (shard.url, linenos[i] if linenos else start + i + 1),
            )
        except Exception as exc:  # noqa: BLE001 - whatever one row holds is its own error
            payloads[i] = params[i] = None
            errors[i] = f"{wheres[i]}: cannot be read ({exception_text(exc)})"
    # A row whose id is unknown (null id, unparseable line) keeps the generated id, so that
    # its error row can still be found and joined back.
    return pa.table(
        {
            SHARD_ID: pa.array([shard.shard_id] * n, pa.string()),
            ROW_INDEX: pa.array(range(start, start + n), pa.int64()),
            SHARD_ROWS: pa.array([total] * n, pa.int64()),
            ROW_ID: pa.array(ids, pa.string()),
            PAYLOAD: pa.array(payloads, pa.string()),
            INPUT_ERROR: pa.array([None if e is None else text(e) for e in errors], pa.string()),
            PARAMS: pa.array(params, pa.string()),
            WHERE: pa.array([text(w) for w in wheres], pa.string()),
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
