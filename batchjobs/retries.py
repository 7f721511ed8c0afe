"""Retrying what may pass when the output store fails, and failing at once on the rest.

Every read, write, listing and move of the output root (staged files in the write tasks,
commits, the manifest, the run records) goes through ``call``. The storage client retries
first (s3fs and botocore retry throttling, 5xx answers and dropped connections a few times
within a second or two); what still fails is retried here, ``RetryPolicy.retries`` times
with waits that double from ``wait_s`` up to ``max_wait_s`` (with jitter, so that many
writers do not come back at once), which rides out an outage of half a minute by default
(``output.retries``, ``output.retry_wait_s``). Then the job fails with one ``OutputError``
that says what failed, why, and after how many retries.

Retryable (``retryable``): a timeout, a refused, reset or dropped connection, an I/O error
(``EIO``, ``EREMOTEIO``: s3fs's "InternalError" and unknown error codes), ``EBUSY`` (s3fs's
"SlowDown", "ServiceUnavailable"), ``EAGAIN``, and the storage clients' own network errors
and throttling codes. Not retryable: a path or bucket that does not exist
(``FileNotFoundError``: a vanished bucket stays vanished), access denied or bad credentials
(``PermissionError``), missing credentials, a full disk or quota, a read-only filesystem,
an invalid name, and anything else: these fail at once, with a hint where one helps.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from batchjobs.errors import OutputError

log = logging.getLogger("batchjobs")
T = TypeVar("T")

RETRIES = 5  # after the storage client's own; 1+2+4+8+16 s of waits, ±jitter
RETRY_WAIT_S = 1.0
MAX_WAIT_S = 30.0

TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO",
        "EREMOTEIO",
        "EBUSY",
        "EAGAIN",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "EHOSTDOWN",
        "EHOSTUNREACH",
    )
    if hasattr(errno, name)
)
# Network errors of the storage clients, by class name (batchjobs imports none of them):
# botocore, aiohttp, urllib3/requests, fsspec, http.client.
TRANSIENT_CLASSES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "HTTPClientError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProxyConnectionError",
        "ClientPayloadError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "FSTimeoutError",
        "IncompleteRead",
        "ProtocolError",
        "ChunkedEncodingError",
        "RemoteDisconnected",
    }
)
# Error codes of a store's answer that mean "not now" (a botocore ClientError that reached
# us untranslated).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
NEVER = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = RETRIES
    wait_s: float = RETRY_WAIT_S
    max_wait_s: float = MAX_WAIT_S

    @classmethod
    def of(cls, output_spec: Any) -> RetryPolicy:
        """The policy of a spec's ``output:`` section."""
        return cls(output_spec.retries, output_spec.retry_wait_s)

    def wait(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (0-based): half to all of the doubled wait."""
        full = min(self.wait_s * 2**retry, self.max_wait_s)
        return full * random.uniform(0.5, 1.0)


def retryable(exc: BaseException) -> bool:
    """Whether an error of the output store may pass if the operation is tried again."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, NEVER):
            return False
        if isinstance(cur, (TimeoutError, ConnectionError)):
            return True
        if isinstance(cur, OSError) and cur.errno in TRANSIENT_ERRNOS:
            return True
        if {c.__name__ for c in type(cur).__mro__} & TRANSIENT_CLASSES:
            return True
        if _code(cur) in TRANSIENT_CODES:
            return True
        cur = cur.__cause__
    return False


def call(
    fn: Callable[..., T],
    *args: Any,
    policy: RetryPolicy | None = None,
    what: str = "",
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, tried again after each retryable error, at most
    ``policy.retries`` times. The last error is raised as it came, with the retries it took
    in ``exc.batchjobs_retries`` (for ``failure``)."""
    policy = policy or RetryPolicy()
    retry = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if retry >= policy.retries or not retryable(exc):
                exc.batchjobs_retries = retry  # type: ignore[attr-defined]
                raise
            wait = policy.wait(retry)
            retry += 1
            log.warning(
                "output store: %s failed (%s); retry %d of %d in %.1fs",
                what or getattr(fn, "__name__", "an operation"),
                _one_line(exc),
                retry,
                policy.retries,
                wait,
            )
            sleep(wait)


def failure(what: str, exc: BaseException) -> OutputError:
    """The job's error for an operation on the output store that failed for good: what,
    why (one line), after how many retries, and what to do where that is known."""
    retries = getattr(exc, "batchjobs_retries", 0)
    after = f" (still failing after {retries} retries)" if retries else ""
    return OutputError(f"cannot {what}: {_one_line(exc)}{after}{_hint(exc)}")


def _hint(exc: BaseException) -> str:
    text = _chain_text(exc)
    if isinstance(exc, FileNotFoundError) and ("NoSuchBucket" in text or "bucket does not" in text):
        return (
            "; the bucket does not exist (deleted, or never created): create it or set "
            "output.path to one that exists, then rerun"
        )
    if isinstance(exc, PermissionError):
        return (
            "; access denied: check the credentials (output.storage_options, or the "
            "environment such as AWS_ACCESS_KEY_ID) and what they may do in this bucket"
        )
    if type(exc).__name__ == "NoCredentialsError":
        return "; set output.storage_options (key, secret) or the AWS_* environment variables"
    return ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _chain_text(exc: BaseException) -> str:
    parts, cur, seen = [], exc, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__} {cur}")
        cur = cur.__cause__
    return " ".join(parts)


def _code(exc: BaseException) -> str | None:
    """The error code of a store's answer (botocore's ``ClientError.response``), if any."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error") or {}
    code = error.get("Code")
    if code:
        return str(code)
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(status) if status else None
