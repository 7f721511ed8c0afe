"""Rows of a shard are grouped by prompt (prefix-cache affinity) without losing any."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batchjobs.ordering import group_by_prefix, read_groups
from batchjobs.readers import Shard, read_shard


def _prompts(batch: pa.Table) -> list[str | None]:
    """The prompt each row of a read batch carries (None: an input error, no payload)."""
    return [json.loads(p)["prompt"] if p else None for p in batch.column("payload").to_pylist()]


def _shard(tmp_path, prompts):
    import pyarrow.parquet as pq

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    return Shard(
        shard_id="s", url=str(path), rel="s.parquet", format="parquet", size=1, version="v"
    )


def test_rows_sharing_a_prefix_land_in_the_same_batches(tmp_path, read_columns):
    prefixes = ["DOC A " * 20, "DOC B " * 20, "DOC C " * 20]
    prompts = [f"{prefixes[i % 3]} question {i}" for i in range(30)]  # interleaved A B C A B C
    shard = _shard(tmp_path, prompts)
    batches = list(group_by_prefix(read_shard(shard, read_columns(), batch_rows=4), 10))
    assert [b.num_rows for b in batches] == [10, 10, 10]
    for b, prefix in zip(batches, sorted(prefixes)):
        assert all(p.startswith(prefix) for p in _prompts(b))
    rows = pa.concat_tables(batches)
    # nothing lost or duplicated, and each row keeps its own index and id
    assert sorted(rows.column("row_index").to_pylist()) == list(range(30))
    for p, i in zip(_prompts(rows), rows.column("row_index").to_pylist()):
        assert p == prompts[i]


def test_error_rows_and_empty_shards_survive_grouping(tmp_path, read_columns):
    shard = _shard(tmp_path, ["b", None, "a", ""])
    rows = pa.concat_tables(list(group_by_prefix(read_shard(shard, read_columns()), 3)))
    # "a" < "b", then the error rows (no payload: null sorts last) in row order
    assert rows.column("row_index").to_pylist() == [2, 0, 1, 3]
    assert rows.column("input_error").is_null().to_pylist() == [True, True, False, False]
    assert _prompts(rows) == ["a", "b", None, None]
    assert list(group_by_prefix(iter([]), 3)) == []


def test_min_replicas_above_replicas_is_refused():
    from batchjobs.spec import ResourcesSpec

    assert ResourcesSpec(replicas=4, min_replicas=2).min_replicas == 2
    with pytest.raises(ValueError, match=r"min_replicas \(3\) is above replicas \(2\)"):
        ResourcesSpec(replicas=2, min_replicas=3)


def _sized(name: str, mb: float) -> Shard:
    return Shard(
        shard_id=name, url=name, rel=name, format="parquet", size=int(mb * 2**20), version="v"
    )


def test_read_groups_bound_the_input_one_task_sorts():
    shards = [_sized(n, mb) for n, mb in [("a", 30), ("b", 30), ("c", 10), ("d", 100), ("e", 1)]]
    ids = lambda groups: [[s.shard_id for s in g] for g in groups]  # noqa: E731
    # a+b = 60 MB; c would make 70 > 64; d alone is over the limit; e starts a new group
    assert ids(read_groups(shards, "prefix", 64)) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert ids(read_groups(shards, "prefix", 1000)) == [["a", "b", "c", "d", "e"]]
    # file order, or grouping turned off: one shard per read task, as before
    singletons = [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert ids(read_groups(shards, "input", 64)) == singletons
    assert ids(read_groups(shards, "prefix", 0)) == singletons
    assert read_groups([], "prefix", 64) == []


def test_read_groups_hold_at_most_group_shards_shards():
    """Many small shards: the MB limit alone would make one group of all of them (each
    shard then written as one tiny file per write batch); the shard cap closes groups."""
    shards = [_sized(f"s{k:02d}", 0.1) for k in range(20)]
    sizes = lambda groups: [len(g) for g in groups]  # noqa: E731
    assert sizes(read_groups(shards, "prefix", 64)) == [8, 8, 4]  # the default cap
    assert sizes(read_groups(shards, "prefix", 64, 5)) == [5, 5, 5, 5]
    assert sizes(read_groups(shards, "prefix", 64, 100)) == [20]
    assert sizes(read_groups(shards, "prefix", 64, 1)) == [1] * 20
    assert [s for g in read_groups(shards, "prefix", 64, 3) for s in g] == shards  # in order


def test_a_read_group_sorts_rows_of_all_its_shards_as_one(tmp_path):
    """Three shards each hold questions about the same three documents: read as one group,
    every batch holds one document's rows, whichever shard they came from."""
    import pyarrow.parquet as pq

    from batchjobs.graph import _read_fn
    from batchjobs.spec import parse_spec

    docs = ["DOC A " * 20, "DOC B " * 20, "DOC C " * 20]
    shards = []
    for k in range(3):
        path = tmp_path / f"s{k}.parquet"
        pq.write_table(pa.table({"prompt": [f"{docs[i % 3]} q{k}-{i}" for i in range(6)]}), path)
        shards.append(
            Shard(
                shard_id=f"s{k}",
                url=str(path),
                rel=path.name,
                format="parquet",
                size=1,
                version="v",
            )
        )
    spec = parse_spec(
        {
            "name": "g",
            "input": {"path": str(tmp_path / "*.parquet")},
            "output": {"path": str(tmp_path / "out")},
            "engine": {"model": str(tmp_path)},
        }
    )
    batch = pa.table({"shards": [json.dumps([s.to_dict() for s in shards])]})
    batches = list(_read_fn(batch, spec, batch_rows=6))
    assert [b.num_rows for b in batches] == [6, 6, 6]
    for b, doc in zip(batches, docs):
        assert all(p.startswith(doc) for p in _prompts(b))
        assert len(set(b.column("shard_id").to_pylist())) == 3  # rows of every shard
    rows = pa.concat_tables(batches)
    assert sorted(
        zip(rows.column("shard_id").to_pylist(), rows.column("row_index").to_pylist())
    ) == [(f"s{k}", i) for k in range(3) for i in range(6)]
