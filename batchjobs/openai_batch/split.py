"""``batchjobs run-batch``'s files: the request file cut into shards, and the one output
file assembled from the passes' committed shards.

The state directory (``<output>.batchjobs/`` unless ``--state-dir``) holds::

    _split.json        the input's hash, the cut, the job's creation time
    input/             the request file cut into shards of --shard-rows lines
                       (lines-<first>-<last>.jsonl: the input's lines, blank ones kept)
    generate/, embed/  one output root per pass (shards, manifest, logs)

A rerun with the same input (same bytes) and ``--shard-rows`` keeps the cut, so the passes
skip the shards they committed; another input is cut afresh, which makes new shards.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from batchjobs.errors import InputError, OutputError
from batchjobs.openai_batch import ENDPOINTS, SERVED_BY
from batchjobs.openai_batch.files import Writer, batch_line, dumps, put, shard_rows
from batchjobs.openai_batch.requests import check_line
from batchjobs.readers import filesystem

SPLIT = "_split.json"
INPUT_DIR = "input"
PASSES = ("generate", "embed")  # the engine kinds, in the order their passes run


@dataclass
class Split:
    input: str  # the request file, as given
    sha256: str
    shard_rows: int
    chunks: list[dict[str, Any]]  # name, first_line, rows
    lines: dict[str, int]  # request lines per pass
    created: int  # the job's creation time, carried by every response

    @property
    def passes(self) -> list[str]:
        """The passes to run: one per engine kind the file asks for (a file of bad lines
        only still gets one, to write their error lines)."""
        return [p for p in PASSES if self.lines.get(p)] or [PASSES[0]]


def owner(url: Any) -> str | None:
    """The pass that serves a line with this url (None: no pass; any writes its error)."""
    kind = ENDPOINTS.get(url) if isinstance(url, str) else None
    return SERVED_BY[kind] if kind else None


def split_input(input_file: str, state: str, shard_rows: int) -> Split:
    """Check the request file whole and cut it into shards under ``state``, or keep the cut
    a run before made of the same bytes. Raise ``InputError`` for a line that is not a JSON
    object with a ``custom_id`` string, or a ``custom_id`` given twice."""
    fs, path = filesystem(input_file)
    try:
        with fs.open(path, "rb", compression="infer") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise InputError(f"input file {input_file!r} does not exist") from None
    lines = data.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    seen: dict[str, int] = {}
    dupes: list[str] = []
    per_pass: Counter[str] = Counter()
    rows: list[int] = []  # the line number of every request line
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        obj = check_line(raw, f"{input_file} line {n}")
        cid = obj["custom_id"]
        if cid in seen:
            dupes.append(f"{cid!r} on lines {seen[cid]} and {n}")
        seen.setdefault(cid, n)
        per_pass[owner(obj.get("url")) or "?"] += 1
        rows.append(n)
    if dupes:
        more = f" (and {len(dupes) - 5} more)" if len(dupes) > 5 else ""
        raise InputError(
            f"{input_file}: custom_id repeated: {'; '.join(dupes[:5])}{more}; every request of "
            "a batch needs its own custom_id (OpenAI refuses such files too)"
        )
    if not rows:
        raise InputError(f"{input_file}: no request lines")
    digest = hashlib.sha256(data).hexdigest()
    sfs, root = filesystem(state)
    local = "file" in ((sfs.protocol,) if isinstance(sfs.protocol, str) else sfs.protocol)
    kept = _read_split(sfs, root)
    if (
        kept is not None
        and (kept.sha256, kept.shard_rows) == (digest, shard_rows)
        and all(sfs.exists(posixpath.join(root, INPUT_DIR, c["name"])) for c in kept.chunks)
    ):
        return kept  # the cut a run before made: its shards, and what they committed, stay
    folder = posixpath.join(root, INPUT_DIR)
    if sfs.exists(folder):
        sfs.rm(folder, recursive=True)
    chunks = []
    for start in range(0, len(rows), shard_rows):
        first, last = rows[start], rows[min(start + shard_rows, len(rows)) - 1]
        name = f"lines-{first:09d}-{last:09d}.jsonl"
        body = b"\n".join(lines[first - 1 : last]) + b"\n"
        put(sfs, posixpath.join(folder, name), body, local)
        chunks.append(
            {"name": name, "first_line": first, "rows": min(shard_rows, len(rows) - start)}
        )
    lines_per_pass = {p: per_pass.get(p, 0) for p in PASSES}
    lines_per_pass[PASSES[0]] += per_pass.get("?", 0)  # bad urls: a pass writes their errors
    split = Split(input_file, digest, shard_rows, chunks, lines_per_pass, int(time.time()))
    put(sfs, posixpath.join(root, SPLIT), json.dumps(asdict(split), indent=1).encode(), local)
    return split


def _read_split(fs, root: str) -> Split | None:
    try:
        with fs.open(posixpath.join(root, SPLIT), "rb") as fh:
            return Split(**json.loads(fh.read()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def assemble(split: Split, state: str, output_file: str) -> dict[str, int]:
    """Write every request's line, result or error, to ``output_file`` in input order: each
    line from the pass that serves its url. Every shard must be committed in every pass."""
    from batchjobs.manifest import Manifest
    from batchjobs.readers import list_shards
    from batchjobs.sink import OutputRoot

    sfs, root = filesystem(state)
    shards = {s.rel: s for s in list_shards(posixpath.join(state, INPUT_DIR), "openai_batch")}
    roots = {p: OutputRoot(posixpath.join(state, p)) for p in split.passes}
    committed = {p: Manifest(out).committed() for p, out in roots.items()}
    first_line = {shards[c["name"]].url: c["first_line"] for c in split.chunks}

    def locate(source: str, line: int) -> tuple[str, int]:
        return split.input, first_line[source] + line - 1

    fs, path = filesystem(output_file)
    local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
    counts = Counter()
    with Writer(fs, path, local) as out:
        for chunk in split.chunks:
            shard = shards[chunk["name"]]
            rows = {}
            for p, out_root in roots.items():
                rec = committed[p].get(shard.shard_id)
                if rec is None:
                    raise OutputError(
                        f"shard {shard.shard_id} is not committed in {out_root.url}; run the "
                        "command again to finish it"
                    )
                ((_, rows[p]),) = shard_rows(out_root, {rec.shard_id: rec})
            for i in range(chunk["rows"]):
                by = owner(rows[split.passes[0]][i]["url"])
                row = rows[by if by in rows else split.passes[0]][i]
                ok, line = batch_line(row, split.created, shard.url, locate)
                out.write(dumps(line))
                counts["lines"] += 1
                counts["errors"] += not ok
    return dict(counts)
