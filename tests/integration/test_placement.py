"""Replica placement on a simulated multi-node cluster (nodes advertise fake GPUs).

A fake engine stands in for vLLM here: what is under test is where Ray puts replicas,
not generation (which tests/integration/test_e2e.py runs for real)."""

from __future__ import annotations

import asyncio
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import spec_dict
from ray.cluster_utils import Cluster

from batchjobs.engines.base import Engine, Result

pytestmark = pytest.mark.integration


class PlacementProbe(Engine):
    """Answers every request with where its replica runs: node id and the GPUs Ray gave it."""

    kind = "fake"

    def __init__(self, spec):
        self.where = (
            f"{ray.get_runtime_context().get_node_id()}|{os.environ.get('CUDA_VISIBLE_DEVICES')}"
        )

    async def generate(self, request):
        await asyncio.sleep(0.01)
        return Result(text=self.where, finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    def close(self):
        pass


def probe_factory(spec):
    return PlacementProbe(spec)


@pytest.fixture(scope="module")
def two_nodes_four_gpus():
    # workers cannot import this test module: ship its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 4})
    cluster.add_node(num_cpus=4, num_gpus=4)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_tp2_times_four_replicas_each_on_one_node(tmp_path, tiny_model, two_nodes_four_gpus):
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"prompt": [f"p{i}" for i in range(400)]}), tmp_path / "in" / "p.parquet"
    )
    spec = parse_spec(
        spec_dict(
            tiny_model,
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            engine={"tensor_parallel_size": 2, "device": "cuda"},
            resources={
                "replicas": 4,
                "batch_size": 10,
                "max_inflight_batches": 2,
                "num_cpus_per_replica": 0.5,
            },
        )
    )
    summary = run(spec, engine_factory=probe_factory)
    assert summary.rows == 400 and len(summary.replicas) == 4
    t = pq.read_table(tmp_path / "out")
    placements = set(t.column("text").to_pylist())
    assert len(placements) == 4  # four replicas served rows
    by_node: dict[str, list[str]] = {}
    for p in placements:
        node, gpus = p.split("|")
        assert len(gpus.split(",")) == 2  # each replica holds 2 GPUs of its own node
        by_node.setdefault(node, []).extend(gpus.split(","))
    assert len(by_node) == 2 and all(sorted(g) == ["0", "1", "2", "3"] for g in by_node.values())


def test_replica_larger_than_any_node_is_refused(tmp_path, tiny_model, two_nodes_four_gpus):
    from batchjobs.errors import SpecError
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["p"]}), tmp_path / "in" / "p.parquet")
    spec = parse_spec(
        spec_dict(
            tiny_model,
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            engine={"tensor_parallel_size": 8},
        )
    )
    with pytest.raises(SpecError, match="8 GPUs per replica, but the largest node has 4"):
        run(spec, engine_factory=probe_factory)
    spec = parse_spec(
        spec_dict(
            tiny_model,
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            engine={"tensor_parallel_size": 4},
            resources={"replicas": 3},
        )
    )
    with pytest.raises(SpecError, match="needs 12 GPUs; the cluster has 8"):
        run(spec, engine_factory=probe_factory)


def test_autoscaling_starts_on_the_minimum_and_grows_to_what_fits(
    tmp_path, tiny_model, two_nodes_four_gpus
):
    """min_replicas=1, replicas=3 of TP=4 on 8 GPUs: accepted although 3 × 4 > 8 (only the
    minimum must fit now); the pool grows past one replica and the job ends with every row,
    each replica's 4 GPUs on one node."""
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"prompt": [f"p{i}" for i in range(600)]}), tmp_path / "in" / "p.parquet"
    )
    spec = parse_spec(
        spec_dict(
            tiny_model,
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            engine={"tensor_parallel_size": 4, "device": "cuda"},
            resources={
                "replicas": 3,
                "min_replicas": 1,
                "batch_size": 5,
                "max_inflight_batches": 1,
                "num_cpus_per_replica": 0.5,
            },
        )
    )
    summary = run(spec, engine_factory=probe_factory)
    assert summary.rows == 600
    t = pq.read_table(tmp_path / "out")
    assert sorted(t.column("row_index").to_pylist()) == list(range(600))
    placements = set(t.column("text").to_pylist())
    assert 1 <= len(placements) <= 2  # never more replicas than the GPUs hold
    for p in placements:
        assert len(p.split("|")[1].split(",")) == 4
