"""Fault tests on a real local Ray and the real vLLM CPU engine: engine actors killed mid-job,
and a driver killed mid-job then rerun. Every input row must come out exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from conftest import REPO, tmp_spec
from jobhelpers import cli_job, committed, kill_after_commits, write_shards, written_ids

from batchjobs.sink import OutputRoot

pytestmark = pytest.mark.integration


# The engine replica (its own actor: the driver starts it before Ray Data's plan) and Ray
# Data's actor that forwards batches to it.
REPLICA = "ray::EarlyReplica"
FORWARDER = "ray::MapWorker(MapBatches(EngineStage))"


def _engine_actor_pids(title: str = REPLICA) -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(title):
            pids.append(p.info["pid"])
    return pids


def test_engine_actor_killed_three_times(tmp_path, tiny_model, ray_session):
    from batchjobs.pipeline import run

    # The engine in a replica the driver starts (the default on GPUs; on CPU when asked
    # for), fed by Ray Data's actor: both processes are killed below.
    # One batch of 2 rows at a time and 64 tokens each: slow enough that three kills land
    # while work remains (a restarted replica finishes queued work in a burst).
    ids = write_shards(tmp_path / "in", shards=3, rows=100)
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        input={"id_column": "id"},
        sampling={"max_tokens": 64, "ignore_eos": True},
        resources={
            "batch_size": 2,
            "max_inflight_batches": 1,
            "rows_per_file": 2,
            "max_restarts": 8,
        },
    )
    out_root = tmp_path / "out"
    kills: list[tuple[int, int | None]] = []
    finished = threading.Event()

    def staged_files() -> int:
        # write tasks stage a file per finished batch at once, so files on disk are the
        # surest sign that a (restarted) replica is serving
        return len(list(out_root.glob("*/*.parquet"))) + len(
            list(out_root.glob("_staging/*/*.parquet"))
        )

    def killer() -> None:
        target = 5
        # The engine's process twice; between them once the Ray Data actor that forwards to
        # it (restarted, it must find the same replica again).
        for title in (REPLICA, FORWARDER, REPLICA):
            while staged_files() < target and not finished.is_set():
                time.sleep(0.1)
            pids = _engine_actor_pids(title)
            deadline = time.time() + 30
            while not pids and time.time() < deadline and not finished.is_set():
                time.sleep(0.2)
                pids = _engine_actor_pids(title)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
            kills.append((staged_files(), pids[0] if pids else None))
            target = staged_files() + 3  # the next kill only after the restarted one served

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        summary = run(spec, placement="replicas")
    finally:
        finished.set()
    assert len(kills) == 3, kills
    assert len({pid for _, pid in kills if pid}) == 3, kills  # three different processes
    out = pds.dataset(str(out_root), format="parquet").to_table()
    got = out.column("id").to_pylist()
    assert len(got) == 300 and set(got) == ids  # nothing lost, nothing twice
    assert out.column("error").null_count == 300
    assert summary.rows == 300 and summary.completion_tokens == 300 * 64


def test_driver_killed_then_rerun_skips_committed_shards(tmp_path, tiny_model):
    ids = write_shards(tmp_path / "in", shards=6, rows=60)
    out = tmp_path / "out"
    cmd, env = cli_job(tmp_path, tiny_model, out)
    kill_after_commits(cmd, env, OutputRoot(str(out)), commits=2)
    first = {sid: r.committed_at for sid, r in committed(out).items()}
    assert 2 <= len(first) < 6
    time.sleep(2)

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"shards: {6 - len(first)} run, {len(first)} skipped" in rerun.stdout
    records = [json.loads(line) for line in (out / "_manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["status"] == "committed" for r in records)
    # the shards committed before the kill were not redone: same commit time as before
    assert {r["shard_id"]: r["committed_at"] for r in records if r["shard_id"] in first} == first
    got = written_ids(out)
    assert len(got) == 360 and set(got) == ids
    assert not (out / "_staging").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 48 KiB tmpfs: the output filesystem fills up part way through the job."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_output_filesystem_failing_midway(tmp_path, tiny_model, small_fs):
    ids = write_shards(tmp_path / "in", shards=6, rows=60)
    out = small_fs / "out"
    cmd, env = cli_job(tmp_path, tiny_model, out)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 5, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert err and "No space left on device" in err[-1] and str(out) in err[-1]
    # whatever was committed is whole; nothing else is visible to readers
    done = {sid: r.rows for sid, r in committed(out).items()}
    assert len(done) < 6
    visible = [p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert sorted(visible) == sorted(done)
    for sid, rows in done.items():
        assert pq.read_table(out / sid).num_rows == rows == 60
    assert len(ids) == 360


class _BrokenEngine:
    """Stands in for an engine whose start fails (bad weights, out of memory)."""

    def __init__(self, spec):
        raise RuntimeError("CUDA out of memory while loading weights")


def _broken_factory(spec):
    return _BrokenEngine(spec)


def test_engine_start_failure_fails_fast_with_one_clear_error(tmp_path, tiny_model, ray_session):
    import ray

    from batchjobs.errors import EngineError
    from batchjobs.pipeline import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "in" / "p.parquet")
    spec = tmp_spec(tiny_model, tmp_path)
    with pytest.raises(EngineError) as err:
        run(spec, engine_factory=_broken_factory)
    msg = str(err.value)
    assert "failed to start" in msg and "CUDA out of memory while loading weights" in msg
    assert str(tiny_model) in msg and "replica" in msg
    assert not list((tmp_path / "out").glob("*/*.parquet"))


class _DyingEngine:
    """Stands in for an engine that dies on its first request (a crashed engine core)."""

    def __init__(self, spec):
        pass

    def max_model_len(self):
        return None

    async def generate(self, request):
        from batchjobs.engines.base import EngineDead

        raise EngineDead("engine core exited")

    def max_concurrency(self):
        return None

    def close(self):
        pass


def _dying_factory(spec):
    return _DyingEngine(spec)


def test_replica_dead_for_good_fails_the_job_with_one_clear_error(
    tmp_path, tiny_model, ray_session
):
    """With no restarts left, a replica whose engine died takes the job down with an
    EngineError that says so, not with Ray's actor-died traceback."""
    import ray

    from batchjobs.errors import EngineError
    from batchjobs.pipeline import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "in" / "p.parquet")
    spec = tmp_spec(tiny_model, tmp_path, resources={"max_restarts": 0})
    with pytest.raises(EngineError) as err:
        run(spec, engine_factory=_dying_factory, placement="replicas")  # the driver's replica
    msg = str(err.value)
    assert "died and Ray did not restart it" in msg and str(tiny_model) in msg
    assert not list((tmp_path / "out").glob("*/*.parquet"))
