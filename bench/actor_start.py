"""How long a Ray actor takes from ``.remote()`` to its ``__init__``, by where its
environment variables are set.

batchjobs' engine actors carry their own ``runtime_env`` (environment variables the worker
must have when it starts), so no prestarted worker can host them and Ray starts a new
process for each. This asks whether setting the same variables once for the whole job
(``ray.init(runtime_env=...)``) would let a prestarted worker take the actor instead.
Three modes, each a fresh driver joining one Ray head started here: ``actor`` (the
variables on the actor, as batchjobs does), ``job`` (on the job), ``none`` (no variables:
the lower bound). Prints, per actor, the seconds from ``.remote()`` to ``__init__`` and
whether its process existed before ``.remote()`` (a prestarted worker).

    .venv/bin/python bench/actor_start.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import running_head  # noqa: E402 - bench/bench.py, after the path is set

ENV = {"BATCHJOBS_BENCH_VAR": "1", "RAY_kill_child_processes_on_worker_exit": "false"}


def process_age_s() -> float:
    """This process's age from /proc, on the kernel's monotonic clock (psutil's create_time
    goes through the boot time, which was off by ~0.5 s here)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def one(mode: str, actors: int, settle_s: float) -> None:
    """One driver: join the head, wait for prestarted workers, time ``actors`` actors."""
    import ray

    ray.init(
        runtime_env={"env_vars": ENV} if mode == "job" else None,
        log_to_driver=False,
    )
    time.sleep(settle_s)

    @ray.remote(num_cpus=1)
    class Probe:
        def __init__(self, t0: float):
            self.init_s = time.time() - t0
            self.prestarted = time.time() - process_age_s() < t0
            self.has_env = os.environ.get("BATCHJOBS_BENCH_VAR") == "1"

        def report(self) -> dict:
            return vars(self)

    rows = []
    for _ in range(actors):
        opts = {"runtime_env": {"env_vars": ENV}} if mode == "actor" else {}
        t0 = time.time()
        probe = Probe.options(**opts).remote(t0)
        rows.append(ray.get(probe.report.remote()))
        ray.kill(probe)
    print(json.dumps({"mode": mode, "actors": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="drivers per mode, modes alternating")
    ap.add_argument("--actors", type=int, default=2, help="actors per driver")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait after joining")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--one", choices=["actor", "job", "none"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.actors, args.settle_s)
        return
    results = []
    # A head with Ray's own worker settings (idle workers prestarted), as `ray start` makes.
    with running_head(True, ray_defaults=True) as env:
        for _ in range(args.rounds):
            for mode in ("actor", "job", "none"):
                argv = [sys.executable, __file__, "--one", mode, "--actors", str(args.actors)]
                argv += ["--settle-s", str(args.settle_s)]
                out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(row)
                cells = ", ".join(
                    f"{a['init_s']:.2f} s ({'prestarted' if a['prestarted'] else 'new'} worker"
                    f"{', env set' if a['has_env'] else ''})"
                    for a in row["actors"]
                )
                print(f"{mode:6} .remote() -> __init__: {cells}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
