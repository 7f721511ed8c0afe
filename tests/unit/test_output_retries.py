"""A failing output store: which errors are retried (retries.py), how often and how long,
and what the staged writes, the commit and the manifest do when the store fails, on a
fault-injecting fsspec filesystem (``faulty://``, fsspec's memory filesystem underneath)."""

from __future__ import annotations

import errno
import re

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from batchjobs import retries
from batchjobs.errors import OutputError
from batchjobs.layout import STAGING, SUCCESS
from batchjobs.manifest import Manifest, ShardRecord
from batchjobs.retries import RetryPolicy, call, failure, retryable
from batchjobs.sink import OutputRoot, write_staged


class ClientError(Exception):
    """Shaped like botocore's: the store's answer in ``response``."""

    def __init__(self, code: str, status: int = 500):
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    """Named like botocore's: a network error by its class name."""


class NoCredentialsError(Exception):
    pass


def _cause(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.EIO, "InternalError"), True),
        (OSError(errno.EREMOTEIO, "We encountered an internal error"), True),
        (OSError(errno.EBUSY, "SlowDown"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("reset by peer"), True),
        (EndpointConnectionError("Could not connect to the endpoint URL"), True),
        (ClientError("SlowDown", 503), True),
        (ClientError("ServiceUnavailable", 503), True),
        (_cause(RuntimeError("wrapped"), OSError(errno.ETIMEDOUT, "timed out")), True),
        (FileNotFoundError("The specified bucket does not exist"), False),
        (_cause(FileNotFoundError("NoSuchBucket"), TimeoutError()), False),
        (PermissionError("Access Denied"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (OSError(errno.EINVAL, "InvalidBucketName"), False),
        (ClientError("AccessDenied", 403), False),
        (NoCredentialsError("Unable to locate credentials"), False),
        (ValueError("bad"), False),
    ],
)
def test_what_is_retried(exc, expected):
    assert retryable(exc) is expected


def test_waits_double_from_the_first_up_to_the_cap():
    policy = RetryPolicy(retries=8, wait_s=1.0, max_wait_s=10.0)
    for retry, full in enumerate([1, 2, 4, 8, 10, 10]):
        for _ in range(20):
            assert full / 2 <= policy.wait(retry) <= full


def _flaky(errors: list[BaseException]):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "done"

    return fn, calls


def test_call_retries_what_may_pass_and_no_more_than_the_policy_says():
    sleeps: list[float] = []
    policy = RetryPolicy(retries=3, wait_s=0.5)
    fn, calls = _flaky([OSError(errno.EBUSY, "SlowDown"), TimeoutError()])
    assert call(fn, policy=policy, what="write x", sleep=sleeps.append) == "done"
    assert len(calls) == 3 and len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 <= sleeps[1] <= 1.0

    fn, calls = _flaky([OSError(errno.EIO, "InternalError")] * 10)
    with pytest.raises(OSError) as err:
        call(fn, policy=policy, what="write x", sleep=sleeps.append)
    assert len(calls) == 4 and err.value.batchjobs_retries == 3
    msg = str(failure("write s3://b/x", err.value))
    assert (
        msg
        == "cannot write s3://b/x: OSError: [Errno 5] InternalError (still failing after 3 retries)"
    )

    sleeps.clear()
    fn, calls = _flaky([PermissionError("Access Denied")])
    with pytest.raises(PermissionError):
        call(fn, policy=policy, sleep=sleeps.append)
    assert len(calls) == 1 and not sleeps  # not retried


def test_failures_say_what_to_do_in_one_line():
    gone = _cause(
        FileNotFoundError("The specified bucket does not exist"), ClientError("NoSuchBucket", 404)
    )
    msg = str(failure("write s3://b/out/_manifest.d/1.jsonl", gone))
    assert "\n" not in msg and "the bucket does not exist" in msg and "retries" not in msg
    denied = str(failure("write s3://b/x", PermissionError("Access\nDenied")))
    assert "\n" not in denied and "check the credentials" in denied


# --------------------------------------------------------------------------- faulty://


class FaultyFS(MemoryFileSystem):
    """fsspec's memory filesystem whose operations fail as planned: ``plan`` holds
    [operation, path pattern, error factory, times left, after] entries; an operation whose
    path matches raises the next error (``after``: once the operation has run)."""

    protocol = "faulty"
    store: dict = {}  # noqa: RUF012 - its own, apart from memory://
    pseudo_dirs = [""]  # noqa: RUF012
    plan: list = []  # noqa: RUF012
    calls: dict = {}  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("faulty://"):
            path = "memory://" + path[len("faulty://") :]
        return super()._strip_protocol(path)

    def _fault(self, op: str, path: str, after: bool) -> None:
        if not after:  # one call counted once
            type(self).calls[op] = type(self).calls.get(op, 0) + 1
        for entry in type(self).plan:
            name, pattern, make, left, when = entry
            if name == op and left > 0 and when == after and re.search(pattern, str(path)):
                entry[3] -= 1
                raise make()

    def pipe_file(self, path, value, **kwargs):
        self._fault("pipe", path, False)
        super().pipe_file(path, value, **kwargs)
        self._fault("pipe", path, True)

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self._fault("write", path, False)
        return super()._open(path, mode, **kwargs)

    def mv(self, path1, path2, **kwargs):
        self._fault("mv", path1, False)
        super().mv(path1, path2, **kwargs)
        self._fault("mv", path1, True)

    def cat_file(self, path, *args, **kwargs):
        self._fault("cat", path, False)
        return super().cat_file(path, *args, **kwargs)


@pytest.fixture
def faulty(monkeypatch):
    fsspec.register_implementation("faulty", FaultyFS, clobber=True)
    FaultyFS.store.clear()
    FaultyFS.pseudo_dirs[:] = [""]
    FaultyFS.plan.clear()
    FaultyFS.calls.clear()
    monkeypatch.setattr(RetryPolicy, "wait", lambda self, retry: 0.0)  # no real waiting
    yield FaultyFS
    FaultyFS.plan.clear()


def _batch(engine_output, shard: str = "s", rows: int = 2):
    return engine_output(
        [{"shard_id": shard, "row_index": i, "shard_rows": rows} for i in range(rows)]
    )


def test_staged_write_rides_out_transient_errors(faulty, engine_output):
    faulty.plan.append(["write", STAGING, lambda: OSError(errno.EIO, "InternalError"), 2, False])
    (row,) = write_staged(_batch(engine_output), "faulty://out", {}, None).to_pylist()
    assert faulty.calls["write"] == 3
    assert faulty().ls(f"/out/{STAGING}/s", detail=False) == [f"/out/{STAGING}/s/{row['file']}"]


def test_staged_write_failing_for_good_is_one_clear_error(faulty, engine_output):
    faulty.plan.append(["write", STAGING, lambda: OSError(errno.EBUSY, "SlowDown"), 99, False])
    with pytest.raises(OutputError) as err:
        write_staged(_batch(engine_output), "faulty://out", {}, None)
    msg = str(err.value)
    assert re.fullmatch(
        r"cannot write faulty:///out/_staging/s/\w+\.parquet: OSError: \[Errno 16\] SlowDown "
        rf"\(still failing after {retries.RETRIES} retries\)",
        msg,
    ), msg
    assert faulty.calls["write"] == retries.RETRIES + 1


def test_commit_moves_each_file_once_when_a_move_is_retried(faulty, engine_output):
    """A move that happened but whose answer was lost (the connection dropped): the retry
    finds the file moved and goes on; every file is committed once, _SUCCESS last."""
    out = OutputRoot("faulty://out")
    names = [
        write_staged(_batch(engine_output, rows=4), "faulty://out", {}, None)
        .column("file")[0]
        .as_py()
        for _ in range(2)
    ]
    faulty.plan.append(["mv", STAGING, lambda: ConnectionResetError("connection lost"), 1, True])
    faulty.plan.append(["pipe", SUCCESS, lambda: TimeoutError("slow"), 1, False])
    final = out.commit("s", names)
    assert final == sorted(f"/out/s/{n}" for n in names)
    fs = faulty()
    assert sorted(fs.ls("/out/s", detail=False)) == sorted([*final, f"/out/s/{SUCCESS}"])
    assert not fs.ls(f"/out/{STAGING}/s", detail=False)
    assert faulty.calls["mv"] == 3 and faulty.calls["pipe"] == 2


def test_manifest_commit_is_retried_and_a_vanished_store_fails_at_once(faulty):
    out = OutputRoot("faulty://out", retry=RetryPolicy(retries=2))
    manifest = Manifest(out)
    faulty.plan.append(["pipe", "_manifest.d", lambda: OSError(errno.EBUSY, "SlowDown"), 2, False])
    manifest.commit(ShardRecord(shard_id="a", source="s3://in/a", status="committed", rows=3))
    assert set(Manifest(out).committed()) == {"a"} and faulty.calls["pipe"] == 3

    faulty.plan.append(
        [
            "pipe",
            "_manifest.d",
            lambda: FileNotFoundError("The specified bucket does not exist"),
            9,
            False,
        ]
    )
    with pytest.raises(OutputError) as err:
        manifest.commit(ShardRecord(shard_id="b", source="s3://in/b", status="committed"))
    assert faulty.calls["pipe"] == 4  # no retries: it will not come back
    assert "the bucket does not exist" in str(err.value) and "retries" not in str(err.value)

    faulty.plan.append(["pipe", "_runs", lambda: OSError(errno.ENOSPC, "No space left"), 9, False])
    with pytest.raises(OutputError, match="No space left") as err:
        out.write_atomic("_runs.jsonl", b"{}\n")
    assert faulty.calls["pipe"] == 5


def test_reads_are_retried_too(faulty):
    out = OutputRoot("faulty://out", retry=RetryPolicy(retries=1))
    out.write_atomic("_runs.jsonl", b"x\n")
    faulty.plan.append(["cat", "_runs", lambda: ConnectionResetError("reset"), 1, False])
    assert out.read("_runs.jsonl") == b"x\n"
    faulty.plan.append(["cat", "_runs", lambda: ConnectionResetError("reset"), 2, False])
    with pytest.raises(
        OutputError, match=r"cannot read faulty:///out/_runs.jsonl: .*after 1 retries"
    ):
        out.read("_runs.jsonl")
