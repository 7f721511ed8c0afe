"""The exception hierarchy.

Two kinds of failure are kept apart on purpose:

* A *row error* (prompt too long, empty prompt, malformed JSON line) is recorded in the
  row's ``error`` column and the job goes on. Row errors are values, not exceptions.
* A *job error* (bad spec, missing input, unreadable shard, engine that cannot start,
  output filesystem failing) stops the run. Each is a ``BatchJobError`` subclass whose
  message says what is wrong and how to fix it; the CLI prints it without a traceback.
"""

from __future__ import annotations

import re


class BatchJobError(Exception):
    """Base of every error batchjobs raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class SpecError(BatchJobError):
    """The job spec is invalid: unknown key, wrong type, impossible value, missing file."""

    exit_code = 2


class InputError(BatchJobError):
    """An input shard cannot be read or does not have the columns the spec names."""

    exit_code = 3


class EngineError(BatchJobError):
    """An engine failed to start or died in a way that retrying cannot fix."""

    exit_code = 4


class OutputError(BatchJobError):
    """The output root cannot be written, or holds results of a different job."""

    exit_code = 5


class ShardsFailedError(InputError):
    """Some input shards could not be read; every other shard is committed. ``summary``:
    the run's ``RunSummary``."""

    def __init__(self, message: str, summary=None):
        super().__init__(message)
        self.summary = summary


class RowErrorRateError(BatchJobError):
    """Every row is written, but more of them are error rows than ``output.max_error_rate``
    allows. ``summary``: the run's ``RunSummary``."""

    exit_code = 7

    def __init__(self, message: str, summary=None):
        super().__init__(message)
        self.summary = summary


def unwrap(exc: BaseException) -> BaseException:
    """Return the ``BatchJobError`` hidden inside Ray's wrappers, or ``exc`` itself.

    Ray re-raises an exception from a task or actor as ``RayTaskError`` (whose ``cause``
    is the original) and Ray Data may wrap that again; a user should see our message,
    not three screens of Ray internals.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, BatchJobError):
            return cur
        nxt = getattr(cur, "cause", None)
        if not isinstance(nxt, BaseException):
            nxt = cur.__cause__ or cur.__context__
        cur = nxt
    # Exception chains do not survive pickling: an error raised in a Ray worker and wrapped
    # there (Ray Data's UserCodeException) arrives without its cause, but Ray keeps the
    # remote traceback in the message. The last of our errors named there is the reason.
    for name, message in reversed(_REMOTE.findall(str(exc))):
        cls = _BY_NAME.get(name)
        if cls is not None:
            return cls(message.strip())
    return exc


_REMOTE = re.compile(r"batchjobs\.errors\.(\w+): (.+)")
_BY_NAME = {c.__name__: c for c in (BatchJobError, SpecError, InputError, EngineError, OutputError)}


def dead_engine(exc: BaseException) -> EngineError | None:
    """An engine replica's actor that died for good (Ray Data's actor holding the engine,
    past ``resources.max_restarts``: its engine kept dying or hanging) as the engine
    failure it is, not Ray's empty ``SystemException`` under it."""
    from ray.exceptions import RayActorError  # only the driver calls this: Ray is loaded

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if isinstance(cur, RayActorError) and ("EngineStage" in text or "EarlyReplica" in text):
            first = (text.strip().splitlines() or [""])[0]
            return EngineError(
                "an engine replica died and Ray did not restart it (resources.max_restarts "
                f"used up: its engine kept dying or hanging; or its node is gone): {first}"
            )
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else cur.__cause__ or cur.__context__
    return None
