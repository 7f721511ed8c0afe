"""How work reaches the engine replicas: when feeding starts, how many batches one
replica may hold, how many read and write tasks run at once. Policies only; the Ray Data
plan that applies them is in ``pipeline``."""

from __future__ import annotations

import os

from batchjobs.readers import Shard, count_rows
from batchjobs.spec import JobSpec


def pool_min(spec: JobSpec) -> int:
    """Replicas the pool starts with (and never shrinks below)."""
    res = spec.resources
    return res.min_replicas if res.min_replicas is not None else res.replicas


# Requests an engine runs at once when the spec does not say: vLLM's max_num_seqs for its
# offline LLM class on an H100/H200, and on CPU. Only sizes the default batch window; the
# replica reads the engine's real limit once it has started.
ENGINE_SEQS_GUESS = {"cuda": 1024, "cpu": 256}
HOLD_FACTOR = 4  # rows a replica holds per request it keeps in the engine
MAX_AUTO_BATCHES = 512  # Ray Data runs one thread per batch held


def inflight_requests_guess(spec: JobSpec, device: str = "cuda") -> int:
    """The request cap the replica will most likely use: the spec's, else twice the
    engine's max_num_seqs (as set, or as vLLM picks it on an H100/H200 or a CPU)."""
    res = spec.resources
    seqs = spec.engine.max_num_seqs or ENGINE_SEQS_GUESS.get(device, ENGINE_SEQS_GUESS["cuda"])
    return res.max_inflight_requests or 2 * seqs


def inflight_batches(spec: JobSpec, device: str = "cuda") -> int:
    """Batches one replica may hold: the spec's ``max_inflight_batches``, or enough batches
    for ``HOLD_FACTOR`` rows per request the replica keeps in its engine.

    Why so many: Ray Data gets a batch back only when its slowest row is done. Meanwhile
    the batch's finished rows hold their slots, so a replica that held only as many rows as
    the engine runs would see its engine drain whenever outputs are long-tailed (simulated
    on 20,000 rows with lengths 64/256/512/1536 at 50/30/15/5 % and 1024 engine slots:
    2048 rows held gave 0.41 of raw ``LLM.generate``'s throughput, 4096 gave 0.77, 8192
    matched it; ``bench/inflight_sim.py``). The replica, not the batch count, caps what
    enters the engine (``max_inflight_requests``).
    """
    res = spec.resources
    if res.max_inflight_batches is not None:
        return res.max_inflight_batches
    rows = HOLD_FACTOR * inflight_requests_guess(spec, device)
    return max(1, min(MAX_AUTO_BATCHES, -(-rows // res.batch_size)))


def tasks_per_replica(spec: JobSpec, todo: list[Shard], device: str = "cuda") -> int:
    """Batches one replica may hold at once: ``inflight_batches``, or less in a job too
    small to give every replica that many: then each replica's fair share of the job,
    ceil(batches / replicas), so the first replica up cannot take the batches the others
    would get (without the cap, 2 of 4 replicas on a GPU host served a whole 32-batch job).

    The pool stays work-conserving: a replica that finishes its share early takes more
    while batches are left. Rows are counted only when the shards alone cannot make the
    job big enough (every shard gives at least one batch), from Parquet footers or JSON
    Lines lines.
    """
    res = spec.resources
    replicas = pool_min(spec)
    window = inflight_batches(spec, device)
    if replicas <= 1 or len(todo) >= replicas * window:
        return window
    rows, _ = count_rows(todo, spec.input.storage_options)
    batches = max(len(todo), -(-rows // res.batch_size))
    return max(1, min(window, -(-batches // replicas)))


def io_concurrency() -> int | None:
    """How many read (and write) tasks may run at once: no cap on a cluster we joined; on
    the local cluster we start, about half the machine's cores.

    Each concurrent task is a Ray worker process (~2.7 CPU-s to start, measured on 2 cores).
    The local cluster declares at least 8 logical CPUs (see ``connect_ray``), so without a
    cap a 2-core machine started 8 readers at once and they took the engine's cores.
    """
    if os.environ.get("RAY_ADDRESS"):
        return None
    return max(2, (os.cpu_count() or 2) // 2)


def start_gate_s(spec: JobSpec) -> float:
    """Ray Data's ``wait_for_min_actors_s`` for this job: -1 (no gate) or the timeout.

    The gate (``resources.start_timeout_s`` > 0) feeds no replica until the pool's minimum
    is up. It is off by default: ``tasks_per_replica`` already keeps the first replica up
    from taking the batches of a small job that the others would get, and Ray Data waits
    for the gate synchronously and holds back the read tasks too, so reads would start
    only when the engines are ready and each replica would then idle for its first rows.
    With one replica there is nothing to spread, so no gate.
    """
    res = spec.resources
    if pool_min(spec) <= 1 or not res.start_timeout_s:
        return -1
    return float(res.start_timeout_s)
