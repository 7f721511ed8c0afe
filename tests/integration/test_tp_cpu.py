"""engine.tensor_parallel_size reaches vLLM: a TP=2 vLLM CPU engine runs a job end to end.

On CPU a replica asks Ray for no GPUs, so only vLLM itself splits the model: two TP workers,
each pinned to one core by VLLM_CPU_OMP_THREADS_BIND (passed through engine.env). One engine
start; 8 rows of 4 tokens (one batch). TP=2 output text is not compared with TP=1:
on the tiny random model the different reduction order flips near-tied greedy choices (seen:
4 of 20 rows differ after a common prefix, token counts all equal).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import ray
from conftest import tmp_spec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not {0, 1} <= os.sched_getaffinity(0), reason="TP=2 on CPU binds one worker to cores 0, 1"
    ),
]


def _probing_factory(probe: str, spec):
    """Build the real vLLM engine, then record what vLLM made of the spec (in the actor)."""
    import psutil
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from batchjobs.engines.vllm import VLLMEngine

    engine = VLLMEngine(spec)
    parallel = engine.engine.vllm_config.parallel_config
    sched = engine.engine.vllm_config.scheduler_config
    tokens, seqs = AsyncEngineArgs.get_batch_defaults(parallel.world_size)
    procs = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    workers = [p for p in procs if p.name().startswith("VLLM::Worker")]
    cores = list({w.parent().pid: w.parent() for w in workers}.values())  # vLLM's engine core
    servers = [c.parent() for c in cores]
    Path(probe).write_text(
        json.dumps(
            {
                "tp": parallel.tensor_parallel_size,
                "world_size": parallel.world_size,
                "backend": parallel.distributed_executor_backend,
                "workers": sorted(p.name() for p in workers),
                "pids": [[p.pid, p.create_time()] for p in workers + cores + servers],
                # Warm start: the engine core is forked from the fork server that imported
                # vLLM beside the actor, not spawned by the actor (engines/warmstart.py).
                "engine_core_parents": [[" ".join(p.cmdline()), p.ppid()] for p in servers],
                "actor": os.getpid(),
                # The scheduler limits vLLM's offline LLM class would choose here.
                "limits": [sched.max_num_seqs, sched.max_num_batched_tokens],
                "llm_class_limits": [seqs[UsageContext.LLM_CLASS], tokens[UsageContext.LLM_CLASS]],
            }
        )
    )
    return engine


def _alive(pids: list) -> list[int]:
    """Those of the recorded worker processes that still run (not a reused pid)."""
    import psutil

    alive = []
    for pid, created in pids:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and proc.status() != "zombie":
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill(pids: list[int]) -> None:
    import psutil

    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def test_tensor_parallel_2_on_cpu(tmp_path, tiny_model, ray_session):
    from batchjobs.pipeline import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    inp = tmp_path / "in"
    inp.mkdir()
    prompts = {f"r{i}": f"tell me about the river number {i}" for i in range(8)}
    pq.write_table(
        pa.table({"id": list(prompts), "prompt": list(prompts.values())}), inp / "p.parquet"
    )
    out = tmp_path / "out"
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        input={"id_column": "id"},
        engine={
            "tensor_parallel_size": 2,
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        },
        sampling={"max_tokens": 4, "temperature": 0.0, "ignore_eos": True},
    )
    probe = tmp_path / "probe.json"
    summary = run(spec, engine_factory=functools.partial(_probing_factory, str(probe)))

    seen = json.loads(probe.read_text())
    # The engine's close() stops vLLM's workers: they used to spin on both cores for up to
    # a minute after the job, slowing whatever started next.
    pids = seen.pop("pids")
    parents, actor = seen.pop("engine_core_parents"), seen.pop("actor")
    assert len(parents) == 1, parents
    assert "multiprocessing.forkserver" in parents[0][0] and parents[0][1] == actor, parents
    # The engine runs with the limits vLLM tunes for offline batches (as LLM.generate does),
    # not the embedded-engine defaults (128 sequences, 2048 tokens per step).
    limits, llm_class = seen.pop("limits"), seen.pop("llm_class_limits")
    assert limits == llm_class and limits != [128, 2048], (limits, llm_class)
    deadline = time.time() + 20
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.5)
    left = _alive(pids)
    _kill(left)
    assert not left, f"vLLM processes {left} (workers, engine core, fork server) outlived the job"
    # vLLM really ran the model split over two TP workers (TP=1 gives one "VLLM::Worker")
    assert seen == {
        "tp": 2,
        "world_size": 2,
        "backend": "mp",
        "workers": ["VLLM::Worker_TP0", "VLLM::Worker_TP1"],
    }
    assert (summary.rows, summary.error_rows, summary.shards_run) == (8, 0, 1)
    assert len(summary.replicas) == 1
    # The replica keeps twice what this vLLM engine runs at once in it (max_num_seqs as vLLM
    # resolved it), capping in-flight work per request.
    (rep,) = summary.replicas.values()
    assert rep["inflight_limit"] == 2 * limits[0], (rep, limits)
    rows = {r["id"]: r for r in pds.dataset(str(out), format="parquet").to_table().to_pylist()}
    assert set(rows) == set(prompts)
    for k in prompts:
        r = rows[k]
        assert r["error"] is None, r["error"]
        assert (r["finish_reason"], r["completion_tokens"]) == ("length", 4)
        assert r["prompt_tokens"] > 0 and r["text"]
    assert summary.completion_tokens == 8 * 4
