"""Keep what ``batchjobs run`` prints to batchjobs' own lines: everything else the driver
process writes to its stdout and stderr (Ray's logs, the engines' output that Ray forwards
from the replicas, C++ log lines, warnings, progress bars) goes to a log file, saved under
``<output>/_logs/`` (layout ``LOGS``).

How: while a job runs, file descriptors 1 and 2 point into a pipe that a thread reads;
batchjobs writes to the terminal through copies of the original descriptors (``term_out``,
``term_err``). Each line is cleaned before it is written to the file: colour and cursor
codes removed, a progress bar kept at its last state, secrets (the spec's storage options
and engine env values, credentials in the environment) masked. A line that reports a real
error (an ``ERROR`` or ``CRITICAL`` log line, a C++ ``E`` line, a worker killed) is also
shown, once, with the log file's name; ``verbose`` shows every line.

The file is ``_logs/run-<start time>.log``, rotated at ``ROTATE_BYTES`` into ``.1`` ... ``.4``
(oldest dropped); the logs of the last ``KEEP_RUNS`` runs are kept. It is written to a
local folder while the job runs and copied into the output root from time to time and at
the end (object stores cannot append), once the run has recorded itself there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from batchjobs.layout import LOGS, RUNS
from batchjobs.secrets import redact
from batchjobs.secrets import secrets_of as secrets_of  # its home before secrets.py

ROTATE_BYTES = 20 << 20
BACKUPS = 4
KEEP_RUNS = 20
SHOWN_ERRORS = 10  # foreign error lines shown on the terminal per run; the rest: the file
SYNC_EVERY_S = 60.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_RAY_PREFIX = re.compile(r"^\((?:[^()]|\([^()]*(?:\([^()]*\))?[^()]*\))*\)\s")  # "(Actor pid=1) "
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Error lines of Ray (Python and C++), vLLM, Python logging, and a killed process.
_ERROR = re.compile(
    r"(?:^|[\s\]|])(?:ERROR|CRITICAL|FATAL)\b"  # Ray / vLLM / logging levels
    r"|^\[[^\]]* [EF] \d+ \d+\]"  # C++ (glog-style) error and fatal lines
    r"|\bA worker died or was killed\b|\bout of memory\b|\bOutOfMemoryError\b|\bKilled\b"
)
# Lines at error level that report no failure (README: "Fixing common errors").
BENIGN = (
    # Ray, for every actor it may restart whose constructor arguments live in its object
    # store: the engine stage's are the spec, kept for the job's lifetime.
    "has constructor arguments in the object store and max_restarts > 0",
)


def clean(line: str) -> str:
    """A raw output line as the log file keeps it: a progress bar at its last state (text
    after the last carriage return, behind the line's Ray prefix), no colour or cursor
    codes, no other control bytes; empty where only a Ray prefix is left."""
    line = _ANSI.sub("", line).rstrip("\r")
    prefix = _RAY_PREFIX.match(line)
    head = prefix.group(0) if prefix else ""
    if "\r" in line:
        line = head + line.rsplit("\r", 1)[1].lstrip()
    line = _CONTROL.sub("", line).rstrip()
    return "" if prefix and len(line) <= len(head.rstrip()) else line


def is_error(line: str) -> bool:
    """Whether a cleaned line from Ray or an engine reports a real error."""
    return bool(_ERROR.search(line)) and not any(b in line for b in BENIGN)


class LogFile:
    """A local log file rotated at ``ROTATE_BYTES`` (``name.1`` is the newest backup)."""

    def __init__(self, path: Path, rotate_bytes: int = ROTATE_BYTES, backups: int = BACKUPS):
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.backups = backups
        self.lock = threading.Lock()
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.size = path.stat().st_size

    def write(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        data = f"{stamp} {line}\n"
        with self.lock:
            if self.fh.closed:
                return
            if self.size + len(data) > self.rotate_bytes and self.size:
                self._rotate()
            self.fh.write(data)
            self.fh.flush()
            self.size += len(data.encode())

    def _rotate(self) -> None:
        self.fh.close()
        for n in range(self.backups, 0, -1):  # .3 -> .4 (the oldest goes), ..., log -> .1
            src = self.path.with_name(f"{self.path.name}.{n - 1}" if n > 1 else self.path.name)
            if src.exists():
                src.replace(self.path.with_name(f"{self.path.name}.{n}"))
        self.fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        self.size = 0

    def files(self) -> list[Path]:
        """The file and its backups, as they are now."""
        return [p for p in self.path.parent.iterdir() if p.name.startswith(self.path.name)]

    def close(self) -> None:
        with self.lock:
            self.fh.close()


class OutputRouter:
    """Sends what others write to this process's stdout and stderr to a log file (see the
    module docstring); ``show`` gets the lines the user should see (errors, or every line
    when ``verbose``), ``term_out``/``term_err`` reach the terminal."""

    def __init__(
        self,
        secrets: list[str],
        verbose: bool = False,
        name: str | None = None,
        folder: Path | None = None,
    ):
        self.secrets = secrets
        self.verbose = verbose
        self.name = name or time.strftime("run-%Y%m%dT%H%M%S.log")
        self.folder = folder or Path(tempfile.mkdtemp(prefix="batchjobs-logs-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = LogFile(self.folder / self.name)
        self.where = str(self.log.path)  # where the user finds the log, as said on screen
        self.shown = 0
        self.seen_errors: set[str] = set()
        self.synced: dict[str, int] = {}
        self.synced_at = 0.0
        self._saved: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._pipe_w: int | None = None
        self._done = threading.Event()
        self._sentinel = f"\x00batchjobs-log-end-{os.getpid()}-{id(self)}\x00".encode()
        self.term_err: TextIO = _dup_stream(2, sys.stderr) or sys.stderr
        self.term_out: TextIO = _dup_stream(1, sys.stdout) or sys.stdout
        # Lines for the user: batchjobs' warnings, others' errors (a live display replaces it).
        self.show: Callable[[str], None] = lambda line: print(line, file=self.term_err, flush=True)
        self.routed = False

    # ---------------------------------------------------------------- routing

    def start(self) -> None:
        """Point descriptors 1 and 2 at the pipe; no-op where they are not real files (a
        test runner that captured them in Python)."""
        try:
            fds = (sys.stdout.fileno(), sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):
            return
        if fds != (1, 2):
            return
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(w, 1)
        os.dup2(w, 2)
        self._pipe_w = w
        self._thread = threading.Thread(target=self._read, args=(r,), daemon=True, name="logs")
        self._thread.start()
        self.routed = True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Give the descriptors back; what was written before is in the file."""
        if not self.routed:
            self.log.close()
            return
        self.routed = False
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        saved_out, saved_err = self._saved
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        # Processes that inherited the pipe may still hold it: end on a sentinel, not EOF.
        os.write(self._pipe_w, b"\n" + self._sentinel + b"\n")
        os.close(self._pipe_w)
        self._done.wait(timeout_s)
        self.log.close()

    def _read(self, r: int) -> None:
        buf = b""
        ended = False
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                break
            if not chunk:
                break
            if ended:
                continue  # a process that inherited the pipe: drained, not kept
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                if raw == self._sentinel:
                    ended = True
                    self._done.set()
                    break
                self._line(raw.decode("utf-8", errors="replace"))
        self._done.set()
        os.close(r)

    def _line(self, raw: str) -> None:
        line = redact(clean(raw), self.secrets)
        if not line.strip():
            return
        self.log.write(line)
        if self.verbose:
            self.show(line)
        elif is_error(line) and self.shown <= SHOWN_ERRORS:
            key = re.sub(r"pid=\d+|\d+", "N", line)
            if key in self.seen_errors:
                return
            self.seen_errors.add(key)
            self.shown += 1
            if self.shown > SHOWN_ERRORS:
                self.show(f"more errors from Ray or the engines: see {self.where}")
            else:
                self.show(f"from Ray or an engine (log: {self.where}): {line[:300]}")

    # ---------------------------------------------------------------- batchjobs' own lines

    def note(self, line: str) -> None:
        """A line of batchjobs' own (shown on the terminal by the caller) for the file too."""
        self.log.write(redact(clean(line), self.secrets))

    # ---------------------------------------------------------------- the output root

    def sync(self, out, force: bool = False) -> bool:
        """Copy the log files into ``<output>/_logs/`` (``out``: a ``sink.OutputRoot``) if
        they changed, at most every ``SYNC_EVERY_S`` unless ``force``; drop the logs of runs
        beyond the last ``KEEP_RUNS``. Only into a root this job has written its run record
        to (before that, the root may still be refused or wiped). True if copied."""
        now = time.time()
        if not force and now - self.synced_at < SYNC_EVERY_S:
            return False
        self.synced_at = now
        try:
            if out.read(RUNS) is None and not out.fs.exists(out.path("_manifest.jsonl")):
                return False
            target = out.path(LOGS)
            out.fs.makedirs(target, exist_ok=True)
            with self.log.lock:
                files = [(p, p.stat().st_size) for p in self.log.files()]
                for path, size in files:
                    if self.synced.get(path.name) != size:
                        out.fs.put_file(str(path), posixpath.join(target, path.name))
                        self.synced[path.name] = size
            self.where = f"{out.url.rstrip('/')}/{LOGS}/{self.name}"
            _prune(out, target)
            return True
        except Exception as exc:  # noqa: BLE001 - logs never fail a job
            logging.getLogger("batchjobs").debug("cannot copy logs to %s: %s", out.url, exc)
            return False

    def discard_local(self) -> None:
        """Remove the local copy (after it reached the output root)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def is_empty(self) -> bool:
        return all(p.stat().st_size == 0 for p in self.log.files())


def _prune(out, target: str) -> None:
    runs = sorted(
        {
            posixpath.basename(p).split(".log")[0]
            for p in out.fs.ls(target, detail=False)
            if posixpath.basename(p).startswith("run-")
        }
    )
    for old in runs[:-KEEP_RUNS]:
        for p in out.fs.ls(target, detail=False):
            if posixpath.basename(p).startswith(old + ".log"):
                out.fs.rm(p)


def _dup_stream(fd: int, stream: TextIO) -> TextIO | None:
    """A text stream on a copy of ``fd`` (the terminal, kept while ``fd`` is routed)."""
    try:
        if stream.fileno() != fd:
            return None
        copy = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        return None
    return open(copy, "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115


class TerminalHandler(logging.Handler):
    """batchjobs' own log records, shown to the user (``router.show``) and noted in the file."""

    def __init__(self, router: OutputRouter):
        super().__init__()
        self.router = router

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = redact(f"{record.levelname.lower()}: {record.getMessage()}", self.router.secrets)
            self.router.note(text)
            self.router.show(text)
        except Exception:  # noqa: BLE001
            self.handleError(record)


@contextlib.contextmanager
def routed(
    secrets: list[str],
    verbose: bool = False,
    level: int = logging.WARNING,
    folder: Path | None = None,
) -> Iterator[OutputRouter]:
    """Route this process's output (see ``OutputRouter``) for the ``with`` block; batchjobs'
    logger goes to the terminal at ``level`` (INFO with ``verbose``)."""
    router = OutputRouter(secrets, verbose, folder=folder)
    logger = logging.getLogger("batchjobs")
    handler = TerminalHandler(router)
    old = (logger.propagate, logger.level)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if verbose else level)
    ray_was_up = _ray_up()
    router.start()
    try:
        yield router
    finally:
        try:
            if not ray_was_up:  # the job's Ray: its last forwarded lines go to the file too
                _shutdown_ray()
        finally:
            router.stop()
            logger.removeHandler(handler)
            logger.propagate, logger.level = old


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray() -> None:
    if _ray_up():
        import ray

        time.sleep(0.5)  # lines forwarded from the replicas a moment ago
        ray.shutdown()
