"""The engine actor: one engine per Ray actor, fed by many Ray Data batches at once.

The engine lives in an ``EngineReplica``: in Ray Data's actor (``EngineStage``) itself, or,
for a fixed pool, in a Ray actor the driver starts before Ray Data's plan
(``EarlyReplica``), so that vLLM's import and start begin seconds sooner; Ray Data's
actor then forwards its batches there.

Ray Data calls ``__call__`` from up to ``feeding.inflight_batches`` threads of the actor at
a time. Each call hands its rows to one asyncio loop that owns the engine and waits for
them. In-flight work is capped per request, not per batch: a ``Gate`` lets at most
``max_inflight_requests`` rows into the engine, in arrival order, and admits the next row
the moment one finishes. A batch whose other rows are done but whose longest request still
runs holds no engine slot, so long-tailed outputs do not drain the engine as long as the
replica holds more rows than the gate admits.

The job's task (``batchjobs.tasks``) turns each row into an engine request and the
results into its output columns; the replica itself knows nothing of tasks.

An engine that hangs is treated as dead, as one that died (``watchdog.py``).

The replica keeps the clock of its devices (``BusyClock``: start-up, then busy or idle)
and records its work window by window (``cost.Windows``); from those the driver fits what
a prefill and a decode token cost and charges each shard by its rows' tokens (cost.py).
Each row carries the prompt tokens the engine's prefix cache served (``_cached_tokens``,
summed per shard by the sink); the replica's own figures go to the driver on their own
channel, a ``ReplicaBoard`` actor.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from batchjobs.cost import Windows
from batchjobs.engines import make_engine
from batchjobs.engines.base import Engine, EngineDead, Result
from batchjobs.engines.causes import OutputTail, start_cause
from batchjobs.errors import BatchJobError, EngineError
from batchjobs.readers import (
    INPUT_ERROR,
    PARAMS,
    PAYLOAD,
    ROW_ID,
    ROW_INDEX,
    SHARD_ID,
    SHARD_ROWS,
    WHERE,
)
from batchjobs.replicas import claim_replica
from batchjobs.rowcheck import safe_columns
from batchjobs.secrets import credential_env
from batchjobs.spec import JobSpec
from batchjobs.tasks import Prepared, task_for
from batchjobs.watchdog import watch_replica

log = logging.getLogger("batchjobs.actor")

EngineFactory = Callable[[JobSpec], Engine]
CACHED = "_cached_tokens"  # a row's prompt tokens served by the prefix cache (sink reads it)


class EngineStage:
    """Ray Data's callable class for the engine stage: a batch of read rows in, a batch of
    result rows out.

    It serves the batches from an ``EngineReplica`` of its own, or, when the driver started
    the replicas itself before Ray Data's plan (``replicas``: a fixed pool, see
    ``replicas.start_replicas``), forwards them to one of those, claimed for this actor
    alone. Either way its ``__init__`` returns only once its engine is ready, so Ray Data's
    start gate and its share of batches per replica work as with an engine of its own.
    """

    def __init__(
        self,
        spec: JobSpec,
        engine_factory: EngineFactory | None = None,
        replicas: list | None = None,
        claim_key: str | None = None,
        board: Any = None,
    ):
        self.local: EngineReplica | None = None
        self.remote = None
        self.spec_model = spec.engine.model
        if replicas:
            import ray

            self.remote = claim_replica(replicas, claim_key or "")
            ray.get(self.remote.started.remote())  # raises the replica's start error
        else:
            self.local = EngineReplica(spec, engine_factory, board)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.local is not None:
            return self.local(batch)
        import ray

        try:
            return ray.get(self.remote.process.remote(batch))
        except ray.exceptions.RayActorError as exc:
            # Ray restarts a dead replica and runs its batches again (max_task_retries) as
            # long as resources.max_restarts allows; past that, or with its node gone, it
            # is dead for good, and so is this job's use of it.
            first = (str(exc).strip().splitlines() or [""])[0]
            raise EngineError(
                f"engine replica for model {self.spec_model!r} died and Ray did not restart it "
                f"(resources.max_restarts used up, or its node is gone): {first}"
            ) from None

    def __del__(self):
        # Ray Data's only end-of-pool hook: its worker drops the UDF in __ray_shutdown__
        # so that __del__ runs before the process exits. Closing here lets the engine
        # stop its processes cleanly instead of dying with the actor (and logging errors).
        # A forwarded replica is the driver's to close.
        if self.local is not None:
            self.local.close()


class EngineReplica:
    """One engine and its accounting: a batch of read rows in, a batch of result rows out.
    Lives in Ray Data's actor (``EngineStage``) or in a Ray actor of its own
    (``EarlyReplica``)."""

    def __init__(
        self, spec: JobSpec, engine_factory: EngineFactory | None = None, board: Any = None
    ):
        # The spec arrives as the driver validated it (pickled, not re-validated here: this
        # node need not see the files the driver checked).
        self.spec = spec
        self.task = task_for(spec)
        self.board = board
        self.rows = 0
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        started = time.time()
        # engine.env's credentials: set here, not in Ray's runtime_env (replicas.engine_env),
        # which Ray writes to its own logs; the engine's processes inherit them from here.
        os.environ.update(credential_env(spec.engine.env))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="engine-loop", daemon=True
        )
        self.thread.start()
        output = OutputTail()  # where the engine's processes print why they failed
        try:
            self.engine = self._on_loop(_construct(engine_factory or make_engine, self.spec))
        except BatchJobError:
            raise
        except Exception as exc:
            raise EngineError(
                f"replica {self.replica}: engine {self.spec.engine.kind} for model "
                f"{self.spec.engine.model!r} failed to start: {start_cause(exc, output)}"
            ) from exc
        try:
            self._on_loop(self.task.setup(self.engine))
        except Exception as exc:
            raise EngineError(
                f"replica {self.replica}: task {self.spec.task} could not start on engine "
                f"{self.spec.engine.kind} for model {self.spec.engine.model!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.ready = time.time()
        self.startup_s = self.ready - started
        self.clock = BusyClock(self.ready)
        self.limit = inflight_limit(self.spec, self.engine)
        self.prompt_tokens = self.cached_tokens = 0  # so far, to report the cache's share
        self.completion_tokens = 0
        self.windows = Windows(self.clock)
        self.reported = 0  # windows sent to the board so far
        self.gate = self._on_loop(_make_gate(self.limit))
        self.watchdog = watch_replica(self)  # a hung engine is a dead one
        log.info(
            "replica %s ready in %.1fs; at most %s requests in its engine",
            self.replica,
            self.startup_s,
            self.limit or "unlimited",
        )

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        payloads = batch.column(PAYLOAD).to_pylist()
        input_errors = batch.column(INPUT_ERROR).to_pylist()
        ids = batch.column(ROW_ID).to_pylist()
        params = [json.loads(p) if p else None for p in batch.column(PARAMS).to_pylist()]
        wheres = batch.column(WHERE).to_pylist() if WHERE in batch.column_names else None
        # Prepared here, in the calling thread (tokenizing, rendering templates), so that
        # the engine's event loop only feeds the engine.
        prepared = self.task.prepare_batch(ids, payloads, input_errors, params, wheres)
        try:
            rows = self._on_loop(_serve(self, prepared))
        except EngineDead as exc:
            # Exit the process: Ray restarts the actor and retries this batch on it,
            # so no row is lost and none is written twice.
            log.error("replica %s: %s; exiting so Ray restarts it", self.replica, exc)
            os._exit(1)
        results, extras = zip(*rows) if rows else ((), ())
        out = pa.table(
            {
                ROW_ID: batch.column(ROW_ID),
                SHARD_ID: batch.column(SHARD_ID),
                ROW_INDEX: batch.column(ROW_INDEX),
                SHARD_ROWS: batch.column(SHARD_ROWS),
                **safe_columns(
                    self.task, list(results), list(extras), wheres or [None] * len(results)
                ),
                CACHED: pa.array([r.cached_tokens for r in results], pa.int64()),
            }
        )
        self.report()
        return out

    def figures(self) -> dict[str, float]:
        """This replica's figures as of now: start-up, ready at, then so far: idle, busy and
        request-seconds in the engine, rows, prompt tokens, those its prefix cache served,
        and generated tokens; its cap on requests in the engine."""
        c = self.clock
        return {
            "startup_s": self.startup_s,
            "ready_at": self.ready,
            "idle_s": c.idle,
            "busy_s": c.busy,
            "inflight_s": c.inflight_s,
            "rows": self.rows,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "limit": self.limit or 0,
        }

    def report(self) -> None:
        """Send this replica's figures to the driver's board (fire and forget)."""
        if self.board is not None:
            closed = self.windows.closed
            new, self.reported = closed[self.reported :], len(closed)
            self.board.report.remote(self.replica, self.figures(), new)

    def close(self) -> None:
        """Shut the engine down and stop the loop thread. Safe to call twice."""
        engine, self.engine = getattr(self, "engine", None), None
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
        if engine is not None:
            try:
                self._on_loop(_close(engine))
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)


class EarlyReplica(EngineReplica):
    """An ``EngineReplica`` as a Ray actor of its own, started by the driver as soon as it
    has joined the cluster (``replicas.start_replicas``), seconds before Ray Data would
    start its actor; Ray Data's ``EngineStage`` forwards its batches here.

    A failed start is kept and raised by ``started`` and ``process`` (so the forwarding actor
    fails with this error, as an ``EngineStage`` holding the engine would), not raised from
    ``__init__``, where Ray would hide it in an actor-died error. A dead engine exits the
    process as in ``EngineReplica``: Ray restarts the actor and retries the batches it held.
    """

    def __init__(
        self, spec: JobSpec, engine_factory: EngineFactory | None = None, board: Any = None
    ):
        self.start_error: BatchJobError | None = None
        try:
            super().__init__(spec, engine_factory, board)
        except BatchJobError as exc:
            self.start_error = exc

    def started(self) -> bool:
        """True once the engine is up; raises its start error instead."""
        if self.start_error is not None:
            raise self.start_error
        return True

    def process(self, batch: pa.Table) -> pa.Table:
        self.started()
        return self(batch)

    def __del__(self):
        self.close()  # the driver closes it first (replicas.stop_replicas); a no-op then


async def _serve(replica: EngineReplica, prepared: list):
    """One batch's prepared rows through the replica's gate and engine: (result, the
    task's extra values) per row; a row that could not be prepared (its error message)
    fails without reaching the engine.

    A function, not a method: Ray makes an actor whose class has a coroutine method an
    asyncio actor, which would run ``EarlyReplica``'s blocking calls one at a time.
    """
    task = replica.task

    async def one(row: Prepared | str) -> tuple[Result, dict]:
        if isinstance(row, str):
            return Result.failed(row), {}
        async with replica.gate:
            replica.clock.start(time.time())
            try:
                result = await task.run(replica.engine, row.request)
            finally:
                replica.clock.stop(time.time())
        # Counted here, on the engine loop's one thread: Ray Data's threads would race.
        replica.prompt_tokens += result.prompt_tokens
        replica.cached_tokens += result.cached_tokens
        replica.completion_tokens += result.completion_tokens
        replica.windows.add(result.prompt_tokens - result.cached_tokens, result.completion_tokens)
        return result, row.extra

    done = await asyncio.gather(*(one(row) for row in prepared))
    replica.rows += len(done)
    return done


class ReplicaBoard:
    """The driver's channel from the engine replicas: each reports its running figures and
    its newly closed work windows after every batch (``EngineReplica.report``); the driver
    reads the latest figures of each and the windows it has not seen. Figures are running
    totals, so the latest report of a replica is all of it."""

    def __init__(self):
        self.latest: dict[str, dict[str, float]] = {}
        self.windows: list[tuple[float, float, int, int]] = []

    def report(self, replica: str, figures: dict[str, float], windows: list) -> None:
        self.latest[replica] = figures
        self.windows.extend(windows)

    def snapshot(self, since: int = 0) -> tuple[dict[str, dict[str, float]], list]:
        """The latest figures of every replica, and the windows after the first ``since``."""
        return self.latest, self.windows[since:]


def inflight_limit(spec: JobSpec, engine: Engine) -> int | None:
    """Requests this replica keeps in its engine: the spec's ``max_inflight_requests``, else
    twice what the engine runs at once (so its scheduler always has the next request
    waiting), else no limit (an engine that states none)."""
    if spec.resources.max_inflight_requests:
        return spec.resources.max_inflight_requests
    runs = engine.max_concurrency()
    return 2 * runs if runs else None


class Gate:
    """At most ``limit`` holders at once, let in strictly in arrival order (``None``: no
    limit). Used on the engine loop only; not thread-safe."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.inside = 0
        self.waiting: collections.deque[asyncio.Future] = collections.deque()

    async def __aenter__(self) -> None:
        if self.limit is None or (self.inside < self.limit and not self.waiting):
            self.inside += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        try:
            await turn  # _leave hands its place over: `inside` is already counted
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._leave()  # admitted and cancelled at once: pass the place on
            elif turn in self.waiting:  # a leaver may have skipped it already
                self.waiting.remove(turn)
            raise

    async def __aexit__(self, *exc) -> None:
        self._leave()

    def _leave(self) -> None:
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.inside -= 1


async def _make_gate(limit: int | None) -> Gate:
    return Gate(limit)  # built on the engine loop, where it is used


class BusyClock:
    """A replica's time after start-up: ``busy`` (any request in the engine) or ``idle``,
    and ``inflight_s``, the integral of the requests in the engine; ``inflight_s`` /
    ``busy`` is the mean number of requests in the engine while it had any, the measure of
    whether feeding kept it full. Only the engine loop thread calls ``start``/``stop``."""

    def __init__(self, t0: float):
        self.t = t0
        self.n = 0
        self.done = 0  # requests finished so far
        self.idle = 0.0
        self.busy = 0.0
        self.inflight_s = 0.0

    def _advance(self, now: float) -> None:
        dt = max(0.0, now - self.t)
        if self.n:
            self.busy += dt
            self.inflight_s += dt * self.n
        else:
            self.idle += dt
        self.t = max(self.t, now)

    def start(self, now: float) -> None:
        self._advance(now)
        self.n += 1

    def stop(self, now: float) -> None:
        self._advance(now)
        self.n -= 1
        self.done += 1


async def _close(engine: Engine) -> None:
    engine.close()


async def _construct(factory: EngineFactory, spec: JobSpec) -> Engine:
    # Built on the engine loop so an async engine binds to the loop that will drive it.
    return factory(spec)
