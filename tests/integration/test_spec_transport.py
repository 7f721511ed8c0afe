"""The validated spec crosses processes as itself: read tasks and engine actors on other
nodes re-check nothing, so a node without the model directory (a CPU head) can read.

A simulated two-node cluster and a stand-in engine: what is under test is where the spec
is (not) re-validated, not generation."""

from __future__ import annotations

import asyncio
import shutil
import sys

import pyarrow.dataset as pds
import pytest
import ray
from conftest import prompt_shards, spec_dict
from ray.cluster_utils import Cluster

from batchjobs.engines.base import Engine, Result

pytestmark = pytest.mark.integration


class Echo(Engine):
    kind = "fake"

    def __init__(self, spec):
        pass

    async def generate(self, request):
        await asyncio.sleep(0)
        return Result(text=request.prompt, finish_reason="stop", prompt_tokens=1)

    def close(self):
        pass


def echo_factory(spec):
    return Echo(spec)


@pytest.fixture(scope="module")
def two_nodes():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_model_directory_gone_after_validation_does_not_fail_read_tasks(
    tmp_path, tiny_model, two_nodes
):
    from batchjobs.errors import SpecError
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    prompt_shards(tmp_path / "in", shards=4, rows=10)
    spec = parse_spec(
        spec_dict(model, str(tmp_path / "in"), str(tmp_path / "out"), resources={"replicas": 2})
    )
    # The driver validated the spec (the model existed); the nodes that read and serve do not
    # have it: re-validating there would fail with "model ... does not exist".
    shutil.rmtree(model)
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(spec.model_dump())
    summary = run(spec, engine_factory=echo_factory)
    out = pds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert summary.rows == out.num_rows == 40 and out.column("error").null_count == 40
    assert sorted(out.column("text").to_pylist()) == sorted(
        f"p{s}-{i}" for s in range(4) for i in range(10)
    )
