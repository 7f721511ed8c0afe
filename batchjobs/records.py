"""The output row contract and the per-shard counts every stage shares.

An output row is the id column (the input's, or ``row_id``), the shard bookkeeping
(``shard_id``, ``row_index``) and the task's result columns (``Task.output_fields``).
``ShardCounts`` is what the sink sums per staged file, the tracker per shard, and the
manifest records per shard.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyarrow as pa

BOOKKEEPING_COLUMNS: dict[str, pa.DataType] = {"shard_id": pa.string(), "row_index": pa.int64()}
# Columns the pipeline carries between stages; an id column may not take one of these names.
INTERNAL_COLUMNS = frozenset(
    {"shard_rows", "payload", "input_error", "params", "_cached_tokens", "row_id"}
)
# Result columns of any task (generate and chat: text ...; embed: embedding ...).
RESULT_COLUMNS = frozenset(
    {
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "latency_s",
        "error",
        "embedding",
        "truncated",
    }
)
RESERVED = RESULT_COLUMNS | frozenset(BOOKKEEPING_COLUMNS) | INTERNAL_COLUMNS
DEFAULT_ID_COLUMN = "row_id"


@dataclass
class ShardCounts:
    """Rows, error rows and tokens of some rows of one shard (``cached_tokens``: prompt
    tokens the engine's prefix cache served instead of computing them)."""

    rows: int = 0
    error_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the engine computed."""
        return self.prompt_tokens - self.cached_tokens

    def add(self, other: ShardCounts) -> None:
        for f in fields(ShardCounts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def of(cls, obj) -> ShardCounts:
        """The counts of anything that has them as attributes or keys."""
        get = obj.get if isinstance(obj, dict) else lambda k: getattr(obj, k)
        return cls(**{f.name: get(f.name) for f in fields(cls)})


COUNT_TYPES: dict[str, pa.DataType] = {
    "rows": pa.int64(),
    "error_rows": pa.int64(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
}
assert set(COUNT_TYPES) == {f.name for f in fields(ShardCounts)}
