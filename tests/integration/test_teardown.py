"""The end of a job: an engine replica closes its engine with the engine's processes still
running, and the driver returns only once the replica's process is gone.

Ray 2.60 kills an actor's child processes when the actor exits, *before* it runs the
shutdown hook that closes the engine. vLLM's engine core is such a child (or, with the warm
start, the fork server it came from is), so every successful job used to end with vLLM
reporting its engine core "exited unexpectedly" (an EngineDeadError traceback, on an H200)
or with resource_tracker KeyError tracebacks (on CPU). A stand-in engine with a child
process shows both halves without starting vLLM.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from conftest import prompt_shards, tmp_spec

from batchjobs.engines.base import Engine, Result

pytestmark = pytest.mark.integration

CLOSE_S = 2.0  # a slow engine shutdown


class ChildEngine(Engine):
    """Holds a child process, as vLLM holds its engine core; ``close`` records whether the
    child was still running, takes ``CLOSE_S``, then stops it."""

    kind = "child"

    def __init__(self, spec, probe: Path):
        self.probe = probe
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (probe / "actor_pid").write_text(str(os.getpid()))
        (probe / "actor_title").write_bytes(Path("/proc/self/cmdline").read_bytes())

    async def generate(self, request):
        return Result(text="ok", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    def close(self):
        (self.probe / "child_alive_at_close").write_text(str(self.child.poll() is None))
        time.sleep(CLOSE_S)
        self.child.terminate()
        self.child.wait()
        (self.probe / "closed").write_text("yes")


def _factory(probe: str, spec):
    return ChildEngine(spec, Path(probe))


@pytest.mark.parametrize(
    "placement", ["replicas", "pool"], ids=["replica-started-by-driver", "in-ray-data-actor"]
)
def test_engine_closes_with_its_processes_and_the_driver_waits_for_it(
    tmp_path, tiny_model, ray_session, placement
):
    from batchjobs.actor import EarlyReplica, EngineStage
    from batchjobs.cluster import wait_pids
    from batchjobs.pipeline import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    holder = (EarlyReplica if placement == "replicas" else EngineStage).__name__
    prompt_shards(tmp_path / "in", shards=2, rows=20)
    probe = tmp_path / "probe"
    probe.mkdir()
    spec = tmp_spec(tiny_model, tmp_path)
    summary = run(spec, engine_factory=functools.partial(_factory, str(probe)), placement=placement)
    assert summary.rows == 40
    # Ray did not kill the engine's child before the engine's own close ran ...
    assert (probe / "child_alive_at_close").read_text() == "True"
    # ... and run() returned only after the close had finished and the actor had exited.
    assert (probe / "closed").exists()
    pid = int((probe / "actor_pid").read_text())
    # The engine ran in the actor the pipeline waits for (so the wait below is not vacuous).
    assert holder.encode() in (probe / "actor_title").read_bytes()
    # By the class, as the pipeline waits: a copied name that no longer matched would pass.
    assert wait_pids([pid], (holder,), timeout_s=0) == 0
    assert summary.teardown_s > 0
