"""The output row contract: which columns a result row has, and how they are typed."""

from __future__ import annotations

import pyarrow as pa

# Result columns of a `generate` row, after the id column and the shard bookkeeping.
GENERATE_COLUMNS: dict[str, pa.DataType] = {
    "text": pa.string(),
    "finish_reason": pa.string(),
    "prompt_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "latency_s": pa.float32(),
    "error": pa.string(),
}
BOOKKEEPING_COLUMNS: dict[str, pa.DataType] = {"shard_id": pa.string(), "row_index": pa.int64()}
# What an engine actor reports about itself on every row it returns, as "_replica_<name>":
# start-up, ready at, then so far: idle, busy and request-seconds in the engine, prompt
# tokens and those its prefix cache served; its cap.
REPLICA_FIGURES = (
    "startup_s",
    "ready_at",
    "idle_s",
    "busy_s",
    "inflight_s",
    "prompt_tokens",
    "cached_tokens",
    "limit",
)


def merge_figures(into: dict[str, float], figures: dict[str, float]) -> None:
    """Fold one report of a replica (``engine_s`` charged to some rows, plus its
    ``REPLICA_FIGURES``) into ``into``: engine seconds add up; every figure is a constant or
    a running total, so the largest is the latest."""
    into["engine_s"] = into.get("engine_s", 0.0) + figures["engine_s"]
    for name in REPLICA_FIGURES:
        into[name] = max(into.get(name, 0.0), figures[name])


# Columns the pipeline carries between stages; an id column may not take one of these names.
INTERNAL_COLUMNS = frozenset(
    {"shard_rows", "prompt", "input_error", "params", "_engine_s", "_replica"}
    | {f"_replica_{name}" for name in REPLICA_FIGURES}
)
RESERVED = frozenset(GENERATE_COLUMNS) | frozenset(BOOKKEEPING_COLUMNS) | INTERNAL_COLUMNS
DEFAULT_ID_COLUMN = "row_id"


def output_schema(id_column: str | None) -> pa.Schema:
    """The schema of every Parquet file a generate job writes."""
    fields = [pa.field(id_column or DEFAULT_ID_COLUMN, pa.string())]
    fields += [pa.field(k, v) for k, v in BOOKKEEPING_COLUMNS.items()]
    fields += [pa.field(k, v) for k, v in GENERATE_COLUMNS.items()]
    return pa.schema(fields)
