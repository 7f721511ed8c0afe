"""Where a batchjobs driver's time goes before its engine actor's ``__init__``, and what an
engine actor created by the driver itself, before Ray Data, would save.

The engine's own start (importing vLLM, building the engine) is the same in batchjobs'
actor as in raw ``LLM.generate``'s process. What batchjobs adds is the time before the actor's ``__init__``. This measures it with a stand-in engine
(no vLLM): a Ray head is started first (the ``ray job submit`` case), then per round two
fresh drivers, each a new process:

- ``raydata``: ``pipeline.run(..., placement="pool")``: the engine is in Ray Data's map
  worker (the default on CPU). Marks the driver's imports, its join, its Ray Data plan,
  and the actor's process start and ``__init__``;
- ``early``: ``pipeline.run(..., placement="replicas")`` (the default on GPUs): the driver
  starts the engine replica as an actor of its own right after joining
  (``replicas.start_replicas``);
- ``plain``: the driver joins and creates one plain Ray actor with the engine actor's
  kind of environment, whose ``__init__`` imports ``batchjobs.actor``, then imports Ray
  Data itself: the bound for ``early``.

All times are seconds from the driver process's start (from /proc, before the
interpreter's own start-up). The stand-in leaves out the warm fork server (it is vLLM's),
so both drivers' actors start without it.

    .venv/bin/python bench/start_trace.py --rounds 3 --warmup 1 --model models/tiny-llama \
        --data jobs/data/demo --out /tmp/start-trace.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def process_start(pid: str = "self") -> float:
    """Epoch time at which process ``pid`` started (kernel start ticks against uptime)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


KINDS = ("raydata", "early", "plain")
T0 = process_start()
MARKS: dict = {"interpreter": round(time.time() - T0, 3)}


def mark(name: str) -> None:
    MARKS[name] = round(time.time() - T0, 3)


def actor_marks(path: str) -> dict:
    """What the actor process recorded, relative to this driver's start."""
    with open(path) as f:
        seen = json.loads(f.read().splitlines()[-1])
    return {
        "actor_process": round(seen["process"] - T0, 3),
        "actor_init": round(seen["init"] - T0, 3),
        "actor_modules": seen["modules"],
    }


def record(path: str) -> None:
    """In the actor: its process start, now, and which heavy modules it holds."""
    with open(path, "a") as f:
        f.write(
            json.dumps(
                {
                    "process": process_start(),
                    "init": time.time(),
                    "modules": sorted(
                        m for m in ("ray.data", "pandas", "batchjobs.actor") if m in sys.modules
                    ),
                }
            )
            + "\n"
        )


def child_pipeline(a) -> None:
    import asyncio

    from batchjobs import pipeline
    from batchjobs.engines.base import Engine, Result
    from batchjobs.spec import parse_spec

    mark("imported")

    class Standin(Engine):
        kind = "standin"

        def __init__(self, spec):
            record(spec.engine.env["BJ_TRACE_OUT"])

        async def generate(self, request):
            await asyncio.sleep(0.01)
            return Result(text="x", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

        def close(self):
            pass

    def factory(spec):
        return Standin(spec)

    connect, build = pipeline.connect_ray, pipeline.build_dataset

    def timed_connect(*args, **kw):
        mark("connect_begin")
        connect(*args, **kw)
        mark("connected")

    def timed_build(*args, **kw):
        mark("plan_begin")
        ds = build(*args, **kw)
        mark("planned")
        return ds

    pipeline.connect_ray, pipeline.build_dataset = timed_connect, timed_build
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import bench/
    spec = parse_spec(
        {
            "name": "trace",
            "input": {"path": a.data, "id_column": a.id_column or None},
            "output": {"path": a.output, "mode": "overwrite"},
            "engine": {"model": a.model, "env": {"BJ_TRACE_OUT": a.trace}},
            "sampling": {"max_tokens": 4},
            "resources": {"replicas": 1, "batch_size": 64},
        }
    )
    mark("spec")
    placement = "pool" if a.child == "raydata" else "replicas"
    pipeline.run(spec, engine_factory=factory, placement=placement)
    mark("done")
    MARKS.update(actor_marks(a.trace))


def child_plain(a) -> None:
    from batchjobs import pipeline  # as the raydata driver: the same imports before joining

    mark("imported")
    import ray

    from batchjobs.cluster import connect_ray

    mark("connect_begin")
    connect_ray()
    mark("connected")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote
    class Plain:
        def __init__(self, trace: str):
            import batchjobs.actor  # noqa: F401 - what an engine actor imports first

            record(trace)

        def ping(self) -> bool:
            return True

    env = {"BJ_TRACE_OUT": a.trace, "RAY_kill_child_processes_on_worker_exit": "false"}
    actor = Plain.options(num_cpus=1, runtime_env={"env_vars": env}).remote(a.trace)
    mark("actor_created")
    import ray.data  # noqa: F401 - the driver's next step: Ray Data's import and plan

    mark("ray_data_imported")
    ray.get(actor.ping.remote())
    del pipeline
    MARKS.update(actor_marks(a.trace))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="rounds run first and left out of the medians "
        "(the first driver after the head's start was 2-3 s slower here)",
    )
    p.add_argument("--model", default="models/tiny-llama")
    p.add_argument("--data", default="jobs/data/demo", help="input shards (a directory)")
    p.add_argument("--id-column", default="id")
    p.add_argument("--out", help="write the runs and medians here as JSON")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--trace", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, str(REPO))
        (child_plain if a.child == "plain" else child_pipeline)(a)
        print("TRACE " + json.dumps(MARKS), flush=True)
        return

    sys.path.insert(0, str(HERE))
    from bench import running_head  # bench/bench.py

    runs = []
    with tempfile.TemporaryDirectory() as tmp, running_head(True) as env:
        for r in range(-a.warmup, a.rounds):
            for kind in KINDS:
                trace = str(Path(tmp) / f"{kind}-{r}.jsonl")
                cmd = [sys.executable, __file__, "--child", kind, "--trace", trace]
                cmd += ["--model", a.model, "--data", a.data, "--id-column", a.id_column]
                cmd += ["--output", str(Path(tmp) / "out")]
                proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
                line = next((s for s in proc.stdout.splitlines() if s.startswith("TRACE ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"{kind} driver failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
                marks = json.loads(line[len("TRACE ") :])
                runs.append({"round": r, "driver": kind, **marks})
                print(kind, json.dumps(marks), flush=True)
    medians = {}
    for kind in KINDS:
        mine = [x for x in runs if x["driver"] == kind and x["round"] >= 0]
        medians[kind] = {
            k: round(statistics.median(x[k] for x in mine), 3)
            for k in mine[0]
            if isinstance(mine[0][k], float) and all(k in x for x in mine)
        }
    init = {kind: medians[kind]["actor_init"] for kind in KINDS}
    print(
        f"driver start -> engine actor __init__ (median of {a.rounds}): in Ray Data's actor "
        f"{init['raydata']:.2f} s, in a replica the driver starts {init['early']:.2f} s "
        f"({init['raydata'] - init['early']:.2f} s sooner), a bare actor at join "
        f"{init['plain']:.2f} s"
    )
    if a.out:
        Path(a.out).write_text(json.dumps({"runs": runs, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
