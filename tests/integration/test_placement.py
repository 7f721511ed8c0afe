"""Replica placement on a simulated multi-node cluster (nodes advertise fake GPUs).

A fake engine stands in for vLLM here: what is under test is where Ray puts replicas,
not generation (which tests/integration/test_e2e.py runs for real). Two shapes of cluster:
a head and a node of 4 GPUs each, and one shaped like cluster/'s (a CPU head, two 8-GPU
nodes and a 4-GPU one), started one after the other (one Ray per process).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import spec_dict, tmp_spec
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


class Clusters:
    """One simulated cluster at a time, started in the shape a test asks for and kept for
    the next test of the same shape."""

    def __init__(self):
        self.cluster: Cluster | None = None
        self.shape: tuple | None = None

    def start(self, head_gpus: int, node_gpus: list[int]) -> Cluster:
        shape = (head_gpus, tuple(node_gpus))
        if self.shape == shape:
            return self.cluster
        self.stop()
        # held before its nodes start, so that stop() ends whatever did start
        self.cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": head_gpus}
        )
        for gpus in node_gpus:
            self.cluster.add_node(num_cpus=4, num_gpus=gpus)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address)
        self.shape = shape
        return self.cluster

    def stop(self) -> None:
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.cluster, self.shape = None, None


@pytest.fixture(scope="module")
def clusters():
    # workers cannot import this test module: ship its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = Clusters()
    yield pool
    pool.stop()


@pytest.fixture
def two_nodes_four_gpus(clusters):
    return clusters.start(head_gpus=4, node_gpus=[4])


@pytest.fixture
def h100_like(clusters):
    """cluster/'s shape: a CPU head (drivers only) and GPU nodes; one of 4 GPUs that an
    8-GPU replica cannot use."""
    return clusters.start(head_gpus=0, node_gpus=[8, 8, 4])


def test_tp2_times_four_replicas_each_on_one_node(tmp_path, tiny_model, two_nodes_four_gpus):
    from batchjobs.pipeline import run

    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"prompt": [f"p{i}" for i in range(400)]}), tmp_path / "in" / "p.parquet"
    )
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        engine={"tensor_parallel_size": 2, "device": "cuda"},
        resources={
            "replicas": 4,
            "batch_size": 10,
            "max_inflight_batches": 2,
            "num_cpus_per_replica": 0.5,
        },
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

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["p"]}), tmp_path / "in" / "p.parquet")
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        engine={"tensor_parallel_size": 8},
        resources={"scale_up_timeout_s": 0},
    )
    with pytest.raises(SpecError, match="8 GPUs per replica, but the largest node has 4"):
        run(spec, engine_factory=probe_factory)
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        engine={"tensor_parallel_size": 4},
        resources={"replicas": 3, "scale_up_timeout_s": 1},
    )
    # A joined cluster may have an autoscaler: asked, waited for, then refused.
    with pytest.raises(SpecError, match=r"needs 12 GPUs; the cluster has 8.*Waited \d+ s"):
        run(spec, engine_factory=probe_factory)


def test_autoscaling_starts_on_the_minimum_and_grows_to_what_fits(
    tmp_path, tiny_model, two_nodes_four_gpus
):
    """min_replicas=1, replicas=3 of TP=4 on 8 GPUs: accepted although 3 × 4 > 8 (only the
    minimum must fit now); the pool grows past one replica and the job ends with every row,
    each replica's 4 GPUs on one node."""
    from batchjobs.pipeline import run

    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"prompt": [f"p{i}" for i in range(600)]}), tmp_path / "in" / "p.parquet"
    )
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        engine={"tensor_parallel_size": 4, "device": "cuda"},
        resources={
            "replicas": 3,
            "min_replicas": 1,
            "batch_size": 5,
            "max_inflight_batches": 1,
            "num_cpus_per_replica": 0.5,
        },
    )
    summary = run(spec, engine_factory=probe_factory)
    assert summary.rows == 600
    t = pq.read_table(tmp_path / "out")
    assert sorted(t.column("row_index").to_pylist()) == list(range(600))
    placements = set(t.column("text").to_pylist())
    assert 1 <= len(placements) <= 2  # never more replicas than the GPUs hold
    for p in placements:
        assert len(p.split("|")[1].split(",")) == 4


def test_gpu_nodes_scaled_to_zero_are_asked_for_and_waited_on(
    tmp_path, tiny_model, clusters, monkeypatch
):
    """A cluster whose GPU nodes are scaled to zero (a CPU head only), as cluster/aws and
    an autoscaling KubeRay group leave it when idle: the job asks Ray's autoscaler for its
    replicas' GPUs, waits, runs once a node joins (here the test adds it, as an autoscaler
    would on the request), and withdraws the request after."""
    import ray.autoscaler.sdk

    from batchjobs.pipeline import run

    cluster = clusters.start(head_gpus=0, node_gpus=[])
    clusters.shape = None  # the node this test adds changes the shape: not for reuse
    asked: list = []
    real = ray.autoscaler.sdk.request_resources

    def recording(*args, **kwargs):
        asked.append(kwargs.get("bundles"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", recording)

    ids = id_shards(tmp_path / "in", shards=2, rows=20)
    lines: list[str] = []
    spec = tp_spec(
        tiny_model, tmp_path / "in", tmp_path / "out", replicas=1, scale_up_timeout_s=300
    )
    done: list = []

    def job():
        try:
            done.append(run(spec, engine_factory=probe_factory, progress=lines.append))
        except BaseException as exc:  # noqa: BLE001 - reported below
            done.append(exc)

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    # What an autoscaler does on the request: a GPU node joins (Cluster.add_node works on
    # the main thread only, so the job runs on another).
    deadline = time.monotonic() + 120
    while not asked and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert asked, (done, lines)
    cluster.add_node(num_cpus=4, num_gpus=8)
    runner.join(timeout=600)
    [summary] = done
    assert not isinstance(summary, BaseException), summary
    assert asked == [[{"GPU": 8, "CPU": 0.5}], []]  # one replica's node, then withdrawn
    assert any("asked the autoscaler for 1 node slot(s) of 8 GPU(s)" in ln for ln in lines)
    assert any("GPU nodes joined after" in ln for ln in lines)
    assert summary.rows == len(ids)
    got = pq.read_table(tmp_path / "out").column("id").to_pylist()
    assert sorted(got) == sorted(ids)


def gpu_nodes() -> dict[str, int]:
    """node id -> GPUs, of the live nodes."""
    return {n["NodeID"]: int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]}


def tp_spec(tiny_model, inp: Path, out: Path, replicas: int, tp: int = 8, **resources):
    from batchjobs.spec import parse_spec

    return parse_spec(
        spec_dict(
            tiny_model,
            str(inp),
            str(out),
            input={"id_column": "id"},
            engine={"tensor_parallel_size": tp, "device": "cuda"},
            resources={
                "replicas": replicas,
                "batch_size": 10,
                "max_inflight_batches": 2,
                "num_cpus_per_replica": 0.5,
                **resources,
            },
        )
    )


def id_shards(inp: Path, shards: int, rows: int) -> set[str]:
    inp.mkdir()
    ids = set()
    for s in range(shards):
        batch = [f"r{s}-{i}" for i in range(rows)]
        pq.write_table(pa.table({"id": batch, "prompt": batch}), inp / f"{s}.parquet")
        ids.update(batch)
    return ids


def test_tp8_replicas_each_hold_one_whole_8_gpu_node(tmp_path, tiny_model, h100_like):
    """Two TP=8 replicas on a CPU head + 8 + 8 + 4 GPUs: one on each 8-GPU node, each with
    all 8 of its node's GPUs; nothing on the head or the 4-GPU node."""
    from batchjobs.pipeline import run

    ids = id_shards(tmp_path / "in", shards=4, rows=100)
    summary = run(
        tp_spec(tiny_model, tmp_path / "in", tmp_path / "out", replicas=2),
        engine_factory=probe_factory,
    )
    assert summary.rows == 400 and len(summary.replicas) == 2
    t = pq.read_table(tmp_path / "out")
    assert sorted(t.column("id").to_pylist()) == sorted(ids)
    gpus = gpu_nodes()
    placements = set(t.column("text").to_pylist())
    assert len(placements) == 2
    nodes = []
    for p in placements:
        node, visible = p.split("|")
        assert gpus[node] == 8
        assert sorted(visible.split(","), key=int) == [str(i) for i in range(8)]
        nodes.append(node)
    assert len(set(nodes)) == 2  # one replica per node: no replica spans two


def test_replica_larger_than_the_cpu_heads_nodes_is_refused_before_start(
    tmp_path, tiny_model, h100_like
):
    """TP=16 cannot ride one node's NVLink here (the largest node has 8): refused, not split
    over two nodes."""
    from batchjobs.errors import SpecError
    from batchjobs.pipeline import run

    id_shards(tmp_path / "in", shards=1, rows=1)
    spec = tp_spec(
        tiny_model, tmp_path / "in", tmp_path / "out", replicas=1, tp=16, scale_up_timeout_s=0
    )
    with pytest.raises(SpecError, match="16 GPUs per replica, but the largest node has 8"):
        run(spec, engine_factory=probe_factory)


class SlowProbe(PlacementProbe):
    """A probe slow enough that a node can be removed while the job runs; it notes each row
    it serves (its node id, a line per row) in served/ beside the output root."""

    def __init__(self, spec):
        super().__init__(spec)
        served = Path(spec.output.path).parent / "served"
        served.mkdir(exist_ok=True)
        self.log = served / f"{os.getpid()}.txt"

    async def generate(self, request):
        await asyncio.sleep(0.3)
        with open(self.log, "a") as f:
            f.write(self.where.split("|")[0] + "\n")
        return await super().generate(request)


def slow_probe_factory(spec):
    return SlowProbe(spec)


def test_node_removed_mid_job_loses_no_rows(tmp_path, tiny_model, h100_like):
    """A TP=8 replica's node (and the 4-GPU node) go away after an eighth of the rows are
    served: Ray restarts the replica on the other 8-GPU node, its rows in flight run again
    there, the job goes on, and every input id comes out exactly once. (Last in this
    module: it leaves the cluster two nodes short.)"""
    from batchjobs.pipeline import run

    ids = id_shards(tmp_path / "in", shards=8, rows=60)
    out = tmp_path / "out"
    # one batch of 10 in the engine at a time, 0.3 s each: about 30 rows/s
    spec = tp_spec(
        tiny_model, tmp_path / "in", out, replicas=1, max_restarts=4, max_inflight_batches=1
    )
    removed: list[str] = []
    errors: list[BaseException] = []

    def remove_the_replicas_node():
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                lines = [
                    ln for f in (tmp_path / "served").glob("*.txt") for ln in f.read_text().split()
                ]
                if len(lines) >= 60:  # an eighth of the rows served
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("60 rows not served within 300 s")
            [node_id] = set(lines)
            # the replica's node and the 4-GPU one: only the head and the spare 8-GPU node
            # stay, so whatever the job placed on the others must come back elsewhere
            gone = [
                n
                for n in h100_like.list_all_nodes()
                if n.node_id == node_id or gpu_nodes().get(n.node_id) == 4
            ]
            assert len(gone) == 2
            for node in gone:
                h100_like.remove_node(node, allow_graceful=False)
            removed.append(node_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    remover = threading.Thread(target=remove_the_replicas_node, daemon=True)
    remover.start()
    summary = run(spec, engine_factory=slow_probe_factory)
    remover.join(timeout=60)
    assert not errors, errors
    assert removed, "the node was never removed"
    assert summary.rows == len(ids)
    t = pq.read_table(out)
    got = t.column("id").to_pylist()
    assert len(got) == len(ids) and set(got) == ids  # each id once: none lost, none twice
    assert t.column("error").null_count == len(got)
    nodes = {p.split("|")[0] for p in t.column("text").to_pylist()}
    assert removed[0] in nodes  # rows served before the node went
    assert len(nodes) == 2  # and the rest on the other 8-GPU node
    assert all(gpu_nodes().get(n, 8) == 8 for n in nodes)
