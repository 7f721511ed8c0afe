"""Work spreads over every replica even when replicas come up at different times.

On 4 H200s, 4 replicas of a 7B model served a 2000-row job with only 2 of them: the first
replicas up took `max_inflight_batches` batches each, i.e. every batch, before the others
had started. In a job smaller than replicas × max_inflight_batches no replica now holds
more than its fair share of batches at once, and `resources.start_timeout_s` > 0 (off by
default: it holds the reads back too) feeds no replica until the pool's minimum is up. A stand-in engine that starts late in order of creation and
holds each request for a while (a long decode) reproduces the GPU run on CPU."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
import ray
from conftest import prompt_shards, tmp_spec

from batchjobs.engines.base import Engine, Result

pytestmark = pytest.mark.integration


class LateStarter(Engine):
    """The k-th replica created starts 2k s late (plus engine.args.first_start_s); each
    request takes 50 × 20 ms."""

    kind = "late"

    def __init__(self, spec):
        k = 0
        while True:  # an ordinal per replica, from files no two replicas can both create
            try:
                os.close(os.open(f"{spec.output.path}.ord-{k}", os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                k += 1
        time.sleep(spec.engine.args.get("first_start_s", 0.0) + 2.0 * k)
        self.tag = str(os.getpid())
        self.in_flight = self.peak = 0

    async def generate(self, request):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        for _ in range(50):
            await asyncio.sleep(0.02)
        self.in_flight -= 1
        # "<replica>:<most requests it held at once so far>"
        return Result(
            text=f"{self.tag}:{self.peak}",
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
        )

    def close(self):
        pass


def late_factory(spec):
    return LateStarter(spec)


def _run_job(tmp_path, tiny_model, first_start_s=0.0, **resources) -> dict[str, int]:
    """2000 rows in 8 shards (32 batches of 64) over 4 late-starting replicas; each
    replica's peak of requests held at once, by replica."""
    from batchjobs.pipeline import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    prompt_shards(tmp_path / "in", shards=8, rows=250)
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        engine={"args": {"first_start_s": first_start_s}},
        resources={
            "replicas": 4,
            "batch_size": 64,
            "max_inflight_batches": 16,
            "num_cpus_per_replica": 0.25,
            **resources,
        },
    )
    summary = run(spec, engine_factory=late_factory)
    assert summary.rows == 2000
    peaks: dict[str, int] = {}
    for text in pq.read_table(tmp_path / "out").column("text").to_pylist():
        replica, peak = text.split(":")
        peaks[replica] = max(peaks.get(replica, 0), int(peak))
    return peaks


def test_the_start_gate_spreads_work_over_late_replicas(tmp_path, tiny_model, ray_session):
    _run_job(tmp_path, tiny_model, start_timeout_s=1800)
    served = Counter(
        t.split(":")[0] for t in pq.read_table(tmp_path / "out").column("text").to_pylist()
    )
    # Without the gate this failed here (3 replicas served rows, one of them 1064 of 2000):
    # with replicas 2 s apart and 1 s requests, the first ones up do most of the job.
    assert len(served) == 4, served
    assert max(served.values()) <= 1.5 * 2000 / 4, served


def test_no_replica_takes_more_than_its_share_of_a_small_job(tmp_path, tiny_model, ray_session):
    """Without the start gate, the first replica up is fed at once, but a job of 32 batches
    over 4 replicas lets it hold only ceil(32 / 4) = 8 batches (512 rows) at a time, not
    `max_inflight_batches` = 16 (1024 rows, half the job); it takes more only as it
    finishes what it holds."""
    # The first replica starts after 8 s, when every batch has been read and is waiting.
    peaks = _run_job(tmp_path, tiny_model, first_start_s=8.0)  # the default: no gate
    assert peaks and max(peaks.values()) <= 8 * 64, peaks


def test_each_forwarding_actor_claims_its_own_replica_and_keeps_it(ray_session):
    """Ray Data's actors forward to the replicas the driver started: each claims a
    different one, asking again gets the same one (as after Ray restarted the actor), and
    one actor more than there are replicas shares one instead of failing; a released run
    leaves no claim behind."""
    from batchjobs.replicas import claim_replica, release_claims

    @ray.remote(num_cpus=0)
    class Claimer:
        def claim(self, replicas, token):
            return claim_replica(replicas, token)

    token = "test-claims"
    replicas = ["replica-a", "replica-b"]
    first, second, third = (Claimer.remote() for _ in range(3))
    try:
        got = [ray.get(c.claim.remote(replicas, token)) for c in (first, second)]
        assert sorted(got) == replicas
        assert ray.get(first.claim.remote(replicas, token)) == got[0]  # kept
        assert ray.get(third.claim.remote(replicas, token)) in replicas  # shared
        release_claims(token)
        # After the release the claims are gone: the second actor may now take the first.
        assert ray.get(second.claim.remote(replicas, token)) == "replica-a"
    finally:
        for c in (first, second, third):
            ray.kill(c)
