"""Stopping and failing cleanly, on a real local Ray: `batchjobs run` stopped by SIGTERM on
the real vLLM CPU engine and rerun; a real engine that cannot start (its KV cache larger
than the machine's memory) failing the job with the cause in one line; a hung engine
treated as dead and restarted; the driver killed in the middle of a shard's commit and
rerun. Every input id comes out exactly once after the rerun.
(Repeated engine kills and a driver killed between commits: test_faults.py; a node removed
mid-job on a simulated cluster: test_placement.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, spec_dict, tmp_spec
from jobhelpers import cli_job, committed, start_job, write_shards, written_ids

from batchjobs.engines.base import Engine, Result
from batchjobs.layout import MANIFEST_DELTAS, RUNS
from batchjobs.sink import OutputRoot

pytestmark = pytest.mark.integration


def _runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RUNS).read_text().splitlines()]


def _session(sid: int) -> list[str]:
    """The processes still in the session the driver led (Ray, its workers, vLLM)."""
    left = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.info["pid"]) == sid:
                left.append(" ".join(p.cmdline())[:100])
        except (OSError, psutil.Error):
            continue
    return left


def test_sigterm_stops_records_and_a_rerun_finishes(tmp_path, tiny_model):
    ids = write_shards(tmp_path / "in", shards=6, rows=60)
    out = tmp_path / "out"
    cmd, env = cli_job(tmp_path, tiny_model, out, "--stop-grace", "60")
    pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    proc = start_job(cmd, env, OutputRoot(str(out)), 1, **pipes)
    assert proc.poll() is None, "the job ended before it could be stopped"
    engines = _session(proc.pid)
    assert any("EngineStage" in p for p in engines), engines  # the engine is up
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "stopping on SIGTERM" in err and "stopped by SIGTERM" in err
    assert "Traceback" not in err and "SIGTERM received" not in err  # nor Ray's stack dump
    # The run is recorded, with the shards it committed, in a compacted manifest.
    done = committed(out)
    assert 1 <= len(done) < 6
    assert not (out / MANIFEST_DELTAS).exists()
    run = _runs(out)[-1]
    assert (run["status"], run["exit_code"]) == ("stopped", 143)
    assert run["reason"].startswith("stopped by SIGTERM")
    assert run["shards_committed"] == len(done)
    # Nothing left behind: Ray, its workers, vLLM's engine core and workers end with it.
    deadline = time.time() + 60
    while _session(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert _session(proc.pid) == []
    # The rerun does the rest; every row once.
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"shards: {6 - len(done)} run, {len(done)} skipped" in rerun.stdout
    got = written_ids(out)
    assert len(got) == len(ids) and set(got) == ids
    assert not (out / "_staging").exists()
    assert [r["status"] for r in _runs(out)] == ["stopped", "succeeded"]


def test_engine_that_cannot_start_fails_the_job_with_the_cause(tmp_path, tiny_model, ray_session):
    """The real vLLM CPU engine asked for a KV cache far larger than any machine's memory:
    its engine core fails; the job fails at the first start (no restarts) with vLLM's
    reason, in one line."""
    from batchjobs.errors import EngineError
    from batchjobs.pipeline import run

    write_shards(tmp_path / "in", shards=1, rows=4)
    spec = tmp_spec(tiny_model, tmp_path, engine={"env": {"VLLM_CPU_KVCACHE_SPACE": "100000"}})
    with pytest.raises(EngineError) as err:
        run(spec)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"for model '{tiny_model}' failed to start: ValueError: " in msg
    assert "less than requested memory for kv (100000.0 GiB)" in msg
    [rec] = _runs(tmp_path / "out")
    assert (rec["status"], rec["exit_code"]) == ("failed", 4)
    assert "failed to start: ValueError: Available memory" in rec["reason"]


class HangingEngine(Engine):
    """Serves requests at once, except that the first engine ever started hangs on its
    third request, blocking its event loop (as a stuck engine core would)."""

    kind = "hanging"

    def __init__(self, spec, probe: str):
        self.probe = Path(probe)
        starts = sorted(self.probe.glob("start-*"))
        self.hangs = not starts
        (self.probe / f"start-{len(starts)}").write_text(str(os.getpid()))
        self.served = 0

    async def generate(self, request):
        self.served += 1
        if self.hangs and self.served == 3:
            time.sleep(3600)
        return Result(text="ok", finish_reason="stop", prompt_tokens=2, completion_tokens=1)

    def close(self):
        pass


def _hanging(probe, spec):
    return HangingEngine(spec, probe)


def test_hung_engine_is_restarted_and_every_row_comes_out_once(tmp_path, tiny_model, ray_session):
    import functools

    import ray

    from batchjobs.pipeline import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    ids = write_shards(tmp_path / "in", shards=2, rows=20)
    probe = tmp_path / "probe"
    probe.mkdir()
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        input={"id_column": "id"},
        resources={"batch_size": 4, "stall_timeout_s": 2},
    )
    summary = run(spec, engine_factory=functools.partial(_hanging, str(probe)))
    starts = sorted(probe.glob("start-*"))
    assert len(starts) == 2  # the hung engine, then the one Ray restarted
    hung = int(starts[0].read_text())
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == "zombie"
    got = written_ids(tmp_path / "out")
    assert len(got) == len(ids) and set(got) == ids
    assert summary.rows == len(ids) and summary.error_rows == 0


class StuckEngine(Engine):
    """Every engine started hangs on its first request."""

    kind = "stuck"

    def __init__(self, spec):
        pass

    async def generate(self, request):
        time.sleep(3600)

    def close(self):
        pass


def _stuck(spec):
    return StuckEngine(spec)


def test_an_engine_that_keeps_hanging_fails_the_job_as_an_engine_failure(
    tmp_path, tiny_model, ray_session
):
    """Past resources.max_restarts the job fails with exit 4 and says why, not with Ray
    Data's empty SystemException."""
    import ray

    from batchjobs.errors import EngineError
    from batchjobs.pipeline import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    write_shards(tmp_path / "in", shards=1, rows=4)
    spec = tmp_spec(tiny_model, tmp_path, resources={"max_restarts": 1, "stall_timeout_s": 1})
    with pytest.raises(EngineError, match="died and Ray did not restart it"):
        run(spec, engine_factory=_stuck)
    assert not list((tmp_path / "out").glob("*/*.parquet"))


_KILL_MID_COMMIT = textwrap.dedent(
    """
    import asyncio, os, sys
    import yaml
    from batchjobs import manifest, pipeline
    from batchjobs.engines.base import Engine, Result
    from batchjobs.spec import parse_spec

    class Instant(Engine):
        kind = "instant"
        def __init__(self, spec):
            pass
        async def generate(self, request):
            await asyncio.sleep(0)
            return Result(text="ok", finish_reason="stop", prompt_tokens=2, completion_tokens=1)
        def close(self):
            pass

    def instant(spec):
        return Instant(spec)

    kill_at = int(sys.argv[2])
    if kill_at:
        commit = manifest.Manifest.commit
        def killing(self, rec):
            # the shard's folder is in place, its manifest record not yet written
            if len(self.committed()) + 1 == kill_at:
                print("KILLED", rec.shard_id, flush=True)
                os._exit(9)
            commit(self, rec)
        manifest.Manifest.commit = killing
    spec = parse_spec(yaml.safe_load(open(sys.argv[1])))
    pipeline.run(spec, engine_factory=instant)
    print("DONE", flush=True)
    """
)


def test_driver_killed_mid_commit_then_rerun(tmp_path, tiny_model):
    """The driver dies after a shard's files were moved into place and before its manifest
    record: the rerun redoes that shard (its orphaned folder replaced, not kept beside the
    new one) and every id comes out once."""
    ids = write_shards(tmp_path / "in", shards=4, rows=30)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            spec_dict(
                tiny_model,
                str(tmp_path / "in"),
                str(out),
                input={"id_column": "id", "order": "input"},
                resources={"rows_per_file": 10},
            )
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def driver(kill_at: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", _KILL_MID_COMMIT, str(job), str(kill_at)]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    first = driver(kill_at=2)
    assert first.returncode == 9, first.stderr[-3000:]
    killed = first.stdout.split("KILLED ")[1].split()[0]
    assert len(committed(out)) == 1 and killed not in committed(out)
    orphan = {p.name for p in (out / killed).glob("*.parquet")}
    assert orphan  # in place for readers, but not recorded
    second = driver(kill_at=0)
    assert second.returncode == 0 and "DONE" in second.stdout, second.stderr[-3000:]
    assert len(committed(out)) == 4
    assert not orphan & {p.name for p in (out / killed).glob("*.parquet")}  # redone
    got = written_ids(out)
    assert len(got) == len(ids) and set(got) == ids
