"""Rows of a shard are grouped by prompt (prefix-cache affinity) without losing any."""

from __future__ import annotations

import pyarrow as pa

from batchjobs.pipeline import group_by_prefix
from batchjobs.readers import Shard, read_shard


def _shard(tmp_path, prompts):
    import pyarrow.parquet as pq

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    return Shard(
        shard_id="s", url=str(path), rel="s.parquet", format="parquet", size=1, version="v"
    )


def test_rows_sharing_a_prefix_land_in_the_same_batches(tmp_path):
    prefixes = ["DOC A " * 20, "DOC B " * 20, "DOC C " * 20]
    prompts = [f"{prefixes[i % 3]} question {i}" for i in range(30)]  # interleaved A B C A B C
    shard = _shard(tmp_path, prompts)
    batches = list(group_by_prefix(read_shard(shard, "prompt", None, batch_rows=4), 10))
    assert [b.num_rows for b in batches] == [10, 10, 10]
    for b, prefix in zip(batches, sorted(prefixes)):
        assert all(p.startswith(prefix) for p in b.column("prompt").to_pylist())
    rows = pa.concat_tables(batches)
    # nothing lost or duplicated, and each row keeps its own index and id
    assert sorted(rows.column("row_index").to_pylist()) == list(range(30))
    for p, i in zip(rows.column("prompt").to_pylist(), rows.column("row_index").to_pylist()):
        assert p == prompts[i]


def test_error_rows_and_empty_shards_survive_grouping(tmp_path):
    shard = _shard(tmp_path, ["b", None, "a", ""])
    rows = pa.concat_tables(list(group_by_prefix(read_shard(shard, "prompt", None), 3)))
    assert rows.column("row_index").to_pylist() == [3, 2, 0, 1]  # "" < "a" < "b" < null
    assert rows.column("input_error").is_null().to_pylist() == [False, True, True, False]
    assert list(group_by_prefix(iter([]), 3)) == []


def test_min_replicas_above_replicas_is_refused():
    import pytest

    from batchjobs.spec import ResourcesSpec

    assert ResourcesSpec(replicas=4, min_replicas=2).min_replicas == 2
    with pytest.raises(ValueError, match=r"min_replicas \(3\) is above replicas \(2\)"):
        ResourcesSpec(replicas=2, min_replicas=3)
