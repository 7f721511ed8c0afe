"""Where the CPU goes while the engine generates: per-process CPU seconds of a bench run,
summed by role, inside the generation window (engine ready → last row) of each mode.

    python bench/cpu_split.py -- python bench/bench.py run ... --out r.json
    python bench/cpu_split.py --report r.json   # after the run: the table

Samples /proc every 0.25 s while the command runs (Linux only) and writes the samples next
to the bench output (``r.json.cpu``); a process's CPU time in a window is the difference of
its samples at the window's ends. On a 2-core machine the engine can only use what the
rest leaves it, so this says what to cut.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ROLES = [  # first match wins: (role, substring of the command line or process name)
    ("bench mode process", "bench.py child"),  # raw: vLLM's front end; batchjobs: the driver
    ("engine core", "EngineCore"),
    ("engine core", "VLLM::"),
    ("engine core", "multiprocessing.forkserver"),
    ("engine replica", "EngineReplicaActor"),  # the engine's actor when the driver starts it
    ("engine actor", "MapBatches(EngineActor)"),  # Ray Data's: the engine, or a forwarder
    ("read/write tasks", "MapBatches(_read_fn)"),
    ("read/write tasks", "MapBatches(write_staged)"),
    ("ray data helpers", "_StatsActor"),
    ("ray data helpers", "Autoscal"),
    ("raylet/gcs", "raylet"),
    ("raylet/gcs", "gcs_server"),
    ("ray idle workers", "ray::IDLE"),
    ("ray other", "ray"),
]


def role(cmdline: str) -> str:
    for name, key in ROLES:
        if key in cmdline:
            return name
    return "other"


def sample() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds so far) for every readable process."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rfind(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICK
            comm = stat[stat.find("(") + 1 : stat.rfind(")")]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            out[int(pid)] = (f"{comm} {cmd}", cpu)
        except (OSError, IndexError, ValueError):
            continue
    return out


def record(cmd: list[str], out: Path) -> int:
    proc = subprocess.Popen(cmd)
    samples = []
    while proc.poll() is None:
        samples.append((time.time(), sample()))
        time.sleep(0.25)
    out.write_text(json.dumps(samples))
    return proc.returncode


def window_split(samples, t0: float, t1: float) -> dict[str, float]:
    """CPU seconds by role between t0 and t1 (processes alive at either end or between)."""
    inside = [s for t, s in samples if t0 <= t <= t1]
    if not inside:
        return {}
    first: dict[int, float] = {}
    last: dict[int, tuple[str, float]] = {}
    for snap in inside:
        for pid, (cmd, cpu) in snap.items():
            first.setdefault(pid, cpu)
            last[pid] = (cmd, cpu)
    totals: dict[str, float] = defaultdict(float)
    for pid, (cmd, cpu) in last.items():
        totals[role(cmd)] += cpu - first[pid]
    return dict(totals)


def report(result_json: Path) -> None:
    samples = json.loads(Path(f"{result_json}.cpu").read_text())
    for r in json.loads(result_json.read_text()):
        if not r.get("ready_at"):
            continue
        split = window_split(samples, r["ready_at"], r["end_at"])
        span = r["end_at"] - r["ready_at"]
        print(f"{r['mode']}: generation window {span:.1f} s")
        for name, cpu in sorted(split.items(), key=lambda kv: -kv[1]):
            if cpu >= 0.05:
                print(f"  {name:<18} {cpu:7.1f} CPU-s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=Path, help="bench result JSON whose .cpu samples to split")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the bench command (with --out)")
    a = p.parse_args()
    if a.report:
        report(a.report)
        return
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    out = Path(cmd[cmd.index("--out") + 1])
    sys.exit(record(cmd, Path(f"{out}.cpu")))


if __name__ == "__main__":
    main()
