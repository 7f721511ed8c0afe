"""Benchmark batchjobs against raw vLLM ``LLM.generate`` and Ray Data's LLM processor.

Each mode runs in its own process, on the same prompts, in the same invocation, so the
ratios printed at the end compare like with like on a noisy machine. Wall times are end
to end (engine start included); start-up is also reported so it can be excluded.

    python bench/bench.py run --model models/tiny-llama --workload longtail --n 2000 \
        --modes raw,batchjobs --engine-args '{"enforce_eager": true}' --out bench/results/cpu.json

Workloads (deterministic, seeded):
  fixed      every prompt asks for --max-tokens tokens (ignore_eos)
  longtail   output lengths 64/256/512/1536 with weights 50/30/15/5 (scaled by --tail-scale)
  prefix     --prefixes (20) long shared prefixes x N/prefixes questions, shuffled
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from batchjobs import cluster  # noqa: E402 - after the path is set
from batchjobs.tools import models  # noqa: E402

WORDS = models.WORDS


# ---------------------------------------------------------------- workloads
def make_rows(
    workload: str,
    n: int,
    prompt_words: int,
    max_tokens: int,
    tail_scale: float,
    seed: int = 0,
    n_prefixes: int = 20,
):
    rng = random.Random(seed)
    rows = []
    if workload == "prefix":
        prefixes = [
            " ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(n_prefixes)
        ]
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(max(8, prompt_words // 10)))
            rows.append(
                {
                    "id": f"r{i:06d}",
                    "prompt": f"{prefixes[i % n_prefixes]}\nQuestion {i}: {q}?",
                    "max_tokens": max_tokens,
                }
            )
        rng.shuffle(rows)
        return rows
    lengths = [64, 256, 512, 1536]
    for i in range(n):
        mt = (
            max_tokens
            if workload == "fixed"
            else max(1, int(rng.choices(lengths, weights=[50, 30, 15, 5])[0] * tail_scale))
        )
        prompt = f"Request {i}. " + " ".join(rng.choice(WORDS) for _ in range(prompt_words))
        rows.append({"id": f"r{i:06d}", "prompt": prompt, "max_tokens": mt})
    return rows


def write_shards(rows, out: Path, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * per : (k + 1) * per]
        if part:
            pq.write_table(pa.Table.from_pylist(part), out / f"part-{k:04d}.parquet")


def read_rows(data: Path):
    import pyarrow.parquet as pq

    rows = []
    for f in sorted(data.glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


# ---------------------------------------------------------------- modes (child processes)
def engine_kwargs(a) -> dict:
    kw = {"model": a.model, "max_model_len": a.max_model_len, **json.loads(a.engine_args)}
    if a.load_format:
        kw["load_format"] = a.load_format
    return kw


def mode_raw(a) -> dict:
    from vllm import LLM, SamplingParams

    t_imported = time.time()  # where raw's start-up goes: importing vLLM vs building the engine
    rows = read_rows(Path(a.data))
    llm = LLM(**engine_kwargs(a))
    t_ready = time.time()
    params = [
        SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True) for r in rows
    ]
    outs = llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    t_end = time.time()
    return {
        "rows": len(outs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
        "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "cached_tokens": sum(getattr(o, "num_cached_tokens", None) or 0 for o in outs),
        "imported_at": t_imported,
        "ready_at": t_ready,
        "end_at": t_end,
    }


def mode_batchjobs(a, spawn: bool = False) -> dict:
    """batchjobs in this process (its driver RSS is what the monitor sees), as `batchjobs run` does.

    ``spawn``: vLLM starts its engine core as it does alone in a Ray actor (a fresh
    interpreter), instead of from batchjobs' warm fork server (batchjobs/engines/warmstart.py).
    """
    import yaml

    from batchjobs.pipeline import run
    from batchjobs.spec import load_spec

    args = json.loads(a.engine_args)
    if a.load_format:
        args["load_format"] = a.load_format
    engine_extra = json.loads(a.spec_engine)
    if spawn:
        engine_extra["env"] = {
            **engine_extra.get("env", {}),
            "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        }
    spec = {
        "name": "bench",
        "input": {
            "path": str(Path(a.data)),
            "id_column": "id",
            "sampling_columns": {"max_tokens": "max_tokens"},
            **json.loads(a.spec_input),
        },
        "output": {"path": str(Path(a.workdir) / "batchjobs-out"), "mode": "overwrite"},
        "engine": {
            "model": a.model,
            "max_model_len": a.max_model_len,
            "args": args,
            **engine_extra,
        },
        "sampling": {"max_tokens": a.max_tokens, "temperature": 0.0, "ignore_eos": True},
        "resources": json.loads(a.resources),
    }
    path = Path(a.workdir) / "bench-spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    s = run(load_spec(path), progress=lambda line: print(line, file=sys.stderr, flush=True))
    return {
        "rows": s.rows,
        "error_rows": s.error_rows,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "ready_at": max(r["ready_at"] for r in s.replicas.values()),  # all replicas serving
        "replicas": s.replicas,  # per replica: engine_s charged, startup_s, idle_s, mean_inflight, ...
        "cached_tokens": sum(r.get("cached_tokens", 0) for r in s.replicas.values()),
        # The last row committed: the engines' shutdown after it (s.teardown_s) is left out,
        # as raw's end is taken before its engine shuts down.
        "end_at": time.time() - s.teardown_s,
        "teardown_s": s.teardown_s,
        "cost_usd": s.cost_usd,
    }


def mode_raydata(a) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if a.raydata_cpu:
        ray.init(num_cpus=8, num_gpus=1)  # logical GPU: lets the processor schedule on CPU
    else:
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    kw = engine_kwargs(a)
    model = kw.pop("model")
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=kw,
        batch_size=a.raydata_batch_size,
        concurrency=1,
        chat_template_stage=False,
        log_engine_metrics=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            prompt=row["prompt"],
            sampling_params=dict(
                max_tokens=int(row["max_tokens"]), temperature=0.0, ignore_eos=True
            ),
        ),
        postprocess=lambda row: dict(
            id=row["id"],
            text=row["generated_text"],
            num_input_tokens=row["num_input_tokens"],
            num_generated_tokens=row["num_generated_tokens"],
        ),
    )
    ds = processor(ray.data.read_parquet(a.data))
    out = Path(a.workdir) / "raydata-out"
    # A second raydata run in the same workdir would otherwise count both runs' rows.
    shutil.rmtree(out, ignore_errors=True)
    ds.write_parquet(str(out))
    end = time.time()
    import pyarrow.dataset as pds

    t = pds.dataset(str(out), format="parquet").to_table()
    return {
        "rows": t.num_rows,
        "prompt_tokens": int(sum(t.column("num_input_tokens").to_pylist())),
        "completion_tokens": int(sum(t.column("num_generated_tokens").to_pylist())),
        "ready_at": None,  # the processor does not say when its engine is up
        "end_at": end,
    }


MODES = {
    "raw": mode_raw,
    "batchjobs": mode_batchjobs,
    # the driver joins a Ray head started before the clock runs (see running_head)
    "batchjobs_head": mode_batchjobs,
    "batchjobs_spawn": functools.partial(mode_batchjobs, spawn=True),
    "raydata": mode_raydata,
}


@contextlib.contextmanager
def running_head(start: bool, ray_defaults: bool = False):
    """For ``batchjobs_head``: a Ray head started outside the timed run, as a job submitted
    with ``ray job submit`` finds its cluster already up, so the driver joins it (through
    RAY_ADDRESS) instead of starting a local Ray. Same logical CPUs and worker settings as
    batchjobs' own local cluster (with ``ray_defaults``, Ray's own worker settings: idle
    workers prestarted); stopped afterwards with `ray stop`, which stops every Ray of this
    user on the machine. Yields the child's environment."""
    import os
    import socket

    if not start:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    # Token auth, as Ray 2.60 sets up for a local cluster; `ray start` makes no token itself
    # (on a fresh machine it started a head without auth, which the driver then refused).
    if not (Path.home() / ".ray" / "auth_token").exists() and not os.environ.get("RAY_AUTH_TOKEN"):
        subprocess.run(
            ray_cli + ["get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL
        )
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run(
        ray_cli
        + ["start", "--head", f"--port={port}", f"--num-cpus={cluster.local_cluster_cpus()}"]
        + ["--include-dashboard=false", "--disable-usage-stats"]
        + ([] if ray_defaults else [f"--system-config={json.dumps(cluster.LOCAL_SYSTEM_CONFIG)}"]),
        check=True,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        # The driver reads the token from ~/.ray/auth_token.
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        subprocess.run(ray_cli + ["stop", "--force"], cwd=REPO, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- monitoring
class Monitor:
    """Samples GPU busy fraction and memory (NVML), and the child's process-tree RSS."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples = 0
        self.busy = 0
        self.trace: list[tuple[float, list[int]]] = []  # (time, utilisation % per GPU)
        self.peak_gpu_mem = 0
        self.peak_mem_per_gpu: list[int] = []
        self.peak_driver_rss = 0
        self.stop = threading.Event()
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception:  # noqa: BLE001 - no GPU here
            self.nvml = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        import psutil

        proc = psutil.Process(self.pid)
        while not self.stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                self.peak_driver_rss = max(self.peak_driver_rss, proc.memory_info().rss)
            if self.nvml:
                utils = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
                mems = [self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
                self.samples += 1
                self.busy += sum(u > 0 for u in utils) / len(utils)
                self.trace.append((time.time(), utils))
                self.peak_gpu_mem = max(self.peak_gpu_mem, sum(mems))
                self.peak_mem_per_gpu = [
                    max(m, p) for m, p in zip(mems, self.peak_mem_per_gpu or [0] * len(mems))
                ]

    def result(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {
            "gpu_busy_frac": self.busy / self.samples if self.samples else None,
            "peak_gpu_mem_gib": self.peak_gpu_mem / 2**30 if self.nvml else None,
            "peak_gpu_mem_gib_per_gpu": [round(m / 2**30, 1) for m in self.peak_mem_per_gpu],
            "driver_peak_rss_mib": self.peak_driver_rss / 2**20,
        }

    def busy_between(self, t0: float, t1: float) -> dict:
        """Share of samples in [t0, t1] with a kernel running, per GPU that ran any work.

        NVML's utilisation is the share of its sample period in which a kernel ran: this is
        what starved feeding would lower, measured over generation only (start-up excluded).
        """
        window = [u for t, u in self.trace if t0 <= t <= t1]
        if not window:
            return {}
        n = len(window[0])
        used = [g for g in range(n) if any(u[g] > 0 for u in window)]
        per_gpu = {g: sum(u[g] > 0 for u in window) / len(window) for g in used}
        mean_util = {g: sum(u[g] for u in window) / len(window) / 100 for g in used}
        return {
            "gen_gpu_busy_frac": min(per_gpu.values()) if per_gpu else 0.0,
            "gen_gpu_util_mean": sum(mean_util.values()) / len(mean_util) if mean_util else 0.0,
            "gpus_used": len(used),
        }


# ---------------------------------------------------------------- orchestration
def run_all(a) -> None:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"-p{a.prefixes}" if a.workload == "prefix" and a.prefixes != 20 else ""
    # Everything that shapes the rows names the folder, so a run never reuses other data.
    tag += f"-w{a.prompt_words}-t{a.max_tokens}-s{a.shards}"
    if a.workload == "longtail":
        tag += f"-x{a.tail_scale}"
    data = work / f"data-{a.workload}-{a.n}{tag}"
    if not data.exists():
        rows = make_rows(
            a.workload, a.n, a.prompt_words, a.max_tokens, a.tail_scale, n_prefixes=a.prefixes
        )
        write_shards(rows, data, a.shards)
    results = (
        json.loads(Path(a.out).read_text()) if a.out and Path(a.out).exists() and a.append else []
    )
    variants = json.loads(a.variants)
    for mode in a.modes.split(","):
        # "batchjobs:NAME": batchjobs with --resources updated by --variants' NAME entry (its
        # "input" and "engine" keys, if any, update --spec-input and --spec-engine instead)
        base_mode, _, variant = mode.partition(":")
        override = dict(variants.get(variant, {}))
        spec_input = json.dumps({**json.loads(a.spec_input), **override.pop("input", {})})
        spec_engine = json.dumps({**json.loads(a.spec_engine), **override.pop("engine", {})})
        # "driver_env": environment variables of this mode's own process (batchjobs: the driver)
        driver_env = override.pop("driver_env", {})
        resources = {**json.loads(a.resources), **override}
        res_file = work / f"result-{mode.replace(':', '-')}.json"
        res_file.unlink(missing_ok=True)
        argv = [
            sys.executable,
            __file__,
            "child",
            base_mode,
            "--data",
            str(data),
            "--result",
            str(res_file),
        ] + a.child_args
        if variant:
            argv += ["--resources", json.dumps(resources), "--spec-input", spec_input]
            argv += ["--spec-engine", spec_engine]
        with running_head(base_mode == "batchjobs_head") as env:
            t0 = time.time()
            if driver_env:
                env = {**(env or os.environ), **driver_env}
            proc = subprocess.Popen(argv, cwd=REPO, env=env)
            mon = Monitor(proc.pid)
            rc = proc.wait()
            extra = mon.result()
        row = {
            "mode": mode,
            "workload": a.workload,
            "n": a.n,
            "rc": rc,
            "elapsed_s": time.time() - t0,
            "spec_input": spec_input,
            "spec_engine": spec_engine,
            "resources": json.dumps(resources) if mode.startswith("batchjobs") else None,
            **extra,
        }
        if rc == 0 and res_file.exists():
            res = json.loads(res_file.read_text())
            # End to end = from the process start (imports included) to the last row written.
            row.update(res, wall_s=res["end_at"] - t0)
            row["startup_s"] = res["ready_at"] - t0 if res.get("ready_at") else None
            if res.get("imported_at"):
                row["import_s"] = res["imported_at"] - t0
            # batchjobs: from the driver's start to the first engine actor's __init__
            inits = [r["ready_at"] - r["startup_s"] for r in (res.get("replicas") or {}).values()]
            if inits:
                row["to_actor_init_s"] = min(inits) - t0
            if res.get("ready_at"):
                row.update(mon.busy_between(res["ready_at"], res["end_at"]))
        results.append(row)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def label(r: dict) -> str:
    """Mode name, marked where a batchjobs run changed input or engine keys."""
    extra = [v for v in (r.get("spec_input"), r.get("spec_engine")) if v and v != "{}"]
    return r["mode"] + ("*" if extra else "")


def ex_start_ratio(raw_wall: float, raw_start: float, wall: float, start: float) -> float:
    """Raw's generation time (wall − start) over this run's: above 1 is faster than raw."""
    return (raw_wall - raw_start) / (wall - start)


def print_table(results) -> None:
    from batchjobs.tracker import busy_share

    base = {}
    for r in results:
        if r["mode"] == "raw" and r.get("wall_s"):
            base[(r["workload"], r["n"])] = r
    hdr = f"{'mode':16} {'workload':9} {'rows':>6} {'wall s':>8} {'start s':>8} {'out tok/s':>10} {'tot tok/s':>10} {'vs raw':>7} {'vs raw ex-start':>15} {'gpu busy':>8} {'gen util':>8} {'eng busy':>8} {'gpu GiB':>8} {'drv MiB':>8} {'cache hit':>9}"
    print(hdr)
    for r in results:
        if not r.get("wall_s"):
            print(f"{label(r):16} {r['workload']:9} FAILED rc={r['rc']}")
            continue
        b = base.get((r["workload"], r["n"]))
        out_tps = r["completion_tokens"] / r["wall_s"]
        tot_tps = (r["completion_tokens"] + r["prompt_tokens"]) / r["wall_s"]
        ratio = b["wall_s"] / r["wall_s"] if b else None
        ex = None
        if b and r.get("startup_s") is not None and b.get("startup_s") is not None:
            ex = ex_start_ratio(b["wall_s"], b["startup_s"], r["wall_s"], r["startup_s"])
        # share of prompt tokens served by the engine's prefix cache (None: not recorded)
        hit = (
            r["cached_tokens"] / r["prompt_tokens"]
            if r.get("prompt_tokens") and "cached_tokens" in r
            else None
        )
        # batchjobs' engines: share of their time after start-up with work (the run
        # summary's busy_share over all replicas); on CPU, where there is no GPU to sample
        eng = busy_share((r.get("replicas") or {}).values())
        r.update(
            out_tok_s=out_tps,
            tot_tok_s=tot_tps,
            ratio_vs_raw=ratio,
            ratio_vs_raw_ex_startup=ex,
            prefix_cache_hit=hit,
            engine_busy_share=eng,
        )
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(
            f"{label(r):16} {r['workload']:9} {r['rows']:>6} {r['wall_s']:>8.1f} {f(r.get('startup_s'), '8.1f')} "
            f"{out_tps:>10.0f} {tot_tps:>10.0f} {f(ratio, '7.3f')} {f(ex, '15.3f')} {f(r.get('gpu_busy_frac'), '8.2f')} {f(r.get('gen_gpu_util_mean'), '8.2f')} {f(eng, '8.3f')} "
            f"{f(r.get('peak_gpu_mem_gib'), '8.1f')} {f(r.get('driver_peak_rss_mib'), '8.0f')} "
            f"{f(hit, '9.1%')}"
        )


def pair_ratios(results: list[dict], mode: str) -> list[dict]:
    """One invocation's runs of ``mode`` against its raw runs (their mean, when it has
    several, as the CPU series do): end to end and with start-up excluded."""
    raws = [r for r in results if r["mode"] == "raw" and r.get("wall_s")]
    runs = [r for r in results if r["mode"] == mode and r.get("wall_s")]
    if not raws or not runs:
        return []
    raw_wall = statistics.fmean(r["wall_s"] for r in raws)
    raw_start = statistics.fmean(r["startup_s"] for r in raws)
    first = results[0]["mode"]
    return [
        {
            "first": first,
            "raw_wall_s": raw_wall,
            "raw_start_s": raw_start,
            "wall_s": r["wall_s"],
            "start_s": r["startup_s"],
            "e2e": raw_wall / r["wall_s"],
            "ex_start": ex_start_ratio(raw_wall, raw_start, r["wall_s"], r["startup_s"]),
        }
        for r in runs
    ]


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def summarize(paths: list[str], mode: str) -> dict:
    """Ratios to raw over several invocations (result files of `run`), each run against the
    raw run(s) of its own invocation; printed, and returned for --out."""
    rows = []
    for path in paths:
        pairs = pair_ratios(json.loads(Path(path).read_text()), mode)
        if not pairs:
            print(f"{path}: no raw run and {mode} run to compare; left out")
        rows += [{"file": Path(path).name, **p} for p in pairs]
    if not rows:
        raise SystemExit(f"no {mode} run with a raw run beside it in {len(paths)} file(s)")
    print(
        f"{'file':44} {'first':15} {'raw wall':>8} {'raw start':>9} {'wall':>7} {'start':>7} {'e2e':>6} {'ex-start':>8}"
    )
    for r in rows:
        print(
            f"{r['file'][:44]:44} {r['first'][:15]:15} {r['raw_wall_s']:8.1f} {r['raw_start_s']:9.1f} "
            f"{r['wall_s']:7.1f} {r['start_s']:7.1f} {r['e2e']:6.3f} {r['ex_start']:8.3f}"
        )
    e2e = [r["e2e"] for r in rows]
    out = {
        "mode": mode,
        "runs": len(rows),
        "geomean_e2e": geomean(e2e),
        "geomean_ex_start": geomean([r["ex_start"] for r in rows]),
        "median_e2e": statistics.median(e2e),
        "min_e2e": min(e2e),
        "max_e2e": max(e2e),
        "summed_wall_ratio": sum(r["raw_wall_s"] for r in rows) / sum(r["wall_s"] for r in rows),
        "mean_start_diff_s": statistics.fmean(r["start_s"] - r["raw_start_s"] for r in rows),
        "rows": rows,
    }
    print(
        f"{mode} vs raw over {out['runs']} runs: geometric mean {out['geomean_e2e']:.3f} end to end "
        f"(median {out['median_e2e']:.3f}, {out['min_e2e']:.3f}-{out['max_e2e']:.3f}; summed wall "
        f"times {out['summed_wall_ratio']:.3f}), {out['geomean_ex_start']:.3f} start-up excluded; "
        f"start {out['mean_start_diff_s']:+.1f} s against raw's on average"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--model", required=True)
        sp.add_argument("--max-model-len", type=int, default=2048)
        sp.add_argument("--max-tokens", type=int, default=256)
        sp.add_argument("--load-format", default=None)
        sp.add_argument(
            "--engine-args", default="{}", help="JSON: extra vLLM engine args for every mode"
        )
        sp.add_argument(
            "--spec-engine", default="{}", help="JSON: extra batchjobs engine keys (env, ...)"
        )
        sp.add_argument(
            "--spec-input",
            default="{}",
            help='JSON: extra batchjobs input keys ({"order": "input"})',
        )
        sp.add_argument(
            "--resources", default='{"replicas": 1, "batch_size": 32, "max_inflight_batches": 32}'
        )
        sp.add_argument("--raydata-batch-size", type=int, default=64)
        sp.add_argument("--raydata-cpu", action="store_true")
        sp.add_argument("--workdir", default=str(REPO / "bench" / "results" / "work"))

    r = sub.add_parser("run")
    common(r)
    r.add_argument("--workload", choices=["fixed", "longtail", "prefix"], default="longtail")
    r.add_argument("--n", type=int, default=2000)
    r.add_argument("--shards", type=int, default=8)
    r.add_argument("--prompt-words", type=int, default=500)
    r.add_argument("--tail-scale", type=float, default=1.0)
    r.add_argument(
        "--prefixes", type=int, default=20, help="prefix workload: distinct shared prefixes"
    )
    r.add_argument(
        "--modes",
        default="raw,batchjobs",
        help="comma-separated; batchjobs:NAME runs batchjobs with the resources of --variants NAME",
    )
    r.add_argument(
        "--variants",
        default="{}",
        help='JSON: {"NAME": {resource keys, "input": {input keys}, "engine": {engine keys}, '
        '"driver_env": {variables of the mode\'s own process}}}, '
        'e.g. {"old": {"max_inflight_batches": 16}}',
    )
    r.add_argument("--out", default=None)
    r.add_argument("--append", action="store_true")

    sm = sub.add_parser(
        "summary", help="ratios to raw over several result files (invocations) of `run`"
    )
    sm.add_argument("files", nargs="+")
    sm.add_argument("--mode", default="batchjobs", help="the mode to compare with raw")
    sm.add_argument("--out", default=None, help="write the summary as JSON here")

    c = sub.add_parser("child")
    c.add_argument("mode", choices=sorted(MODES))
    common(c)
    c.add_argument("--data", required=True)
    c.add_argument("--result", required=True)

    a, rest = p.parse_known_args()
    if a.cmd == "summary":
        out = summarize(a.files, a.mode)
        if a.out:
            Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        return
    if a.cmd == "child":
        res = MODES[a.mode](a)
        Path(a.result).write_text(json.dumps(res))
        return
    # forward the common options to each child
    a.child_args = (
        [
            "--model",
            a.model,
            "--max-model-len",
            str(a.max_model_len),
            "--max-tokens",
            str(a.max_tokens),
            "--engine-args",
            a.engine_args,
            "--spec-engine",
            a.spec_engine,
            "--spec-input",
            a.spec_input,
            "--resources",
            a.resources,
            "--raydata-batch-size",
            str(a.raydata_batch_size),
            "--workdir",
            a.workdir,
        ]
        + (["--load-format", a.load_format] if a.load_format else [])
        + (["--raydata-cpu"] if a.raydata_cpu else [])
    )
    run_all(a)


if __name__ == "__main__":
    main()
