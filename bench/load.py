"""Load: a 100,000-row job against a 10,000-row one on the CPU default, end to end.

Each job runs as `batchjobs run` in its own process (its own local Ray), on the real vLLM
CPU engine with the tiny model and short outputs, over Parquet shards of the same size
(more shards for more rows, as a bigger input would come). It prints, per job: wall time,
the driver's peak RSS (the `batchjobs run` process alone, sampled every 0.2 s; Ray's and
the engine's processes are not the driver), the rows out (every input id exactly once),
and the size of every file batchjobs writes beside the results; then the RSS ratio of the
big job to the small one (goal: within 10%).

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/load.py                # 10k, then 100k rows
    .venv/bin/python bench/load.py --rows 2000 20000 --json load.json       # smaller, kept as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "river",
    "stone",
    "cloud",
    "paper",
    "lamp",
    "garden",
    "winter",
    "copper",
    "violin",
    "harbor",
]


def write_input(folder: Path, rows: int, rows_per_shard: int) -> None:
    """Parquet shards of ``rows_per_shard`` rows: an id and a short prompt (a few tokens)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    for s, start in enumerate(range(0, rows, rows_per_shard)):
        ids = range(start, min(rows, start + rows_per_shard))
        pq.write_table(
            pa.table(
                {
                    "id": [f"r{i}" for i in ids],
                    "prompt": [f"{WORDS[i % 10]} {WORDS[i // 10 % 10]} number {i}" for i in ids],
                }
            ),
            folder / f"part-{s:05d}.parquet",
        )


def spec(work: Path, model: str, max_tokens: int) -> dict:
    """The CPU default of jobs/demo.yaml, with short outputs."""
    return {
        "name": "load",
        "input": {"path": str(work / "in"), "prompt_column": "prompt", "id_column": "id"},
        "output": {"path": str(work / "out")},
        "engine": {
            "model": model,
            "max_model_len": 128,
            "args": {"enforce_eager": True},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        },
        "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
        "resources": {"replicas": 1},
    }


def sample_rss(pid: int, peak: dict, stop: threading.Event) -> None:
    """The peak RSS, sampled every 0.2 s, and (seconds, MiB) every 10 s in ``peak["series"]``."""
    import psutil

    proc = psutil.Process(pid)
    t0 = time.time()
    while not stop.wait(0.2):
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            return
        peak["rss"] = max(peak["rss"], rss)
        if time.time() - t0 >= 10 * len(peak["series"]):
            peak["series"].append((round(time.time() - t0), round(rss / 2**20, 1)))


def output_files(out: Path) -> dict[str, int]:
    """Bytes of each file batchjobs writes beside the results (names starting with _)."""
    sizes = {}
    for p in sorted(out.iterdir()):
        if not p.name.startswith("_"):
            continue
        if p.is_dir():
            sizes[p.name + "/"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            sizes[p.name] = p.stat().st_size
    return sizes


def run_job(rows: int, args, work: Path) -> dict:
    import pyarrow.dataset as pds
    import yaml

    write_input(work / "in", rows, args.rows_per_shard)
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump(spec(work, args.model, args.max_tokens)))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "batchjobs.cli", "run", str(job), "--quiet", "--skip-report"]
    cmd += ["--summary-json", str(work / "summary.json")]
    peak: dict = {"rss": 0, "series": []}
    stop = threading.Event()
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.time() - t0
    stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{rows} rows: batchjobs run exited {proc.returncode}:\n{output.decode()[-3000:]}")
    summary = json.loads((work / "summary.json").read_text())
    ids = pds.dataset(str(work / "out"), format="parquet").to_table(columns=["id"]).column("id")
    return {
        "rows": rows,
        "shards": -(-rows // args.rows_per_shard),
        "wall_s": round(wall, 1),
        "driver_peak_rss_mib": round(peak["rss"] / 2**20, 1),
        "rows_out": len(ids),
        "ids_exactly_once": len(ids) == rows and len(set(ids.to_pylist())) == rows,
        "error_rows": summary["error_rows"],
        "completion_tokens": summary["completion_tokens"],
        "files": output_files(work / "out"),
        "files_per_shard": round(
            sum(1 for _ in (work / "out").glob("*/*.parquet")) / -(-rows // args.rows_per_shard), 2
        ),
        "rss_series_mib": peak["series"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "BIG"))
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--model", default=str(REPO / "models" / "tiny-llama"))
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    results = []
    for rows in a.rows:
        with tempfile.TemporaryDirectory(prefix="batchjobs-load-") as work:
            r = run_job(rows, a, Path(work))
        results.append(r)
        files = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in r["files"].items())
        print(
            f"rows {r['rows']:>7} ({r['shards']} shards): wall {r['wall_s']:7.1f} s, driver peak "
            f"RSS {r['driver_peak_rss_mib']:7.1f} MiB, {r['rows_out']} rows out, ids exactly "
            f"once: {r['ids_exactly_once']}, {r['error_rows']} error rows\n  files: {files}; "
            f"{r['files_per_shard']} Parquet files per shard",
            flush=True,
        )
    ratio = results[1]["driver_peak_rss_mib"] / results[0]["driver_peak_rss_mib"]
    print(f"driver peak RSS ratio {a.rows[1]} / {a.rows[0]} rows: {ratio:.3f} (goal 0.90-1.10)")
    if a.json:
        a.json.write_text(json.dumps({"runs": results, "rss_ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
