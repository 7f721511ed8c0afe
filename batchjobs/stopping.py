"""Stopping a run on SIGTERM or SIGINT, as Kubernetes, Airflow, ``ray job stop`` and Ctrl-C
ask a job to end.

``handling`` catches both signals in the main thread for the length of a ``batchjobs run``.
The first one stops the run at once: no further rows go to the engines, and the exception
``Stopped`` unwinds the driver like any failure, so the pipeline records the run
(``_runs.jsonl``: status ``stopped``, exit code 128 + the signal's number) and folds the
manifest's commits into ``_manifest.jsonl`` before it stops the engines. Shards already
committed stay; shards in flight stay uncommitted, and a rerun redoes them from their first
row (``sink.OutputRoot.clear_shard``), so every row still comes out exactly once.

A stop never cuts a shard's commit in two: inside ``critical()`` it waits for the
section's end. The whole stop is bounded: ``grace_s`` after the first signal the process
exits with the same code whatever it was doing, and a second signal exits at once.

Ray's ``ray.init`` installs a SIGTERM handler of its own (``sys.exit``); ``rearm`` puts
ours back once the driver has joined the cluster, and ``classify`` reads the ``SystemExit``
of a SIGTERM that came while Ray's handler was in place as the stop it is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

DEFAULT_GRACE_S = 30.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is 128 + its number (143 for
    SIGTERM, 130 for SIGINT), as a shell reports a process ended by it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name}: committed shards are kept; rerun "
            "to finish the rest"
        )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class _State:
    armed: bool = False
    grace_s: float = DEFAULT_GRACE_S
    say: Callable[[str], None] = _say
    signum: int | None = None  # the first signal received
    at: float | None = None  # when (time.monotonic)
    critical: int = 0  # depth of the sections a stop waits for
    pending: bool = False  # a stop came inside one


_state = _State()


@contextmanager
def handling(
    grace_s: float = DEFAULT_GRACE_S, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Stop the run on SIGTERM or SIGINT while inside (main thread only; elsewhere a
    no-op). ``say`` prints the stop's lines (default: stderr)."""
    global _state
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _state = _State(armed=True, grace_s=grace_s, say=say or _say)
    _install()
    try:
        yield
    finally:
        _state = _State()
        for s, h in old.items():
            signal.signal(s, h)


def rearm() -> None:
    """Put the handlers back after something replaced them (``ray.init`` does)."""
    if _state.armed and threading.current_thread() is threading.main_thread():
        _install()


def _install() -> None:
    for s in SIGNALS:
        signal.signal(s, _handler)


def _handler(signum: int, frame) -> None:
    st = _state
    if st.signum is not None:
        st.say(f"{signal.Signals(signum).name} again: exiting now")
        os._exit(128 + st.signum)
    st.signum, st.at = signum, time.monotonic()
    st.say(
        f"stopping on {signal.Signals(signum).name}: no further rows go to the engines; "
        "committed shards are kept, shards in flight are left for a rerun; exiting within "
        f"{st.grace_s:.0f}s (send it again to exit now)"
    )
    threading.Thread(target=_deadline, args=(st,), name="stop-deadline", daemon=True).start()
    if st.critical:
        st.pending = True
        return
    raise Stopped(signum)


def _deadline(st: _State) -> None:
    time.sleep(st.grace_s)
    if st is _state:  # still this run's stop
        st.say(f"error: the stop took longer than {st.grace_s:.0f}s; exiting now")
        os._exit(128 + (st.signum or signal.SIGTERM))


@contextmanager
def critical() -> Iterator[None]:
    """A section a stop must not cut (a shard's commit and its manifest record): a stop
    that comes inside takes effect at its end."""
    st = _state
    st.critical += 1
    try:
        yield
    except BaseException:
        st.critical -= 1
        raise
    st.critical -= 1
    if not st.critical and st.pending:
        st.pending = False
        raise Stopped(st.signum or signal.SIGTERM)


def requested() -> bool:
    """Whether a stop signal came."""
    return _state.signum is not None


def remaining(at_most: float) -> float:
    """Seconds left of the stop's grace (``at_most`` at most; ``at_most`` when no stop
    came), for the engines' shutdown after the run is recorded."""
    if _state.at is None:
        return at_most
    left = _state.grace_s - (time.monotonic() - _state.at) - 2.0  # 2 s to exit cleanly
    return max(0.0, min(at_most, left))


def classify(exc: BaseException) -> BaseException:
    """``exc`` as the stop it is: a ``KeyboardInterrupt`` raised after a stop signal (Ray
    re-raises one of its own from a blocking call), or the ``SystemExit`` of Ray's
    SIGTERM handler, becomes ``Stopped``; anything else is returned as it is."""
    if isinstance(exc, Stopped):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Stopped(_state.signum or signal.SIGINT)
    if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
        return Stopped(signal.SIGTERM)
    return exc
