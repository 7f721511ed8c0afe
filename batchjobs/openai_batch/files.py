"""OpenAI batch output files, assembled from committed shards.

One line per request, in input order (files by name, then lines)::

    {"id": "batch_req_…", "custom_id": "…",
     "response": {"status_code": 200, "request_id": "req_…", "body": {…}}, "error": null}

and for a request that failed, the error both as the HTTP answer an OpenAI-compatible
server gives and as OpenAI's ``BatchError`` (``code``, ``message``, ``param``, ``line``)::

    {"id": …, "custom_id": …, "response": {"status_code": 400, "request_id": …,
     "body": {"error": {"message": …, "type": "invalid_request_error", "param": …,
     "code": …}}}, "error": {"code": …, "message": …, "param": …, "line": 12}}

Everything in a line comes from the committed rows and the job's creation time (kept in
``<output>/_openai/job.json`` from the job's first run): ids are hashes of it, the
``custom_id`` and the line number, and ``created`` is it. So assembling the same committed
shards again gives the same bytes, and a job resumed after a crash writes the files an
uninterrupted run of it would have written.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.parquet as pq

from batchjobs.errors import OutputError
from batchjobs.openai_batch import BATCH_ERRORS, BATCH_OUTPUT, JOB_STATE, OUTPUT_DIR
from batchjobs.openai_batch.bodies import embedding_body, error_body
from batchjobs.openai_batch.spec import ID_COLUMN

BODY_ID = {"chat.completion": "chatcmpl-", "text_completion": "cmpl-"}
# Maps a row's (file, line) to where to report it (run-batch: the user's file, not its chunk).
Locate = Callable[[str, int], tuple[str, int]]


# ------------------------------------------------------------------ the job's creation time


def job_created(out) -> int:
    """The job's creation time in Unix seconds, from ``<output>/_openai/job.json``; the
    first call for an output root writes it."""
    name = posixpath.join(OUTPUT_DIR, JOB_STATE)
    raw = out.read(name)
    if raw:
        try:
            created = json.loads(raw).get("created")
            if isinstance(created, int):
                return created
        except (ValueError, AttributeError):
            pass
    created = int(time.time())
    put(out.fs, out.path(name), json.dumps({"v": 1, "created": created}).encode(), out.local)
    return created


# ------------------------------------------------------------------ rows to lines


def shard_rows(out, records) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """Each committed shard's record and its rows in input order, shards by source name."""
    for rec in sorted(records.values(), key=lambda r: r.source):
        tables = [pq.read_table(p, filesystem=out.fs) for p in rec.files]
        rows = [row for t in tables for row in t.to_pylist()]
        rows.sort(key=lambda r: r["row_index"])
        yield rec, rows


def batch_line(
    row: dict[str, Any], created: int, source: str, origin: Locate | None = None
) -> tuple[bool, dict[str, Any]]:
    """A row as a batch output line; and whether it succeeded."""
    cid = row[ID_COLUMN]
    line = row.get("line")
    where, at = origin(source, line) if origin and line is not None else (source, line)
    key = f"{created}\0{cid}\0{at}"
    head = {"id": "batch_req_" + _hash(key, "line"), "custom_id": cid}
    request_id = "req_" + _hash(key, "request")
    status = row["status_code"]
    if status == 200:
        body = json.loads(row["response"])
        if "embeddings" in row:
            body = embedding_body(
                row["embeddings"],
                row["encoding_format"],
                body["model"],
                body["usage"]["prompt_tokens"],
            )
        else:
            prefix = BODY_ID.get(body["object"], "resp-")
            body = {
                "id": prefix + _hash(key, "body"),
                "object": body["object"],
                "created": created,
                **body,
            }
        response = {"status_code": 200, "request_id": request_id, "body": body}
        return True, {**head, "response": response, "error": None}
    message = row.get("error") or "the request failed"
    if line is not None and message.startswith(f"{source} line {line}:"):
        message = f"{where} line {at}:" + message[len(f"{source} line {line}:") :]
    code, param = row.get("error_code") or "server_error", row.get("error_param")
    response = {
        "status_code": status,
        "request_id": request_id,
        "body": error_body(status, code, message, param),
    }
    error = {"code": code, "message": message, "param": param, "line": at}
    return False, {**head, "response": response, "error": error}


def dumps(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _hash(key: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}\0{key}".encode()).hexdigest()[:32]


# ------------------------------------------------------------------ writing


def write_job_files(out, records) -> dict[str, Any]:
    """``<output>/_openai/batch_output.jsonl`` and ``batch_errors.jsonl`` from the committed
    shards ``records`` of the output root ``out``; what was written."""
    created = job_created(out)
    paths = {ok: out.path(OUTPUT_DIR, BATCH_OUTPUT if ok else BATCH_ERRORS) for ok in (True, False)}
    counts = {True: 0, False: 0}
    with (
        Writer(out.fs, paths[True], out.local) as good,
        Writer(out.fs, paths[False], out.local) as bad,
    ):
        for rec, rows in shard_rows(out, records):
            for row in rows:
                ok, line = batch_line(row, created, rec.source)
                (good if ok else bad).write(dumps(line))
                counts[ok] += 1
    where = (lambda p: p) if out.local else out.fs.unstrip_protocol
    return {
        "output": where(paths[True]),
        "errors": where(paths[False]),
        "lines": counts[True],
        "error_lines": counts[False],
    }


def summary_line(info: dict[str, Any]) -> str:
    return (
        f"OpenAI batch files: {info['output']} ({info['lines']} lines), "
        f"{info['errors']} ({info['error_lines']} error lines)"
    )


class Writer:
    """A file written line by line and put in place whole when closed without an error:
    locally a rename, on object stores the upload that closing the file makes."""

    def __init__(self, fs, path: str, local: bool):
        self.fs, self.path, self.local = fs, path, local
        folder, name = posixpath.split(path)
        self.tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp") if local else path

    def __enter__(self) -> Writer:
        try:
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
            self.fh = self.fs.open(self.tmp, "wb")
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.fs.unstrip_protocol(self.path)}: {exc}"
            ) from None
        return self

    def write(self, data: bytes) -> None:
        self.fh.write(data)

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self.fh.close()
            if kind is None and self.local:
                self.fs.mv(self.tmp, self.path)
        except OSError as err:
            raise OutputError(
                f"cannot write {self.fs.unstrip_protocol(self.path)}: {err}"
            ) from None
        finally:
            if kind is not None and self.local and self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


def put(fs, path: str, data: bytes, local: bool) -> None:
    """Write a small file whole (renamed into place locally)."""
    with Writer(fs, path, local) as w:
        w.write(data)
