"""Run a job: plan (``planning``) → the Ray Data graph (``graph``) → staged Parquet →
commit, with the run's summary and record.

The driver never holds rows. It holds one small summary per staged file, commits a shard
as soon as all its rows are staged, and keeps the manifest current, so a killed driver
loses at most the shards that were still in flight.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batchjobs import readgate, stopping
from batchjobs.cluster import check_resources, connect_ray, resolve_device, wait_for_exit
from batchjobs.errors import BatchJobError, dead_engine, unwrap
from batchjobs.feeding import (
    start_gate_s,
)
from batchjobs.graph import build_dataset, drop_block_stats
from batchjobs.layout import RUNS, run_record
from batchjobs.openai_batch.spec import resolve as resolve_format
from batchjobs.planning import Plan, plan_job, retire_superseded
from batchjobs.records import ShardCounts
from batchjobs.replicas import (
    ENGINE_STOP_TIMEOUT_S,
    EarlyReplicas,
    start_replicas,
    stop_replicas,
)
from batchjobs.secrets import public_spec, spec_secrets
from batchjobs.shard_errors import check_outcome
from batchjobs.sink import OutputRoot
from batchjobs.spec import JobSpec
from batchjobs.tasks import task_for
from batchjobs.tracker import Progress, Tracker

log = logging.getLogger("batchjobs")
ERROR_STOP_TIMEOUT_S = 10.0  # a failed job does not wait long for its engines to close


@dataclass
class RunSummary:
    name: str
    output: str
    fingerprint: str
    shards: int
    shards_skipped: int
    shards_run: int
    task: str = "generate"
    device: str = ""  # where the engines ran: cuda or cpu (gpu_s are then CPU-seconds)
    rows: int = 0
    error_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    wall_s: float = 0.0
    teardown_s: float = 0.0  # after wall_s: waiting for the engine replicas to shut down
    engine_s: float = 0.0  # what the rows' work cost (cost.py), GPU-seconds / GPUs
    # Job overhead in GPU-seconds: the replicas' start-up, idle and under-fill (busy time
    # beyond what the rows' work accounts for); underfill_s is that last part.
    overhead_s: float = 0.0
    underfill_s: float = 0.0
    cost_weights: dict = field(default_factory=dict)  # cost.Weights the rows were charged at
    gpu_s: float = 0.0
    cost_usd: float = 0.0
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    # The output files' Parquet schema metadata (task, fingerprint, an embedding's size).
    output_metadata: dict[str, str] = field(default_factory=dict)
    # The task's figures over all the job's committed shards (Task.report): an eval's
    # accuracy per metric and group, as in <output>/_eval.json; empty for other tasks.
    metrics: dict[str, Any] = field(default_factory=dict)
    # Input shards that could not be read (not in the output), by id, with why.
    failed_shards: dict[str, str] = field(default_factory=dict)
    trust_remote_code: bool = False  # the model directory's own code ran in the engines

    @property
    def tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.wall_s if self.wall_s else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tokens_per_s"] = self.tokens_per_s
        d["output_tokens_per_s"] = self.output_tokens_per_s
        return d


def _execute(
    plan: Plan,
    summary: RunSummary,
    device: str,
    replicas: EarlyReplicas | None,
    engine_factory: Callable | None,
    progress: Callable[[str], None] | None,
    progress_every: float,
    board=None,
    on_progress: Callable | None = None,
    run_started: float = 0.0,
) -> None:
    """Run the Ray Data plan to its end; the replicas' figures go into ``summary``.

    Progress samples go to ``on_progress`` (then ``progress`` gets messages only, not the
    plain progress lines), to ``<output>/_progress.jsonl`` and to Ray's metrics."""
    import ray

    from batchjobs.progress import ProgressLog, RayMetrics

    spec = plan.spec
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data starts a thread per map task that polls the process's memory every
    # second, for stats batchjobs never reads; with hundreds of batches in flight per
    # engine actor that is CPU taken from the engine's front end.
    ctx.memory_usage_poll_interval_s = None
    ctx.wait_for_min_actors_s = start_gate_s(spec)
    gpus = spec.gpus_per_replica() if device == "cuda" else 1  # a CPU replica is priced as one unit
    samples = ProgressLog(plan.out, run_started)
    metrics = RayMetrics(spec.name)

    def sampled(p: Progress) -> None:
        samples(p)
        metrics(p)
        if on_progress is not None:
            on_progress(p)

    lines = progress if on_progress is None else None
    tracker = Tracker(plan, gpus, lines, progress_every, board, sampled, device)
    summary.device = device
    ticking = threading.Event()
    # Samples while no rows come in too (the engines starting): the display, the samples
    # file and the metrics show the whole run.
    ticker = threading.Thread(
        target=_tick, args=(tracker, ticking, progress_every), name="progress", daemon=True
    )
    ticker.start()
    gate = readgate.start(readgate.read_ahead_rows(spec, device))
    try:
        with warnings.catch_warnings():
            # Ray Data warns when a job has fewer read groups or staged files than the
            # read/write task cap (every small job): a cap, not a request for more work.
            warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
            dataset = build_dataset(plan, device, engine_factory, replicas, board, gate)
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                tracker.add(batch)
                gate.wrote.remote(sum(batch.column("rows").to_pylist()))
                drop_block_stats(dataset)  # the driver does not grow with the rows
    except Exception as exc:  # noqa: BLE001
        raise _translate(exc) from None
    finally:
        ticking.set()
        ticker.join()
        readgate.stop(gate)
    tracker.finish()
    summary.failed_shards.update(tracker.failed)
    plan.out.remove_empty_staging()
    tracker.read_board(rows=tracker.done_rows)
    tracker.settle()
    samples(tracker.snapshot(), force=True)  # the last figures, whenever the last sample was
    summary.replicas = tracker.replicas
    summary.output_metadata = tracker.metadata
    summary.cost_weights = tracker.weights.to_dict()
    # Overhead: replica time no row was charged for (start-up, waiting for work, under-fill).
    reps = tracker.replicas.values()
    summary.underfill_s = sum(r["underfill_s"] for r in reps) * gpus
    summary.overhead_s = (
        sum(r["startup_s"] + r["idle_s"] for r in reps) * gpus + summary.underfill_s
    )


def _tick(tracker: Tracker, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(max(every_s, 0.5)):
        try:
            tracker.tick()
        except Exception as exc:  # noqa: BLE001 - a missed sample never fails the job
            log.debug("progress sample failed: %s", exc)


def run(
    spec: JobSpec,
    *,
    fresh: bool = False,
    engine_factory: Callable | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 5.0,
    placement: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunSummary:
    """Run a job to completion and return its summary; raise ``BatchJobError`` on failure.

    ``progress`` gets messages, and the plain progress lines every ``progress_every``
    seconds unless ``on_progress`` takes the samples typed (``tracker.Progress``) instead.
    Either way the samples also go to ``<output>/_progress.jsonl`` and Ray's metrics.

    ``placement`` says where the engines run: ``None`` for the default of the device and
    pool (``replicas.engine_placement``), ``"replicas"`` or ``"pool"`` to choose one (tests
    and benchmarks cover both placements on one machine this way)."""
    started = time.time()
    plan: Plan | None = None
    summary: RunSummary | None = None
    stopped: EarlyReplicas | None = None  # the replicas left to stop after a stop's record
    try:
        spec = resolve_format(spec)  # input.format auto: OpenAI Batch requests or not
        plan = plan_job(spec, fresh=fresh)
        summary = RunSummary(
            name=spec.name,
            output=spec.output.path,
            fingerprint=plan.fingerprint,
            task=spec.task,
            shards=len(plan.shards),
            shards_skipped=len(plan.skipped),
            shards_run=len(plan.todo),
            failed_shards=dict(plan.failed),
            trust_remote_code=spec.engine.trust_remote_code,
        )
        try:
            retire_superseded(plan)
            replicas = None
            if plan.todo:
                for shard in plan.todo:
                    plan.out.clear_shard(shard.shard_id)
                connect_ray()
                device = resolve_device(spec)
                check_resources(spec, device, progress)
                board = start_board()
                if progress:
                    progress(
                        f"[{spec.name}] starting {spec.resources.replicas} engine replica(s): "
                        f"{spec.engine.kind} {spec.engine.model} on {device}"
                    )
                # Before Ray Data is even imported: the engines start while the driver plans.
                replicas = start_replicas(spec, device, engine_factory, placement, board=board)
                try:
                    _execute(
                        plan,
                        summary,
                        device,
                        replicas,
                        engine_factory,
                        progress,
                        progress_every,
                        board,
                        on_progress,
                        started,
                    )
                except BaseException as exc:
                    if isinstance(stopping.classify(exc), stopping.Stopped):
                        stopped = replicas  # stopped once the run is recorded
                    else:
                        stop_replicas(replicas, timeout_s=ERROR_STOP_TIMEOUT_S)
                    raise
            plan.manifest.compact()  # one complete _manifest.jsonl, no _manifest.d/ left
            summary.metrics = task_for(spec).report(plan.out, plan.manifest.committed()) or {}
        finally:
            # A failed run's record counts what it committed too.
            ran = {s.shard_id for s in plan.todo}
            for rec in plan.manifest.committed().values():
                if rec.shard_id in ran:
                    ShardCounts.add(summary, rec)
                    summary.engine_s += rec.engine_s
                    summary.gpu_s += rec.gpu_s
                    summary.cost_usd += rec.cost_usd
            summary.gpu_s += summary.overhead_s
            summary.cost_usd += summary.overhead_s / 3600 * spec.cost.price_per_gpu_hour()
            summary.wall_s = time.time() - started
        if plan.todo:
            if progress:
                progress(
                    f"[{spec.name}] all rows committed; waiting for the engine replicas to stop"
                )
            summary.teardown_s = _stop_engines(replicas)
        # Every row that could be read is written: now failed shards and too many error
        # rows make the run fail (exit 3 and 7), recorded as such.
        check_outcome(
            spec, summary.failed_shards, list(plan.manifest.committed().values()), summary
        )
    except BaseException as exc:
        # On a stop (SIGTERM, Ctrl-C) the record comes first: ``ray job stop`` allows the
        # driver 3 s before it kills it.
        _append_run(spec, plan, summary, started, failure=stopping.classify(exc))
        try:
            stop_replicas(stopped, timeout_s=stopping.remaining(ERROR_STOP_TIMEOUT_S))
        except Exception as why:  # noqa: BLE001 - the stop is what the caller must see
            log.warning("cannot stop the engine replicas: %s", why)
        raise
    _append_run(spec, plan, summary, started)
    return summary


def start_board():
    """The actor the engine replicas report their figures to (``actor.ReplicaBoard``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from batchjobs.actor import ReplicaBoard

    # On the driver's node, which lives as long as the job: the board has no restarts, and
    # a GPU node that goes away mid-job must not take it, and the job, with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(ReplicaBoard).options(num_cpus=0, scheduling_strategy=here).remote()


def _stop_engines(replicas: EarlyReplicas | None) -> float:
    """Close the replicas the driver started and wait for every engine's process to end
    (``cluster.wait_for_exit``); the seconds waited. Every row is committed by now: this
    only keeps the exit clean."""
    from batchjobs.actor import EarlyReplica, EngineStage

    t0 = time.time()
    stop_replicas(replicas)
    # By the class, not a copy of its name: a renamed class would make this wait for nothing.
    left = wait_for_exit((EarlyReplica.__name__, EngineStage.__name__), ENGINE_STOP_TIMEOUT_S)
    if left:
        log.warning(
            "%d engine replica(s) still shutting down after %.0fs; leaving them to Ray",
            left,
            ENGINE_STOP_TIMEOUT_S,
        )
    waited = time.time() - t0
    log.info("engine replicas stopped in %.1fs", waited)
    return waited


def _append_run(
    spec: JobSpec,
    plan: Plan | None,
    summary: RunSummary | None,
    started: float,
    failure: BaseException | None = None,
) -> None:
    """Append the run's record to ``_runs.jsonl`` (``layout.run_record``): on success, and
    on a failure too, so a scheduler finds the exit code and the reason beside the output.

    A failure never hides behind this: what cannot be written is logged. A run that failed
    before planning finished records it too, except under ``output.mode: error``, where the
    file would make the root non-empty and refuse the rerun.
    """
    ended = time.time()
    try:
        if plan is not None:
            out = plan.out
            if failure is not None:
                plan.manifest.compact()  # the commits so far in one _manifest.jsonl
        elif spec.output.mode == "error":
            return
        else:
            out = OutputRoot(spec.output.path, spec.output.storage_options)
        if summary is not None:
            base = {**summary.to_dict(), "spec": public_spec(spec)}
            committed = plan.manifest.committed()
            base["shards_committed"] = sum(1 for s in plan.todo if s.shard_id in committed)
        else:
            base = {"name": spec.name, "output": spec.output.path}
        record = run_record(
            base,
            started_at=started,
            ended_at=ended,
            failure=failure,
            secrets=spec_secrets(spec),
        )
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        out.write_atomic(RUNS, (out.read(RUNS) or b"") + line)
    except Exception as exc:  # noqa: BLE001
        if failure is None:
            raise
        log.warning("cannot record the failed run in %s/%s: %s", spec.output.path, RUNS, exc)


def _translate(exc: BaseException) -> BatchJobError:
    """Turn whatever Ray raised into one of ours with a readable message."""
    root = unwrap(exc)
    if isinstance(root, BatchJobError):
        return root
    dead = dead_engine(exc)
    if dead is not None:
        return dead
    cur: BaseException = exc
    while getattr(cur, "cause", None) is not None or cur.__cause__ is not None:
        nxt = getattr(cur, "cause", None) or cur.__cause__
        if not isinstance(nxt, BaseException) or nxt is cur:
            break
        cur = nxt
    message = str(cur).strip().splitlines()
    return BatchJobError(f"job failed: {type(cur).__name__}: {message[-1] if message else ''}")
