"""Driver memory vs job size: the driver must not grow with the number of rows.

Runs the real pipeline (real Ray, real Parquet in and out, staged commit, manifest) with an
instant stand-in engine, for N and 10×N rows, each in a fresh process, and prints the
driver's peak RSS for both and their ratio (goal: < 1.10).

    .venv/bin/python bench/driver_memory.py --rows 20000 --shards 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batchjobs.engines.base import Engine  # noqa: E402


class InstantEngine(Engine):
    """Answers at once: what is measured is the pipeline around the engine."""

    kind = "instant"

    def __init__(self, spec):
        pass

    async def generate(self, request):
        from batchjobs.engines.base import Result

        await asyncio.sleep(0)
        return Result(text="ok " * 8, finish_reason="length", prompt_tokens=12, completion_tokens=8)

    def close(self):
        pass


def instant_factory(spec):
    return InstantEngine(spec)


def child(rows: int, shards: int, work: Path, model: str) -> None:
    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inp = work / "in"
    inp.mkdir(parents=True)
    per = rows // shards
    for s in range(shards):
        pq.write_table(
            pa.table(
                {
                    "id": [f"{s}-{i}" for i in range(per)],
                    "prompt": [f"prompt number {s} {i} " * 8 for i in range(per)],
                }
            ),
            inp / f"p{s:04d}.parquet",
        )
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        proc = psutil.Process()
        while not stop.wait(0.1):
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    spec = parse_spec(
        {
            "name": "mem",
            "input": {"path": str(inp), "id_column": "id"},
            "output": {"path": str(work / "out")},
            "engine": {"model": model},
            "resources": {"replicas": 1, "batch_size": 64, "max_inflight_batches": 8},
        }
    )
    t0 = time.time()
    summary = run(spec, engine_factory=instant_factory)
    stop.set()
    print(
        json.dumps(
            {
                "rows": summary.rows,
                "wall_s": time.time() - t0,
                "peak_rss_mib": peak["rss"] / 2**20,
                "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20000, help="the small job; the large one has 10x")
    p.add_argument("--shards", type=int, default=20)
    p.add_argument(
        "--model", default=str(REPO / "models" / "tiny-llama"), help="only checked to exist"
    )
    p.add_argument("--child", nargs=2, metavar=("ROWS", "WORKDIR"))
    a = p.parse_args()
    if a.child:
        child(int(a.child[0]), a.shards, Path(a.child[1]), a.model)
        return
    results = []
    for rows in (a.rows, a.rows * 10):
        with tempfile.TemporaryDirectory() as work:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--shards",
                    str(a.shards * (rows // a.rows)),
                    "--model",
                    a.model,
                    "--child",
                    str(rows),
                    work,
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        print(
            f"rows {r['rows']:>8}  wall {r['wall_s']:7.1f} s  driver peak RSS {r['peak_rss_mib']:7.1f} MiB"
        )
    print(
        f"driver RSS ratio 10x rows / 1x rows: {results[1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.3f}"
    )


if __name__ == "__main__":
    main()
