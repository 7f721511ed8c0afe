"""Driver-side bookkeeping of a running job: per-shard sums from the write stage's
summaries, a shard committed the moment all its rows are staged, the engine replicas'
figures from their board, and progress lines."""

from __future__ import annotations

import collections
import functools
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from batchjobs import compat, stopping
from batchjobs.cost import Weights, fit_for_job
from batchjobs.engineconfig import configuration
from batchjobs.engines import engine_kind
from batchjobs.errors import OutputError
from batchjobs.manifest import COMMITTED, ShardRecord
from batchjobs.readers import shard_rows
from batchjobs.records import ShardCounts
from batchjobs.shard_errors import failure_of
from batchjobs.tasks import task_for

if TYPE_CHECKING:
    from batchjobs.planning import Plan


def _locked(method):
    """Run under the tracker's lock: ``add`` on the driver's loop and ``tick`` on a timer."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return run


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
        device: str = "cuda",
    ):
        self.plan = plan
        self.device = device
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
            **configuration(plan.out, plan.spec),  # which configuration (pilot: candidate)
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
        self.failed: dict[str, str] = {}  # shards that could not be read, with why
        self.t0 = time.time()
        self.last_print = 0.0
        self.last_line = ""
        self.total_bytes = sum(s.size for s in plan.todo) or 1
        self.by_id = {s.shard_id: s for s in plan.todo}
        self.done_rows = self.done_err = self.done_ptok = self.done_ctok = 0
        self.committed = 0
        self.error_kinds: dict[str, int] = {}  # error rows by progress.error_kind
        self.first_row_at: float | None = None
        # (time, rows, prompt tokens, output tokens) of recent samples: the rates "now".
        self.recent: collections.deque = collections.deque(maxlen=64)
        self.states: dict[str, int] = {}  # the replicas' actors by state (compat)
        self.restarts = 0
        self.lock = threading.RLock()
        self.device_s_max = 0.0

    @_locked
    def tick(self) -> None:
        """A sample when one is due even if no rows came in (the engines starting, long
        batches): called every few seconds from a timer thread."""
        self._maybe_print()

    @_locked
    def add(self, summary: pa.Table) -> None:
        for row in summary.to_pylist():
            sid = row["shard_id"]
            why = failure_of(row)
            if why is not None or sid in self.failed:
                self._fail(sid, why)
                continue
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
            for kind, n in json.loads(row.get("errors") or "{}").items():
                self.error_kinds[kind] = self.error_kinds.get(kind, 0) + n
            if self.first_row_at is None:
                self.first_row_at = time.time()
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

    def read_states(self) -> None:
        """The engine replicas' actors by state (up, starting, restarting) and their restarts
        so far, from the cluster's actor table; left as they were where it cannot be read."""
        if self.board is None:
            return
        import ray

        from batchjobs.actor import EarlyReplica, EngineStage

        try:
            job = ray.get_runtime_context().get_job_id()
            # The driver's own replicas when it started them; else Ray Data's engine actors
            # (which, beside the driver's replicas, only forward batches).
            for cls in (EarlyReplica, EngineStage):
                states, restarts = compat.ray_actor_states(job, cls.__name__)
                if states:
                    break
        except compat.CompatError:
            return
        self.states, self.restarts = states, restarts

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
        with stopping.critical():  # a stop signal waits until the shard is recorded
            self._commit_now(sid)

    def _commit_now(self, sid: str) -> None:
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

    def _fail(self, sid: str, why: str | None) -> None:
        """A shard that could not be read: its rows so far are dropped, it is never
        committed (shard_errors.py). Rows of it that come later are dropped too."""
        if why is None or sid in self.failed or sid in self.committed_ids:
            return  # a later row of a failed shard; or a failure after every row came
        self.failed[sid] = why
        self.pending.pop(sid, None)
        self.files.pop(sid, None)
        self.expected.pop(sid, None)

    def finish(self) -> None:
        """Commit shards that produced no rows (empty files), drop the staged rows of shards
        that failed; anything else left is lost work."""
        for sid in self.failed:
            self.plan.out.clear_shard(sid)
        seen = set(self.plan.manifest.committed()) | set(self.pending) | set(self.failed)
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
        missing = [
            s.shard_id
            for s in self.plan.todo
            if s.shard_id not in committed and s.shard_id not in self.failed
        ]
        if missing:
            raise OutputError(
                f"{len(missing)} shard(s) did not receive all their rows: {', '.join(missing[:5])}"
            )
        self._maybe_print(force=True)

    def snapshot(self) -> Progress:
        """Where the job stands now."""
        now = time.time()
        seen_bytes = sum(self.by_id[s].size for s in self.expected)
        total_rows = (
            sum(self.expected.values()) * self.total_bytes / seen_bytes if seen_bytes else 0
        )
        # The rates "now": since the oldest recent sample at least RATE_WINDOW_S old.
        here = (now, self.done_rows, self.done_ptok, self.done_ctok)
        base = next((s for s in reversed(self.recent) if now - s[0] >= RATE_WINDOW_S), None)
        base = base or (self.recent[0] if self.recent else None)
        self.recent.append(here)
        window = tuple(b - a for a, b in zip(base, here)) if base else (0.0, 0, 0, 0)
        # What the replicas' time has cost so far (start-up, busy and idle, as reported),
        # and at the end if the replicas up now go on at this cost until the ETA.
        price = self.price / 3600
        device_s = sum(r["startup_s"] + r["busy_s"] + r["idle_s"] for r in self.raw.values())
        # Replicas that have not reported yet (their engines still starting) hold their
        # devices too: counted from the start of the data stage.
        holding = (
            sum(self.states.get(s, 0) for s in ("ALIVE", "PENDING_CREATION", "RESTARTING"))
            if self.states
            else self.plan.spec.resources.replicas
        )
        device_s += max(0, holding - len(self.raw)) * (now - self.t0)
        # That estimate may exceed what the replica then reports (its start-up is timed
        # from its own start): "so far" never goes down.
        device_s = self.device_s_max = max(device_s * self.gpus, self.device_s_max)
        up = self.states.get("ALIVE", len(self.raw))
        ready = [r["ready_at"] for r in self.raw.values() if r.get("ready_at")]
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
            started_at=self.t0,
            first_row_s=None if self.first_row_at is None else self.first_row_at - self.t0,
            ready_s=min(ready) - self.t0 if ready else None,
            window_s=window[0],
            window_rows=window[1],
            window_prompt_tokens=window[2],
            window_completion_tokens=window[3],
            device=self.device,
            device_s=device_s,
            usd=device_s * price,
            usd_per_s=up * self.gpus * price,
            replicas_planned=self.plan.spec.resources.replicas,
            replicas_up=up,
            replicas_starting=sum(
                n
                for s, n in self.states.items()
                if s in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")
            ),
            replicas_restarting=self.states.get("RESTARTING", 0),
            restarts=self.restarts,
            replica_figures={
                name: {
                    "busy_share": r["busy_share"],
                    "inflight": r["mean_inflight"],
                    "rows": int(self.raw[name].get("rows", 0)),
                }
                for name, r in self.replicas.items()
            },
            error_kinds=dict(self.error_kinds),
        )

    def _maybe_print(self, force: bool = False) -> None:
        now = time.time()
        if self.quiet:
            return
        if not force and now - self.last_print < self.progress_every:
            return
        self.read_board()
        self.read_states()
        event = self.snapshot()
        line = event.line()
        # The final line only when it says something new (not just later rates).
        if line.split("; output")[0] != self.last_line.split("; output")[0] or not force:
            self.progress(line)
        if self.on_progress is not None:
            self.on_progress(event)
        self.last_print, self.last_line = now, line


RATE_WINDOW_S = 30.0  # the rates "now" are over about this many seconds


@dataclass(frozen=True)
class Progress:
    """One progress sample of a running job, as the driver sees it. ``str()`` of it is the
    plain progress line.

    Times are seconds since the driver began the job's data stage (``started_at``); the
    engines' start-up may overlap it. Rates say what they cover: ``*_now`` over the last
    ``window_s`` seconds, ``*_avg`` since the first engine was ready (start-up excluded;
    before any replica has reported, since the first rows were written).
    Money and device time count the replicas' time as reported (start-up included);
    ``device_s`` is GPU-seconds, or CPU-seconds where ``device`` is ``cpu``."""

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
    started_at: float = 0.0  # time.time() at elapsed_s 0
    first_row_s: float | None = None  # elapsed_s when the first rows were written
    ready_s: float | None = None  # elapsed_s when the first engine was ready (may be < 0)
    window_s: float = 0.0  # the span of the rates "now" and the counts over it
    window_rows: int = 0
    window_prompt_tokens: int = 0
    window_completion_tokens: int = 0
    device: str = "cuda"
    device_s: float = 0.0  # replica time so far × devices per replica
    usd: float = 0.0  # what device_s cost
    usd_per_s: float = 0.0  # what the replicas up now cost per second
    replicas_planned: int = 0
    replicas_up: int = 0
    replicas_starting: int = 0
    replicas_restarting: int = 0
    restarts: int = 0  # replica restarts so far
    # Per replica: busy_share and inflight (mean requests in its engine while busy) since
    # its start-up, rows served.
    replica_figures: dict[str, dict] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)  # error rows by kind

    @property
    def fraction(self) -> float:
        return min(1.0, self.rows / self.rows_total) if self.rows_total else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds to the last row at the rows' average rate (start-up
        excluded); None before there is a rate or once all rows are in."""
        f = self.fraction
        rate = self.rows_per_s_avg
        if not 0 < f < 1 or not rate:
            return None
        return (self.rows_total - self.rows) / rate

    @property
    def output_tokens_per_s(self) -> float:
        """Output tokens per second since ``started_at`` (start-up included)."""
        return self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def _since_first(self, count: int) -> float | None:
        since = self.ready_s if self.ready_s is not None else self.first_row_s
        if since is None or self.elapsed_s - since <= 0:
            return None
        return count / (self.elapsed_s - since)

    @property
    def rows_per_s_avg(self) -> float | None:
        return self._since_first(self.rows)

    @property
    def input_tokens_per_s_avg(self) -> float | None:
        return self._since_first(self.prompt_tokens)

    @property
    def output_tokens_per_s_avg(self) -> float | None:
        return self._since_first(self.completion_tokens)

    def _now(self, count: int) -> float | None:
        return count / self.window_s if self.window_s > 0 else None

    @property
    def rows_per_s_now(self) -> float | None:
        return self._now(self.window_rows)

    @property
    def input_tokens_per_s_now(self) -> float | None:
        return self._now(self.window_prompt_tokens)

    @property
    def output_tokens_per_s_now(self) -> float | None:
        return self._now(self.window_completion_tokens)

    @property
    def usd_projected(self) -> float | None:
        """The job's cost at its end: so far, plus the replicas up now until the ETA."""
        if self.fraction >= 1:
            return self.usd
        eta = self.eta_s
        return None if eta is None else self.usd + self.usd_per_s * eta

    def line(self) -> str:
        """The plain progress line (its head up to "shards committed" is read back by
        ``ops.jobs``; keep it)."""
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None else "-"
        from batchjobs.display import usd

        now, avg = self.output_tokens_per_s_now, self.output_tokens_per_s_avg
        if not self.rows and not self.replicas:
            of = f" of {self.replicas_planned}" if self.replicas_planned else ""
            rates = f"engines starting ({self.replicas_up}{of} up)"
        elif now is not None and avg is not None:
            rates = f"output {now:.0f} tok/s now, {avg:.0f} since the engines were ready"
        else:
            rates = f"output {self.output_tokens_per_s:.0f} tok/s since the start"
        return (
            f"[{self.job}] {self.rows} rows ({self.fraction:.0%}), {self.error_rows} errors, "
            f"{self.shards_committed}/{self.shards_total} shards committed; {rates}; "
            f"{usd(self.usd)} so far; ETA {eta}"
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
