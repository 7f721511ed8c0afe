"""An engine that hangs is treated as dead.

A hung engine (a deadlocked collective, a stuck engine core, a kernel that never returns)
raises nothing: its requests simply never finish, and a job would wait for them forever.
Each engine replica runs a ``Watchdog``: a thread of its own, so it sees a hang that blocks
the engine's event loop too. While the replica has requests in its engine, the engine must
make progress: finish a request, or (where the engine reports it, ``Engine.progress``: vLLM
counts its steps) take a step. After ``resources.stall_timeout_s`` seconds without any, the
replica stops its engine's processes and exits, as it does when its engine dies
(``actor.EngineReplica``): Ray restarts it, counted against ``resources.max_restarts``, and
runs its batches again on the new engine, so no row is lost and none is written twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger("batchjobs.watchdog")


class Watchdog:
    """Calls ``on_stall(seconds, requests)`` once when ``busy()`` (requests in the engine)
    stays above 0 while ``progress()`` (any value that changes when the engine does work)
    stays the same for ``timeout_s`` seconds. Checks every ``poll_s`` seconds (default: a
    tenth of the timeout, at most 5 s)."""

    def __init__(
        self,
        timeout_s: float,
        busy: Callable[[], int],
        progress: Callable[[], Hashable],
        on_stall: Callable[[float, int], None],
        poll_s: float | None = None,
    ):
        self.timeout_s = timeout_s
        self.busy = busy
        self.progress = progress
        self.on_stall = on_stall
        self.poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 10)
        self.last: Hashable = None
        self.since: float | None = None  # since when progress has not moved
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self, now: float) -> float | None:
        """One look at the engine at time ``now``: the seconds it has been stalled once
        that reaches the timeout, else None."""
        mark, requests = self.progress(), self.busy()
        if self.since is None or requests == 0 or mark != self.last:
            self.last, self.since = mark, now
            return None
        stalled = now - self.since
        return stalled if stalled >= self.timeout_s else None

    def _watch(self) -> None:
        self.check(time.monotonic())
        while not self._stop.wait(self.poll_s):
            stalled = self.check(time.monotonic())
            if stalled is not None:
                self.on_stall(stalled, self.busy())
                return


def watch_replica(replica) -> Watchdog | None:
    """Start the watchdog of an ``actor.EngineReplica`` whose engine is ready: requests in
    the engine from its clock, progress from its finished requests and the engine's own
    count; None when ``resources.stall_timeout_s`` is 0."""
    timeout = replica.spec.resources.stall_timeout_s
    if not timeout:
        return None
    clock = replica.clock
    steps = getattr(replica.engine, "progress", None) or (lambda: None)
    return Watchdog(
        timeout,
        busy=lambda: clock.n,
        progress=lambda: (clock.done, steps()),
        on_stall=lambda seconds, n: exit_stalled(replica.replica, seconds, n),
    ).start()


def exit_stalled(replica: str, seconds: float, requests: int) -> None:
    """What a replica does when its engine stalled: say so, kill the engine's processes
    (they may hold the devices the restarted replica needs) and exit, so that Ray restarts
    it and retries its batches."""
    message = (
        f"replica {replica}: its engine made no progress for {seconds:.0f}s with {requests} "
        "request(s) in it (resources.stall_timeout_s); treating it as dead: exiting so "
        "that Ray restarts it and runs its rows again"
    )
    log.error(message)
    kill_descendants()
    os._exit(1)


def kill_descendants() -> None:
    """SIGKILL this process's descendants (the engine core, its workers, the fork server),
    except Python's multiprocessing resource tracker, which frees their shared memory once
    this process is gone."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - vLLM brings psutil
        return
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(p.cmdline()):
                p.kill()
