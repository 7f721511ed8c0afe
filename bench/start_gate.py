"""The start gate with several replicas: held reads against reads during engine start-up.

Runs the real pipeline (a fresh local Ray per run, real Parquet in and out) with 2 stand-in
replicas that take ``--load-s`` to start and then serve 128 requests at a time, each for
``--request-s``: a GPU engine's shape with no GPU. Each pair runs ``start_timeout_s: 1800``
(the gate: no replica is fed until both are up, and Ray Data holds the reads back until
then) and ``start_timeout_s: 0`` (no gate; the fair-share cap keeps the first replica up
from taking more than half the job), each in its own process, and prints the generation
time (wall − all replicas ready), each replica's idle time, and gen(gate) / gen(no gate).

    .venv/bin/python bench/start_gate.py --pairs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(args) -> None:
    """One job in this process; prints one JSON line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from batchjobs.engines.base import Engine, Result
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    class Standin(Engine):
        kind = "standin"

        def __init__(self, spec):
            time.sleep(args.load_s)
            self.slots: asyncio.Semaphore | None = None

        async def generate(self, request):
            if self.slots is None:
                self.slots = asyncio.Semaphore(128)
            async with self.slots:
                await asyncio.sleep(args.request_s)
            return Result(text="x", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

        def max_concurrency(self):
            return 128

        def close(self):
            pass

    def factory(spec):
        return Standin(spec)

    work = Path(args.workdir)
    inp = work / "in"
    if not inp.exists():
        inp.mkdir(parents=True)
        for s in range(8):
            rows = [f"p{s}-{i}" for i in range(args.rows // 8)]
            pq.write_table(pa.table({"prompt": rows}), inp / f"{s}.parquet")
    spec = parse_spec(
        {
            "name": "gate",
            "input": {"path": str(inp), "prompt_column": "prompt"},
            "output": {"path": str(work / f"out-{args.one}"), "mode": "overwrite"},
            "engine": {"model": str(REPO / "models" / "tiny-llama"), "max_model_len": 256},
            "sampling": {"max_tokens": 8},
            "resources": {
                "replicas": 2,
                "batch_size": 64,
                "num_cpus_per_replica": 0.25,
                "start_timeout_s": 1800 if args.one == "gate" else 0,
            },
        }
    )
    t0 = time.time()
    s = run(spec, engine_factory=factory)
    ready = max(r["ready_at"] for r in s.replicas.values())
    print(
        json.dumps(
            {
                "mode": args.one,
                "wall_s": s.wall_s,
                "gen_s": s.wall_s - (ready - t0),
                "idle_s": sorted(r["idle_s"] for r in s.replicas.values()),
                "busy_s": sorted(r["busy_s"] for r in s.replicas.values()),
            }
        )
    )
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--load-s", type=float, default=15.0)
    ap.add_argument("--request-s", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--one", choices=["gate", "nogate"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            # Alternate which goes first, so neither always meets a just-stopped cluster.
            order = ("gate", "nogate") if pair % 2 == 0 else ("nogate", "gate")
            row = {}
            for mode in order:
                argv = [sys.executable, __file__, "--one", mode, "--workdir", tmp]
                argv += ["--rows", str(args.rows), "--load-s", str(args.load_s)]
                argv += ["--request-s", str(args.request_s)]
                out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True)
                row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            row["ratio"] = row["gate"]["gen_s"] / row["nogate"]["gen_s"]
            results.append(row)
            for mode in ("gate", "nogate"):
                r = row[mode]
                idle = " / ".join(f"{x:.1f}" for x in r["idle_s"])
                print(f"pair {pair}  {mode:6}  gen {r['gen_s']:5.1f} s  replica idle {idle} s")
            print(f"pair {pair}  gen(gate) / gen(no gate) = {row['ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
