"""The manifest: one record per shard at the output root, the single source of truth for
resume (which shards are committed, under which job fingerprint) and for cost (rows,
tokens, engine and GPU seconds, dollars per shard).

Layout (names in ``layout.py``)::

    _manifest.jsonl              every shard's record as of the last compaction, one JSON
                                 object per line
    _manifest.d/<seq>.jsonl      one file per shard committed since then, <seq> a zero-padded
                                 sequence number

Committing a shard writes one small file, whatever the number of shards already committed,
on a local disk and on an object store alike (object stores cannot append). Reading takes
``_manifest.jsonl`` and then the files of ``_manifest.d/`` in sequence order; a later record
of a shard replaces an earlier one. Every ``COMPACT_EVERY`` commits, or a tenth of the
records if more (so the rewrites cost a constant amount per commit on average), and at the
end of every run, ``_manifest.jsonl`` is rewritten in one step with all records and the
files of ``_manifest.d/`` are deleted: after a run, ``_manifest.jsonl`` alone is complete.
A driver killed mid-run leaves its last commits in ``_manifest.d/`` for the next run (and
``batchjobs manifest``) to read.

Each line of ``_manifest.jsonl`` carries the sequence number of the last commit it holds
(``"seq"``), so a delta file left behind by a crash between writing the compaction and
deleting the deltas is recognised as already included and skipped: no record is lost or
read twice, and a record changed at compaction (a superseded shard) is not overwritten by an
older delta. Lines also carry the schema version (``"v"``); neither is part of
``ShardRecord``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from batchjobs.cost import Weights, per_million, usd
from batchjobs.errors import OutputError
from batchjobs.layout import MANIFEST, MANIFEST_DELTAS, stamped, unstamped
from batchjobs.records import ShardCounts
from batchjobs.retries import failure
from batchjobs.sink import OutputRoot

log = logging.getLogger("batchjobs")
COMPACT_EVERY = 100  # commits between compactions, at the least
COMPACT_SHARE = 10  # ... and at least records / COMPACT_SHARE of them
_DELTA = re.compile(r"^(\d+)\.jsonl$")
_SEQ_DIGITS = 12
_RELOADS = 3  # a reader racing a compaction retries this often

COMMITTED = "committed"
SUPERSEDED = "superseded"  # its input file changed or vanished; output removed


@dataclass(kw_only=True)
class ShardRecord(ShardCounts):
    """A shard's line in the manifest: its counts (``ShardCounts``: rows, error rows,
    tokens), the engine seconds its rows' work cost and how that was found (``cost.py``),
    what they cost, and where its output is."""

    shard_id: str
    source: str
    status: str = "pending"
    engine_s: float = 0.0
    # How engine_s was attributed: cost.Weights as a dict (method, seconds per prefill and
    # per decode token, the full windows they come from).
    cost_weights: dict = field(default_factory=dict)
    gpu_s: float = 0.0
    cost_usd: float = 0.0
    usd_per_1m_tokens: float | None = None
    usd_per_1m_output_tokens: float | None = None
    tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    files: list[str] = field(default_factory=list)
    engine: str = ""
    model: str = ""
    # The engine configuration that produced the shard (engineconfig.py): its digest, and
    # the pilot candidate's name where a pilot chose it ("" otherwise).
    engine_digest: str = ""
    engine_config: str = ""
    fingerprint: str = ""
    started_at: float | None = None
    committed_at: float | None = None
    # The output files' Parquet schema metadata: task, fingerprint, an embedding's size.
    output_metadata: dict[str, str] = field(default_factory=dict)
    # The task's figures for the shard (Task.shard_metrics): an eval's rows correct and
    # accuracy per metric; empty for other tasks.
    metrics: dict[str, float | None] = field(default_factory=dict)

    def finalise(self, weights: Weights, gpus_per_replica: int, usd_per_gpu_hour: float) -> None:
        """Charge the shard its rows' work at ``weights``; derive GPU-seconds, dollars and
        rates from that and the tokens."""
        self.engine_s = weights.charge(self.prefill_tokens, self.completion_tokens)
        self.cost_weights = weights.to_dict()
        tokens = self.prompt_tokens + self.completion_tokens
        self.gpu_s = self.engine_s * gpus_per_replica
        self.cost_usd = usd(self.gpu_s, usd_per_gpu_hour)
        self.usd_per_1m_tokens = per_million(self.cost_usd, tokens)
        self.usd_per_1m_output_tokens = per_million(self.cost_usd, self.completion_tokens)
        self.tokens_per_s = tokens / self.engine_s if self.engine_s else None
        self.output_tokens_per_s = self.completion_tokens / self.engine_s if self.engine_s else None
        self._charge_parts(weights, gpus_per_replica, usd_per_gpu_hour)

    def _charge_parts(self, weights: Weights, gpus: int, usd_per_gpu_hour: float) -> None:
        """Charge the parts of the shard that the task counted in ``metrics`` as
        ``<part>.prompt_tokens`` and ``<part>.completion_tokens`` (a LoRA job's adapters,
        ``adapter.<name>.``) at the same weights, adding ``<part>.engine_s`` and
        ``<part>.cost_usd``; the parts add up to the shard. The prefix cache's hits are
        spread over the parts by their prompt tokens."""
        computed = self.prefill_tokens / self.prompt_tokens if self.prompt_tokens else 1.0
        for key in [k for k in self.metrics if k.endswith(".completion_tokens")]:
            part = key[: -len("completion_tokens")]
            prompt = self.metrics.get(part + "prompt_tokens")
            if prompt is None:
                continue
            engine_s = weights.charge(prompt * computed, self.metrics[key] or 0)
            self.metrics[part + "engine_s"] = engine_s
            self.metrics[part + "cost_usd"] = usd(engine_s * gpus, usd_per_gpu_hour)


class Manifest:
    """Shard records by id, read from ``_manifest.jsonl`` and ``_manifest.d/``.

    ``commit`` records one shard (constant cost); ``compact`` folds the commits into
    ``_manifest.jsonl``; ``save`` writes every record now, for callers that changed records
    in place.
    """

    def __init__(self, root: OutputRoot, compact_every: int = COMPACT_EVERY):
        self.root = root
        self.compact_every = compact_every
        self.records: dict[str, ShardRecord] = {}
        self.seq = 0  # the sequence number of the latest commit read or written
        self._deltas: list[str] = []  # delta files present, folded into the manifest or not
        self._pending = 0  # commits not yet in _manifest.jsonl
        self._dir_ready = False
        self._delete_warned = False
        for attempt in range(_RELOADS):
            try:
                self._load()
                break
            except FileNotFoundError:
                # A delta file vanished between listing and reading it: a running job
                # compacted meanwhile, so _manifest.jsonl now holds it. Read again.
                if attempt == _RELOADS - 1:
                    raise OutputError(
                        f"{root.url}/{MANIFEST_DELTAS} keeps changing while being read; "
                        "read the manifest again when the job has finished"
                    ) from None

    # ------------------------------------------------------------------ reading

    def _load(self) -> None:
        self.records, self._deltas, self._pending = {}, [], 0
        compacted_at = 0
        raw = self.root.read(MANIFEST)
        if raw:
            for rec, seq in self._parse(raw, f"{self.root.url}/{MANIFEST}"):
                self.records[rec.shard_id] = rec
                compacted_at = max(compacted_at, seq)
        self.seq = compacted_at
        deltas = self._list_deltas()
        self._deltas = [path for _, path in deltas]
        later = [(num, path) for num, path in deltas if num > compacted_at]
        if deltas:
            self.seq = max(self.seq, deltas[-1][0])
        if not later:
            return
        fs = self.root.fs

        # One request per file, concurrent where the filesystem can (s3fs, gcsfs). A file
        # that vanished (a compaction meanwhile) is missing from the answer; _load reads again.
        def fetch() -> dict[str, bytes]:
            found = fs.cat([p for _, p in later], on_error="return")
            for value in found.values():
                if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
                    raise value
            return {posixpath.basename(k): v for k, v in found.items() if isinstance(v, bytes)}

        what = f"read {self.root.url}/{MANIFEST_DELTAS}"
        try:
            got = self.root.io(what, fetch)
        except FileNotFoundError:
            raise  # compacted meanwhile: __init__ reads again
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise failure(what, exc) from None
        for _, path in later:
            name = posixpath.basename(path)
            if name not in got:
                raise FileNotFoundError(path)
            where = f"{self.root.url}/{MANIFEST_DELTAS}/{name}"
            for rec, _ in self._parse(got[name], where):
                self.records[rec.shard_id] = rec
        self._pending = len(later)

    def _list_deltas(self) -> list[tuple[int, str]]:
        folder = self.root.path(MANIFEST_DELTAS)
        self.root.fs.invalidate_cache(folder)  # another process may have committed since
        try:
            paths = self.root.io(f"list {self.root.url}/{MANIFEST_DELTAS}", self._ls, folder)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise failure(f"list {self.root.url}/{MANIFEST_DELTAS}", exc) from None
        found = []
        for p in paths:
            m = _DELTA.match(posixpath.basename(p))
            if m:  # not a temporary file of a write that died
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _ls(self, folder: str) -> list[str]:
        try:
            return self.root.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []

    @staticmethod
    def _parse(raw: bytes, where: str) -> list[tuple[ShardRecord, int]]:
        out = []
        for n, line in enumerate(raw.decode().splitlines(), start=1):
            if not line.strip():
                continue
            at = f"{where} line {n}"
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}, not an object")
                data = unstamped(MANIFEST, data, at)
                seq = data.pop("seq", 0)
                if not isinstance(seq, int):
                    raise TypeError(f"seq {seq!r} is not an integer")
                out.append((ShardRecord(**data), seq))
            except (ValueError, TypeError) as exc:
                raise OutputError(
                    f"{at} is not a shard record ({exc}); "
                    "move the output root aside or run with --fresh"
                ) from None
        return out

    def committed(self) -> dict[str, ShardRecord]:
        return {k: r for k, r in self.records.items() if r.status == COMMITTED}

    def fingerprints(self) -> set[str]:
        return {r.fingerprint for r in self.committed().values()}

    def as_rows(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records.values()]

    # ------------------------------------------------------------------ writing

    def commit(self, rec: ShardRecord) -> None:
        """Record one shard: one small file under ``_manifest.d/``, and now and then a
        compaction (see the module docstring)."""
        self.records[rec.shard_id] = rec
        self.seq += 1
        name = f"{self.seq:0{_SEQ_DIGITS}d}.jsonl"
        path = self.root.path(MANIFEST_DELTAS, name)
        self._put(path, (_line(rec, self.seq) + "\n").encode())
        self._deltas.append(path)
        self._pending += 1
        if self._pending >= max(self.compact_every, len(self.records) // COMPACT_SHARE):
            self.compact()

    def compact(self) -> None:
        """Fold the commits under ``_manifest.d/`` into ``_manifest.jsonl``; nothing to do
        when there are none."""
        if self._deltas:
            self.save()

    def save(self) -> None:
        """Write every record to ``_manifest.jsonl`` in one step, then delete the delta files."""
        lines = [_line(r, self.seq) for r in self.records.values()]
        self.root.write_atomic(MANIFEST, ("\n".join(lines) + "\n").encode())
        self._pending = 0
        if not self._deltas:
            return
        fs = self.root.fs
        try:
            fs.rm(self._deltas)
            self._deltas = []
        except OSError as exc:
            # Harmless: _manifest.jsonl says which commits it holds, so readers skip
            # these files; the next compaction tries again.
            if not self._delete_warned:
                log.warning(
                    "cannot delete compacted manifest files under %s: %s", self.root.url, exc
                )
                self._delete_warned = True
            return
        if self.root.local:  # object stores have no folders to remove
            with contextlib.suppress(OSError):  # not empty: a write that died left a temp file
                fs.rmdir(self.root.path(MANIFEST_DELTAS))
            self._dir_ready = False

    def _put(self, path: str, data: bytes) -> None:
        """Write a new file whole: rename into place locally, one PUT on object stores."""
        fs = self.root.fs

        def put() -> None:
            if self.root.local:
                folder = posixpath.dirname(path)
                if not self._dir_ready:
                    fs.makedirs(folder, exist_ok=True)
                    self._dir_ready = True
                tmp = posixpath.join(
                    folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
                )
                with fs.open(tmp, "wb") as fh:
                    fh.write(data)
                fs.mv(tmp, path)
            else:
                fs.pipe_file(path, data)

        what = f"write {fs.unstrip_protocol(path)}"
        try:
            self.root.io(what, put)
        except Exception as exc:  # noqa: BLE001 - any filesystem failure is an output error
            raise failure(what, exc) from None


def _line(rec: ShardRecord, seq: int) -> str:
    # Not asdict(): it deep-copies each record, a third of the time of a compaction.
    data = {name: getattr(rec, name) for name in _FIELDS}
    return json.dumps(stamped(MANIFEST, {**data, "seq": seq}), sort_keys=True)


_FIELDS = tuple(f.name for f in fields(ShardRecord))
