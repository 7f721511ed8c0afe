"""The order in which rows reach the engines: rows sharing a prompt prefix are read and
batched together so that an engine's prefix cache serves them, even when the input spreads
them over many shards."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa

from batchjobs.readers import PAYLOAD, Shard


def read_groups(
    shards: list[Shard], order: str, group_mb: int, group_shards: int = 8
) -> list[list[Shard]]:
    """Consecutive shards that one read task reads and (``order: prefix``) sorts as one.

    A group closes before the shard that would take it past ``group_mb`` MB of input as
    stored (a shard larger than that is a group of its own), so a read task holds a bounded
    amount, and at ``group_shards`` shards: sorting mixes the rows of a group's shards, so
    its shards finish, and commit, only when the whole group is done. With ``order:
    input``, ``group_mb`` 0 or ``group_shards`` 1 every shard is its own group.
    """
    if order != "prefix" or group_mb <= 0 or group_shards <= 1:
        return [[s] for s in shards]
    limit = group_mb << 20
    groups: list[list[Shard]] = []
    size = 0
    for shard in shards:
        if groups and len(groups[-1]) < group_shards and size + shard.size <= limit:
            groups[-1].append(shard)
            size += shard.size
        else:
            groups.append([shard])
            size = shard.size
    return groups


def group_by_prefix(tables: Iterable[pa.Table], batch_rows: int) -> Iterator[pa.Table]:
    """Sort the rows of one read group by their payload (the prompt, or the messages, as
    JSON: rows sharing a prompt prefix share a payload prefix), so rows sharing a prefix
    sit in the same and neighbouring batches; then cut batches of ``batch_rows``.

    The sort is bounded by the read group (``read_groups``), not the whole job: a global sort
    would hold every row back until the last shard is read, and no shard would commit
    before the end of the job.
    """
    parts = list(tables)
    if not parts:
        return
    table = pa.concat_tables(parts).sort_by(
        [(PAYLOAD, "ascending"), ("shard_id", "ascending"), ("row_index", "ascending")]
    )
    for start in range(0, table.num_rows, batch_rows):
        yield table.slice(start, batch_rows)
