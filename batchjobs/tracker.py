"""Driver-side bookkeeping of a running job: per-shard sums from the write stage's
summaries, a shard committed the moment all its rows are staged, the engine replicas'
figures from their board, and progress lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from batchjobs.cost import Weights, fit_for_job
from batchjobs.engines import engine_kind
from batchjobs.errors import OutputError
from batchjobs.manifest import COMMITTED, ShardRecord
from batchjobs.readers import shard_rows
from batchjobs.records import ShardCounts
from batchjobs.tasks import task_for

if TYPE_CHECKING:
    from batchjobs.planning import Plan


class Tracker:
    """Driver-side bookkeeping: per-shard sums, commit when complete, progress lines."""

    def __init__(
        self,
        plan: Plan,
        gpus_per_replica: int,
        progress: Callable[[str], None] | None,
        progress_every: float = 5.0,
        board=None,
        on_progress: Callable[[Progress], None] | None = None,
    ):
        self.plan = plan
        self.task = task_for(plan.spec)  # its shard_metrics: the manifest's metrics
        self.board = board  # the replicas' ReplicaBoard actor, or None
        self.progress_every = progress_every
        self.gpus = gpus_per_replica
        self.price = plan.spec.cost.price_per_gpu_hour()
        self.quiet = progress is None and on_progress is None
        self.progress = progress or (lambda line: None)
        self.on_progress = on_progress  # typed samples, for displays and progress files
        self.info = {
            "engine": engine_kind(plan.spec.engine.kind).label(),
            "model": plan.spec.engine.model,
        }
        self.pending: dict[str, ShardRecord] = {}
        self.files: dict[str, list[str]] = {}
        self.expected: dict[str, int] = {}
        self.replicas: dict[str, dict[str, float]] = {}  # per replica, as the summary shows it
        self.metadata: dict[str, str] = {}  # the output files' schema metadata
        self.raw: dict[str, dict[str, float]] = {}  # per replica, as reported
        self.windows: list = []  # the replicas' work windows (cost.Windows), all of them
        self.weights = Weights(0.0, 0.0, "busy")  # until the replicas have reported
        self.committed_ids: list[str] = []
        self.t0 = time.time()
        self.last_print = 0.0
        self.last_line = ""
        self.total_bytes = sum(s.size for s in plan.todo) or 1
        self.by_id = {s.shard_id: s for s in plan.todo}
        self.done_rows = self.done_err = self.done_ptok = self.done_ctok = 0
        self.committed = 0

    def add(self, summary: pa.Table) -> None:
        for row in summary.to_pylist():
            sid = row["shard_id"]
            rec = self.pending.get(sid)
            if rec is None:
                rec = self.pending[sid] = ShardRecord(
                    shard_id=sid,
                    source=self.by_id[sid].url,
                    fingerprint=self.plan.fingerprint,
                    started_at=time.time(),
                    **self.info,
                )
                self.files[sid] = []
                self.expected[sid] = row["shard_rows"]
            rec.add(ShardCounts.of(row))
            for key, value in json.loads(row.get("metrics") or "{}").items():
                rec.metrics[key] = rec.metrics.get(key, 0) + value
            self.files[sid].append(row["file"])
            rec.output_metadata = json.loads(row["metadata"] or "null") or rec.output_metadata
            self.metadata = rec.output_metadata or self.metadata
            self.done_rows += row["rows"]
            self.done_err += row["error_rows"]
            self.done_ptok += row["prompt_tokens"]
            self.done_ctok += row["completion_tokens"]
            if rec.rows == self.expected[sid]:
                self._commit(sid)
            elif rec.rows > self.expected[sid]:
                raise OutputError(
                    f"shard {sid}: {rec.rows} rows staged, but it has {self.expected[sid]}"
                )
        self._maybe_print()

    def read_board(self, rows: int | None = None, timeout_s: float = 10.0) -> None:
        """Take the replicas' latest figures from their board. With ``rows``, wait (up to
        ``timeout_s``) until their reports cover that many rows: a replica reports after
        each batch, and the last report may still be on its way when the data is in."""
        if self.board is None:
            return
        import ray

        deadline = time.time() + timeout_s
        while True:
            latest, windows = ray.get(self.board.snapshot.remote(len(self.windows)))
            self.windows.extend(windows)
            if rows is None or sum(f["rows"] for f in latest.values()) >= rows:
                break
            if time.time() > deadline:
                break
            time.sleep(0.05)
        self.raw = latest
        self.weights = self.job_weights()
        self.replicas = {rep: replica_summary(raw, self.weights) for rep, raw in latest.items()}

    def job_weights(self) -> Weights:
        """What a prefill and a decode token cost, from the replicas' windows so far."""
        reps = self.raw.values()
        return fit_for_job(
            self.windows,
            busy_s=sum(r["busy_s"] for r in reps),
            prefill_tokens=sum(int(r["prompt_tokens"] - r["cached_tokens"]) for r in reps),
            decode_tokens=sum(int(r["completion_tokens"]) for r in reps),
        )

    def settle(self) -> None:
        """Charge every shard this run committed at the run's final weights (a shard
        committed early was charged at the weights known then)."""
        for sid in self.committed_ids:
            rec = self.plan.manifest.records[sid]
            rec.finalise(self.weights, self.gpus, self.price)
            self.plan.manifest.commit(rec)

    def _commit(self, sid: str) -> None:
        rec = self.pending.pop(sid)
        rec.files = self.plan.out.commit(sid, self.files.pop(sid))
        rec.status = COMMITTED
        rec.committed_at = time.time()
        rec.metrics = self.task.shard_metrics(rec.metrics)
        if self.board is not None and not self.windows:
            self.read_board()  # the weights known so far; settle() charges them finally
        rec.finalise(self.weights, self.gpus, self.price)
        self.plan.manifest.commit(rec)
        self.committed += 1
        self.committed_ids.append(sid)

    def finish(self) -> None:
        """Commit shards that produced no rows (empty files); anything else left is lost work."""
        seen = set(self.plan.manifest.committed()) | set(self.pending)
        for shard in self.plan.todo:
            if (
                shard.shard_id not in seen
                and shard_rows(shard, self.plan.spec.input.storage_options) == 0
            ):
                self.pending[shard.shard_id] = ShardRecord(
                    shard_id=shard.shard_id,
                    source=shard.url,
                    fingerprint=self.plan.fingerprint,
                    started_at=time.time(),
                    **self.info,
                )
                self.files[shard.shard_id] = []
                self._commit(shard.shard_id)
        committed = self.plan.manifest.committed()
        missing = [s.shard_id for s in self.plan.todo if s.shard_id not in committed]
        if missing:
            raise OutputError(
                f"{len(missing)} shard(s) did not receive all their rows: {', '.join(missing[:5])}"
            )
        self._maybe_print(force=True)

    def snapshot(self) -> Progress:
        """Where the job stands now."""
        seen_bytes = sum(self.by_id[s].size for s in self.expected)
        total_rows = (
            sum(self.expected.values()) * self.total_bytes / seen_bytes if seen_bytes else 0
        )
        return Progress(
            job=self.plan.spec.name,
            elapsed_s=time.time() - self.t0,
            rows=self.done_rows,
            rows_total=total_rows,
            error_rows=self.done_err,
            prompt_tokens=self.done_ptok,
            completion_tokens=self.done_ctok,
            shards_committed=self.committed,
            shards_total=len(self.plan.todo),
            replicas=len(self.replicas),
            busy_share=busy_share(self.replicas.values()),
        )

    def _maybe_print(self, force: bool = False) -> None:
        now = time.time()
        if self.quiet:
            return
        if not force and now - self.last_print < self.progress_every:
            return
        self.read_board()
        event = self.snapshot()
        line = event.line()
        # The final line only when it says something new (not just a later tok/s).
        if line.split(" output tok/s")[0] != self.last_line.split(" output tok/s")[0] or not force:
            self.progress(line)
        if self.on_progress is not None:
            self.on_progress(event)
        self.last_print, self.last_line = now, line


@dataclass(frozen=True)
class Progress:
    """One progress sample of a running job, as the driver sees it. ``str()`` of it is the
    plain progress line."""

    job: str
    elapsed_s: float
    rows: int
    rows_total: float  # estimated from the bytes of the shards seen so far; 0: unknown yet
    error_rows: int
    prompt_tokens: int
    completion_tokens: int
    shards_committed: int
    shards_total: int
    replicas: int  # replicas that have reported so far
    busy_share: float | None  # their share of time with work since start-up

    @property
    def fraction(self) -> float:
        return min(1.0, self.rows / self.rows_total) if self.rows_total else 0.0

    @property
    def eta_s(self) -> float | None:
        f = self.fraction
        return self.elapsed_s * (1 - f) / f if 0 < f < 1 else None

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def line(self) -> str:
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None else "-"
        return (
            f"[{self.job}] {self.rows} rows ({self.fraction:.0%}), {self.error_rows} errors, "
            f"{self.shards_committed}/{self.shards_total} shards committed, "
            f"{self.output_tokens_per_s:.0f} output tok/s, ETA {eta}"
        )

    __str__ = line


def replica_summary(raw: dict[str, float], weights: Weights) -> dict[str, float | None]:
    """One replica's figures as the run summary shows them, its rows charged at
    ``weights``: the rest of its busy time is its under-fill."""
    prompt, cached = int(raw["prompt_tokens"]), int(raw["cached_tokens"])
    engine_s = weights.charge(prompt - cached, int(raw.get("completion_tokens", 0)))
    return {
        "engine_s": engine_s,
        "underfill_s": raw["busy_s"] - engine_s,
        "startup_s": raw["startup_s"],
        "ready_at": raw["ready_at"],
        "idle_s": raw["idle_s"],
        "busy_s": raw["busy_s"],
        # Mean requests in the engine while it had any, and the cap it ran under (0: none).
        "mean_inflight": raw["inflight_s"] / raw["busy_s"] if raw["busy_s"] else 0.0,
        # Share of the replica's time after start-up (to its last completion) that its
        # engine had work: below 1, feeding left it waiting (or the job ran dry).
        "busy_share": busy_share([raw]),
        "inflight_limit": int(raw["limit"]),
        # Share of prompt tokens the engine's prefix cache served (order: prefix aims to
        # raise it).
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "prefix_cache_hit": cached / prompt if prompt else None,
    }


def busy_share(replicas: Iterable[dict[str, float]]) -> float | None:
    """The replicas' time with work over their time after start-up (``busy_s`` over
    ``busy_s`` + ``idle_s``, summed); None before any of them has done anything."""
    busy = idle = 0.0
    for r in replicas:
        busy += r.get("busy_s", 0.0)
        idle += r.get("idle_s", 0.0)
    return busy / (busy + idle) if busy + idle > 0 else None
