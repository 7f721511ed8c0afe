"""Integration fixtures: the tiny real model, a local Ray shared by the session, and helpers.

These tests start real vLLM CPU engines (~30-45 s each on 2 cores), so there are few of
them and each checks a lot.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The repo's tiny Llama (scripts/setup.sh builds it), or a fresh one for this session."""
    shipped = REPO / "models" / "tiny-llama"
    if (shipped / "model.safetensors").exists():
        return shipped
    from batchjobs.tools.models import build_model

    return build_model(tmp_path_factory.mktemp("model") / "tiny-llama", "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for the in-process tests of a module (started like `batchjobs run` would)."""
    import ray

    from batchjobs.cluster import connect_ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Set by vLLM in a process that ran an engine; Ray's workers would inherit it.
    leaked = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    assert leaked is None, f"an earlier test left VLLM_WORKER_MULTIPROC_METHOD={leaked}"
    connect_ray()
    yield
    ray.shutdown()


def spec_dict(model: Path, inp: str, out: str, **over) -> dict:
    spec = {
        "name": "it",
        "input": {"path": inp, "prompt_column": "prompt"},
        "output": {"path": out},
        "engine": {
            "model": str(model),
            "max_model_len": 256,
            "args": {"enforce_eager": True},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        },
        "sampling": {"max_tokens": 8, "temperature": 0.0},
        "resources": {
            "replicas": 1,
            "batch_size": 8,
            "max_inflight_batches": 8,
            "num_cpus_per_replica": 1,
        },
    }
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def tmp_spec(model: Path, tmp_path: Path, **over):
    """The parsed spec of a job over tmp_path/in into tmp_path/out (``over`` as for
    ``spec_dict``)."""
    from batchjobs.spec import parse_spec

    return parse_spec(spec_dict(model, str(tmp_path / "in"), str(tmp_path / "out"), **over))


def prompt_shards(inp: Path, shards: int, rows: int) -> None:
    """``shards`` Parquet files in ``inp`` of ``rows`` prompts each, "p<shard>-<row>"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp.mkdir()
    for s in range(shards):
        pq.write_table(
            pa.table({"prompt": [f"p{s}-{i}" for i in range(rows)]}), inp / f"{s}.parquet"
        )
