"""How far reading may run ahead of the writes, in rows.

Ray Data holds back a stage by the bytes its outputs take, so a job of short rows (prompts
of a few tokens) was read far ahead of its engines: every read block waited in a queue,
and blocks this small live in the memory of the driver that owns them, so the driver grew
with the job's rows. A gate bounds what is read but not yet written: each read task asks
the gate before it hands on its group's rows, and the driver tells it the rows each write
summary covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from batchjobs.feeding import inflight_batches, io_concurrency
from batchjobs.spec import JobSpec

log = logging.getLogger("batchjobs")

# Waiting longer than this without a single row written lets a read through anyway: a
# gate sized too small for some plan must cost memory, never hang the job. (No row is
# written while the engines start, or while long outputs fill every batch in flight: a
# read let through then costs only memory.)
PATIENCE_S = 300.0


def read_ahead_rows(spec: JobSpec, device: str) -> int:
    """Rows that may be read and not yet written: twice what the pipeline holds when every
    stage is full (each replica's batches, one write bundle per write task and the one
    being gathered, a block in between), so the engines never wait for the gate."""
    res = spec.resources
    held = res.replicas * inflight_batches(spec, device) * res.batch_size
    writes = res.rows_per_file * ((io_concurrency() or 8) + 1)
    return 2 * (held + writes + res.batch_size)


class ReadGate:
    """Counts rows read and rows written; ``admit`` waits while their difference is at the
    limit. Runs as a Ray actor (``start``)."""

    def __init__(self, limit: int, patience_s: float = PATIENCE_S):
        self.limit = limit
        self.patience_s = patience_s
        self.read = 0
        self.written = 0
        self.changed = asyncio.Condition()  # bound to the event loop that first waits on it
        self.forced = 0

    async def admit(self, rows: int) -> None:
        """Return once ``rows`` more may be read (at once when nothing is held)."""
        changed = self.changed
        async with changed:
            waited_since, written_then = time.monotonic(), self.written
            while self.read - self.written >= self.limit:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=1.0)
                if self.written != written_then:
                    waited_since, written_then = time.monotonic(), self.written
                elif time.monotonic() - waited_since > self.patience_s:
                    self.forced += 1
                    break
            self.read += rows

    async def wrote(self, rows: int) -> None:
        async with self.changed:
            self.written += rows
            self.changed.notify_all()

    async def state(self) -> dict[str, int]:
        return {
            "limit": self.limit,
            "read": self.read,
            "written": self.written,
            "forced": self.forced,
        }


def start(limit: int):
    """The gate as a Ray actor beside the driver (no CPU of its own)."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=1000)(ReadGate).remote(limit)


def stop(gate) -> None:
    """End the gate's actor; say so where it let reads through to avoid a stall."""
    import ray

    try:
        state = ray.get(gate.state.remote(), timeout=10)
        if state["forced"]:
            log.debug(
                "reading waited %.0f s with no row written %d time(s) and went on "
                "(read-ahead limit %d rows)",
                PATIENCE_S,
                state["forced"],
                state["limit"],
            )
        ray.kill(gate)
    except Exception as exc:  # noqa: BLE001 - the job's result does not depend on the gate
        log.debug("read gate: %s", exc)
