"""The engine watchdog (``batchjobs.watchdog``): a replica with requests in its engine and no
progress for ``resources.stall_timeout_s`` is treated as dead. The decision is checked on a
synthetic clock; the thread, the exit and vLLM's step count on stand-ins."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import psutil
import pytest

from batchjobs.compat import vllm_count_steps
from batchjobs.spec import parse_spec
from batchjobs.watchdog import Watchdog, watch_replica

REPO = Path(__file__).resolve().parents[2]


class Engine:
    """What the watchdog reads: requests in the engine, and a progress mark."""

    def __init__(self):
        self.requests = 0
        self.mark = 0

    def dog(self, timeout_s: float = 10.0) -> Watchdog:
        return Watchdog(timeout_s, lambda: self.requests, lambda: self.mark, lambda s, n: None)


def test_a_busy_engine_without_progress_stalls_after_the_timeout():
    e = Engine()
    dog = e.dog(timeout_s=10.0)
    e.requests = 3
    assert dog.check(100.0) is None  # first look: the clock starts
    assert dog.check(109.9) is None
    assert dog.check(110.0) == pytest.approx(10.0)
    assert dog.check(125.0) == pytest.approx(25.0)


def test_progress_or_an_empty_engine_resets_the_clock():
    e = Engine()
    dog = e.dog(timeout_s=10.0)
    e.requests = 3
    dog.check(0.0)
    for t in range(1, 60):  # a request finishes (or a step runs) every 9 s: never stalled
        if t % 9 == 0:
            e.mark += 1
        assert dog.check(float(t)) is None
    e.requests = 0  # idle for a long time: waiting for work is no stall
    assert dog.check(500.0) is None
    e.requests = 1
    assert dog.check(505.0) is None  # the clock restarted when the engine was idle
    assert dog.check(510.0) == pytest.approx(10.0)


def test_the_thread_reports_a_stall_once_even_with_the_engine_loop_blocked():
    blocked = threading.Event()
    stalls: list[tuple[float, int]] = []
    reported = threading.Event()

    def on_stall(seconds, requests):
        stalls.append((seconds, requests))
        reported.set()

    # The "engine loop" is blocked (a sync hang); the watchdog is a thread of its own.
    loop = threading.Thread(target=blocked.wait, daemon=True)
    loop.start()
    dog = Watchdog(0.2, lambda: 2, lambda: (5, None), on_stall, poll_s=0.02).start()
    assert reported.wait(60)
    dog.stop()
    blocked.set()
    assert len(stalls) == 1 and stalls[0][0] >= 0.2 and stalls[0][1] == 2


def test_watch_replica_is_off_at_zero(spec_dict):
    spec_dict["resources"] = {"stall_timeout_s": 0}
    replica = types.SimpleNamespace(spec=parse_spec(spec_dict))
    assert watch_replica(replica) is None
    assert parse_spec({**spec_dict, "resources": {}}).resources.stall_timeout_s == 600


def test_vllm_steps_are_counted_through_its_output_processor():
    calls = []

    class Processor:
        def process_outputs(self, outputs, *args, **kwargs):
            calls.append(outputs)
            return "processed"

    engine = types.SimpleNamespace(output_processor=Processor())
    steps = vllm_count_steps(engine)
    assert steps == [0]
    assert engine.output_processor.process_outputs(["a"], 1.0, None) == "processed"
    engine.output_processor.process_outputs(["b"])
    assert steps == [2] and calls == [["a"], ["b"]]
    assert vllm_count_steps(types.SimpleNamespace()) is None  # another vLLM: finished requests only


def test_a_stalled_replica_kills_its_engine_processes_and_exits():
    code = textwrap.dedent(
        """
        import subprocess, sys
        from batchjobs.watchdog import exit_stalled
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        exit_stalled("host:1:abc", 601.0, 7)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "replica host:1:abc: its engine made no progress for 601s with 7 request(s)" in (
        proc.stderr
    )
    # killed, not left running: its 600 s sleep would outlast the wait (TimeoutExpired)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(int(proc.stdout.split()[0])).wait(timeout=60)
