"""Where the engines run, and the engine replicas the driver starts itself.

An engine runs in an actor that holds its devices (``engine_resources``). There are two
placements (``engine_placement``), one per kind of pool:

- ``"replicas"`` (a fixed pool on GPUs): the driver starts those actors as soon as it has
  joined the cluster (``start_replicas``), before Ray Data is imported and plans the
  dataset; Ray Data's actors then each claim one replica (``claim_replica``) and forward their
  batches to it (``actor.EngineStage``).
- ``"pool"`` (on CPU, and any autoscaling pool): the engine lives in Ray Data's actor.

Tests and benchmarks pick one explicitly (``pipeline.run(..., placement=...)``) to cover
both on a CPU machine.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from batchjobs import compat
from batchjobs.engines import warmstart
from batchjobs.feeding import inflight_batches, pool_min
from batchjobs.secrets import credential_env
from batchjobs.spec import JobSpec

log = logging.getLogger("batchjobs")
ENGINE_STOP_TIMEOUT_S = 60.0
Placement = Literal["replicas", "pool"]
PLACEMENTS: tuple[Placement, ...] = ("replicas", "pool")


def engine_env(spec: JobSpec, device: str, engine_factory: Callable | None = None) -> dict:
    """The environment variables of the processes that hold an engine."""
    import ray

    # Ray starts engine actors, like all its workers, at nice 15 (`worker_niceness`), below
    # the raylet and this driver. `engine.env: {RAY_worker_niceness: "0"}` lifts them to the
    # normal priority; on 2 cores that measured within noise of nice 15 (from 0.04 worse to
    # 0.07 better as a share of raw LLM.generate's throughput), so Ray's default stands.
    env = {
        "VLLM_LOGGING_LEVEL": "ERROR",
        # Ray kills an exiting actor's child processes before the shutdown hook that closes
        # the engine runs: vLLM then reports its engine core "exited unexpectedly" (its fork
        # server, or the core itself, is such a child) and the multiprocessing resource
        # tracker dies under the engine's workers. The engine's close stops them instead;
        # if the actor dies without closing, a warm-started engine core follows it
        # (warmstart.follow). tests/integration/test_teardown.py.
        "RAY_kill_child_processes_on_worker_exit": "false",
        # Not the credentials: Ray writes a runtime_env, variables and all, to its own logs.
        # The replica sets them in its process (actor.EngineReplica).
        **{k: v for k, v in spec.engine.env.items() if k not in credential_env(spec.engine.env)},
    }
    if device == "cpu":
        # Ray sets OMP_NUM_THREADS=num_cpus for an actor; the CPU engine wants every core.
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if spec.engine.kind == "vllm" and engine_factory is None:
        # Start the warm fork server as soon as Ray starts an engine actor's process, not
        # seconds later in its __init__ (engines/warmstart.py).
        job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
        env.update(warmstart.setup_hook_env(spec.engine.env, job_env))
    return env


def engine_resources(spec: JobSpec, device: str, engine_factory: Callable | None) -> dict:
    """What an actor holding an engine asks Ray for: its devices, CPUs and environment."""
    return {
        "num_gpus": spec.gpus_per_replica() if device == "cuda" else 0,
        "num_cpus": spec.resources.num_cpus_per_replica,
        "runtime_env": {"env_vars": engine_env(spec, device, engine_factory)},
    }


@dataclass
class EarlyReplicas:
    """Engine replicas the driver started itself (``start_replicas``)."""

    actors: list
    claim_key: str  # the key under which Ray Data's actors claim one each


def engine_placement(spec: JobSpec, device: str, placement: Placement | None = None) -> Placement:
    """Where the engines run: ``placement`` when given, else ``"replicas"`` (started by the
    driver, ``start_replicas``) for a fixed pool on GPUs and ``"pool"`` (in Ray Data's
    actors) otherwise.

    On GPUs, replicas started by the driver start the engine sooner and shorten start-up
    by seconds, with generation unchanged. On a 2-core CPU machine they save no start-up
    and generation is slower: the driver's own start and the forwarding hop share the
    engine's two cores. An autoscaling pool (``min_replicas`` below ``replicas``) always
    keeps its engines in Ray Data's actors, whose number Ray Data decides; asking for
    ``"replicas"`` there is a ``ValueError``.
    """
    if placement is not None and placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS} or None, not {placement!r}")
    fixed = pool_min(spec) == spec.resources.replicas
    if placement == "replicas" and not fixed:
        raise ValueError(
            "placement='replicas' needs a fixed pool: an autoscaling pool (min_replicas < "
            "replicas) keeps its engines in Ray Data's actors"
        )
    if placement is not None:
        return placement
    return "replicas" if fixed and device == "cuda" else "pool"


def start_replicas(
    spec: JobSpec,
    device: str,
    engine_factory: Callable | None = None,
    placement: Placement | None = None,
    board=None,
) -> EarlyReplicas | None:
    """Start the engine replicas now, as Ray actors of their own, or ``None`` when the
    engines belong in Ray Data's actors (``engine_placement``).

    Ray Data would start its engine actors only after importing itself and planning, and
    its actor's process imports Ray Data and pandas before the actor's ``__init__`` starts
    the engine: on an H200 host 6.7 s after the driver's start, against 4.2 s here
    (``bench/start_trace.py``). Started right after the driver joins the cluster, the
    replicas import and start their engines meanwhile; Ray Data's actors then forward
    their batches to them (``actor.EngineStage``).
    """
    import ray

    from batchjobs.actor import EarlyReplica

    res = spec.resources
    if engine_placement(spec, device, placement) != "replicas":
        return None
    cls = ray.remote(EarlyReplica).options(
        max_restarts=res.max_restarts,
        max_task_retries=-1,  # batches held by a replica that died run again on its restart
        max_concurrency=inflight_batches(spec, device) + 4,  # + started, close
        **engine_resources(spec, device, engine_factory),
    )
    # The validated spec itself: an actor does not re-validate it (its node need not
    # see the files the driver checked).
    actors = [cls.remote(spec, engine_factory, board) for _ in range(res.replicas)]
    return EarlyReplicas(actors, uuid.uuid4().hex)


def stop_replicas(replicas: EarlyReplicas | None, timeout_s: float = ENGINE_STOP_TIMEOUT_S) -> None:
    """Close the replicas' engines (their processes stop cleanly), then end the actors."""
    if replicas is None:
        return
    import ray

    closing = [a.close.remote() for a in replicas.actors]
    try:
        ray.wait(closing, num_returns=len(closing), timeout=timeout_s)
    finally:
        for a in replicas.actors:
            ray.kill(a, no_restart=True)
        release_claims(replicas.claim_key)


def claim_replica(replicas: list, token: str):
    """The replica this forwarding actor serves from: the one it claimed before (Ray
    restarted it), else the first one nobody claimed (an atomic put in the GCS's key-value
    store). Past that (more actors than replicas) replicas are shared."""
    import ray

    me = ray.get_runtime_context().get_actor_id() or uuid.uuid4().hex
    try:
        keys = [f"batchjobs/claim/{token}/{i}" for i in range(len(replicas))]
        for i, key in enumerate(keys):
            if compat.ray_kv_get(key) == me.encode():
                return replicas[i]
        for i, key in enumerate(keys):
            if compat.ray_kv_put_new(key, me):
                return replicas[i]
    except Exception as exc:  # noqa: BLE001 - a Ray without this store: share by id
        log.warning("cannot claim an engine replica (%s); sharing one", exc)
    return replicas[hash(me) % len(replicas)]


def release_claims(token: str) -> None:
    """Forget the claims of a finished run (the driver calls it)."""
    try:
        compat.ray_kv_del_prefix(f"batchjobs/claim/{token}/")
    except Exception as exc:  # noqa: BLE001 - a leftover key is harmless
        log.debug("cannot release replica claims: %s", exc)
