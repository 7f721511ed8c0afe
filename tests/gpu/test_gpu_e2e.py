"""On a CUDA host (BATCHJOBS_GPU_TESTS=1): the same pipeline on vLLM for GPUs.

Run on the GPU machine with the bundle from ../shared/gpu/make_bundle.sh:
    BATCHJOBS_GPU_TESTS=1 PYTHONPATH=/tmp/site:. python3 -m pytest tests/gpu -q
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.gpu


def test_generate_on_gpu_with_dummy_7b(tmp_path):
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec
    from batchjobs.tools.models import build_model

    model = build_model(tmp_path / "llama7b", "llama-7b")
    (tmp_path / "in").mkdir()
    prompts = [f"Request {i}: explain the cost of the night job" for i in range(64)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in" / "p.parquet")
    spec = parse_spec(
        {
            "name": "gpu",
            "input": {"path": str(tmp_path / "in")},
            "output": {"path": str(tmp_path / "out")},
            "engine": {
                "model": str(model),
                "max_model_len": 1024,
                "args": {"load_format": "dummy"},
            },
            "sampling": {"max_tokens": 16, "ignore_eos": True},
        }
    )
    summary = run(spec)
    assert (summary.rows, summary.error_rows, summary.completion_tokens) == (64, 0, 64 * 16)
    t = pds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert t.num_rows == 64 and t.column("error").null_count == 64
    # The replica caps requests in its engine at twice vLLM's max_num_seqs (1024 for the
    # offline LLM class on an H100/H200, so 2048; whatever vLLM resolved on other GPUs).
    (rep,) = summary.replicas.values()
    print("replica:", rep)
    assert rep["inflight_limit"] >= 2 * 256 and rep["inflight_limit"] % 2 == 0, rep
    # Warm start forks vLLM's engine core from a fork server that is not the actor's child:
    # nothing of it may outlive the job and hold the GPU (seen once on an H200).
    deadline = time.time() + 30
    while _engine_processes() and time.time() < deadline:
        time.sleep(1)
    assert not _engine_processes(), _engine_processes()


def _engine_processes() -> list[str]:
    import psutil

    names = []
    for p in psutil.process_iter(["name", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if p.info["name"].startswith("VLLM::") or "multiprocessing.forkserver" in line:
            names.append(f"{p.pid} {p.info['name']} {line[:80]}")
    return names
