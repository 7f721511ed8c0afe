"""The manifest: one JSON line per shard at the output root, rewritten atomically.

It is the single source of truth for resume (which shards are committed, under which job
fingerprint) and for cost (rows, tokens, engine and GPU seconds, dollars per shard).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from batchjobs.cost import per_million, usd
from batchjobs.errors import OutputError
from batchjobs.layout import MANIFEST
from batchjobs.sink import OutputRoot

COMMITTED = "committed"
SUPERSEDED = "superseded"  # its input file changed or vanished; output removed


@dataclass
class ShardRecord:
    shard_id: str
    source: str
    status: str = "pending"
    rows: int = 0
    error_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_s: float = 0.0
    gpu_s: float = 0.0
    cost_usd: float = 0.0
    usd_per_1m_tokens: float | None = None
    usd_per_1m_output_tokens: float | None = None
    tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    files: list[str] = field(default_factory=list)
    engine: str = ""
    model: str = ""
    fingerprint: str = ""
    started_at: float | None = None
    committed_at: float | None = None

    def finalise(self, gpus_per_replica: int, usd_per_gpu_hour: float) -> None:
        """Derive GPU-seconds, dollars and rates from the summed engine seconds and tokens."""
        tokens = self.prompt_tokens + self.completion_tokens
        self.gpu_s = self.engine_s * gpus_per_replica
        self.cost_usd = usd(self.gpu_s, usd_per_gpu_hour)
        self.usd_per_1m_tokens = per_million(self.cost_usd, tokens)
        self.usd_per_1m_output_tokens = per_million(self.cost_usd, self.completion_tokens)
        self.tokens_per_s = tokens / self.engine_s if self.engine_s else None
        self.output_tokens_per_s = self.completion_tokens / self.engine_s if self.engine_s else None


class Manifest:
    """Shard records by id, loaded from and saved to ``_manifest.jsonl``."""

    def __init__(self, root: OutputRoot):
        self.root = root
        self.records: dict[str, ShardRecord] = {}
        raw = root.read(MANIFEST)
        if raw:
            for n, line in enumerate(raw.decode().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rec = ShardRecord(**json.loads(line))
                except (ValueError, TypeError) as exc:
                    raise OutputError(
                        f"{root.url}/{MANIFEST} line {n} is not a shard record ({exc}); "
                        "move the output root aside or run with --fresh"
                    ) from None
                self.records[rec.shard_id] = rec

    def committed(self) -> dict[str, ShardRecord]:
        return {k: r for k, r in self.records.items() if r.status == COMMITTED}

    def fingerprints(self) -> set[str]:
        return {r.fingerprint for r in self.committed().values()}

    def save(self) -> None:
        lines = [json.dumps(asdict(r), sort_keys=True) for r in self.records.values()]
        self.root.write_atomic(MANIFEST, ("\n".join(lines) + "\n").encode())

    def as_rows(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records.values()]
