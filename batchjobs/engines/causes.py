"""Why an engine failed to start, in one line.

vLLM starts its engine core and workers in processes of their own. When one of them fails
(weights that do not load, a KV cache larger than the memory, an unknown architecture), the
exception the engine's caller gets says only "Engine core initialization failed. See root
cause above"; the cause is in what those processes printed. They print into the actor
process's own stdout and stderr (Ray points them at the worker's log files), so
``OutputTail`` notes where those files end before the engine starts, and ``start_cause``
reads what was written since and picks the first exception line that is not such a
wrapper: ``ValueError: Available memory on node 0 (18.45/23.54 GiB) on kv cache allocation
is less than requested memory for kv (200.0 GiB) ...``.
"""

from __future__ import annotations

import os
import re

MAX_READ = 512 << 10  # bytes read per file, from its end
MAX_CAUSE = 400  # characters of the cause kept

# "<pkg.module.>SomeError: message", at a line's start or after a log prefix that ends in
# "] " or ") " (vLLM: "(Worker pid=1) ERROR 12-06 14:11:35 [core.py:1510] ValueError: ...").
_EXC = re.compile(r"(?:^|[\])] )((?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception)): (\S.*)$")
# Messages that only point elsewhere for the cause.
_WRAPPER = re.compile(
    r"see (the )?(root cause|stack trace)|check the stack trace|initiali[sz]ation failed",
    re.IGNORECASE,
)


class OutputTail:
    """This process's stdout and stderr, where they are regular files: what is written to
    them from now on (by this process and the ones it starts) can be read back."""

    def __init__(self) -> None:
        self.files: list[tuple[str, int]] = []
        for fd in (1, 2):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
                if os.path.isfile(path) and all(path != p for p, _ in self.files):
                    self.files.append((path, os.path.getsize(path)))
            except OSError:  # no /proc, or not a file (a terminal, a pipe)
                continue

    def lines(self) -> list[str]:
        """The lines written since, stdout's first."""
        found: list[str] = []
        for path, start in self.files:
            try:
                with open(path, "rb") as f:
                    end = f.seek(0, os.SEEK_END)
                    f.seek(max(start, end - MAX_READ))
                    found += f.read().decode(errors="replace").splitlines()
            except OSError:
                continue
        return found


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line (pydantic's validation errors by
    their messages, not their count)."""
    errors = getattr(exc, "errors", None)
    text = ""
    if callable(errors):
        try:
            text = "; ".join(str(e.get("msg", "")) for e in errors())
        except Exception:  # noqa: BLE001 - not pydantic's errors() after all
            text = ""
    if not text:
        text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:1])
    return _cut(f"{type(exc).__name__}: {text}")


def start_cause(exc: BaseException, tail: OutputTail | None) -> str:
    """The cause of a failed engine start: the exception itself, or where it only points
    at output above (vLLM's engine core), the first real exception in that output."""
    own = one_line(exc)
    if tail is None or not _WRAPPER.search(str(exc)):
        return own
    for line in tail.lines():
        m = _EXC.search(line.rstrip())
        if m and not _WRAPPER.search(m.group(2)):
            return _cut(f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}")
    return own


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CAUSE else text[: MAX_CAUSE - 3] + "..."
