"""The error hierarchy and errors.unwrap (finding our error inside Ray's wrappers)."""

from __future__ import annotations

import pytest

from batchjobs.errors import (
    BatchJobError,
    EngineError,
    InputError,
    OutputError,
    SpecError,
    unwrap,
)


class FakeRayTaskError(Exception):
    """Like ray.exceptions.RayTaskError: the original exception is in ``.cause``."""

    def __init__(self, cause):
        super().__init__(f"task failed: {cause!r}")
        self.cause = cause


@pytest.mark.parametrize(
    ("cls", "code"),
    [(BatchJobError, 1), (SpecError, 2), (InputError, 3), (EngineError, 4), (OutputError, 5)],
)
def test_exit_codes(cls, code):
    assert cls.exit_code == code
    assert issubclass(cls, BatchJobError)


def test_unwrap_follows_cause_attribute():
    ours = InputError("file:///x.jsonl: file vanished after planning")
    wrapped = FakeRayTaskError(FakeRayTaskError(ours))  # Ray Data may wrap twice
    assert unwrap(wrapped) is ours


def test_unwrap_follows_dunder_cause_chain():
    ours = OutputError("cannot write x")
    try:
        try:
            try:
                raise ours
            except OutputError as e:
                raise RuntimeError("inner wrapper") from e
        except RuntimeError as e:
            raise ValueError("outer wrapper") from e
    except ValueError as outer:
        assert unwrap(outer) is ours


def test_unwrap_follows_implicit_context():
    ours = SpecError("bad spec")
    try:
        try:
            raise ours
        except SpecError:
            raise KeyError("raised while handling")  # noqa: B904 - implicit __context__ on purpose
    except KeyError as outer:
        assert outer.__context__ is ours
        assert unwrap(outer) is ours


def test_unwrap_mixed_cause_attribute_and_chain():
    ours = EngineError("engine failed to start")
    try:
        raise RuntimeError("ray data wrapper") from FakeRayTaskError(ours)
    except RuntimeError as outer:
        assert unwrap(outer) is ours


def test_unwrap_returns_outermost_of_ours():
    inner = InputError("inner")
    outer = OutputError("outer")
    outer.__cause__ = inner
    assert unwrap(outer) is outer


def test_unwrap_without_our_error_returns_the_original():
    original = FakeRayTaskError(RuntimeError("boom"))
    assert unwrap(original) is original
    plain = ValueError("plain")
    assert unwrap(plain) is plain


def test_unwrap_ignores_non_exception_cause_attribute():
    exc = FakeRayTaskError(None)  # RayTaskError.cause may be missing or not an exception
    exc.cause = "not an exception"
    ours = SpecError("x")
    exc.__cause__ = ours
    assert unwrap(exc) is ours


def test_unwrap_survives_cycles():
    a = FakeRayTaskError(None)
    b = FakeRayTaskError(a)
    a.cause = b
    assert unwrap(a) is a


def test_unwrap_recovers_our_error_from_a_remote_traceback_text():
    # Ray Data wraps a worker's exception in UserCodeException; the cause is lost in
    # pickling but the remote traceback stays in the message.
    from batchjobs.errors import OutputError

    class UserCodeException(Exception):
        pass

    text = (
        "ray::MapBatches(write_staged)() (pid=1)\n"
        '  File "sink.py", line 60, in _write_part\n'
        "batchjobs.errors.OutputError: cannot write /o/_staging/s/x.parquet: OSError: [Errno 28] No space left on device\n"
        "\nThe above exception was the direct cause of the following exception:\n"
    )
    got = unwrap(UserCodeException(text))
    assert isinstance(got, OutputError) and got.exit_code == 5
    assert (
        str(got)
        == "cannot write /o/_staging/s/x.parquet: OSError: [Errno 28] No space left on device"
    )
