"""In-flight work is capped per request, not per batch: the replica's gate, its defaults,
and the batch window that keeps the gate supplied."""

from __future__ import annotations

import asyncio

import pytest

from batchjobs.actor import BusyClock, Gate, inflight_limit
from batchjobs.engines.base import Engine, Result
from batchjobs.feeding import inflight_batches
from batchjobs.spec import parse_spec


def test_gate_admits_at_most_limit_in_arrival_order():
    async def main():
        gate = Gate(3)
        order, inside, peak = [], 0, 0
        release = {i: asyncio.Event() for i in range(8)}

        async def request(i):
            nonlocal inside, peak
            async with gate:
                order.append(i)
                inside += 1
                peak = max(peak, inside)
                await release[i].wait()
                inside -= 1

        tasks = [asyncio.create_task(request(i)) for i in range(8)]
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2]  # the limit holds; the rest wait
        # Finishing out of order (a long request stays) admits the next in line at once.
        release[1].set()
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2, 3]
        for i in (0, 2, 3, 4, 5, 6, 7):
            release[i].set()
        await asyncio.gather(*tasks)
        assert order == list(range(8)) and peak == 3
        assert gate.inside == 0 and not gate.waiting

    asyncio.run(main())


def test_gate_passes_a_cancelled_waiters_place_on():
    async def main():
        gate = Gate(1)
        hold = asyncio.Event()
        admitted = []

        async def request(i, wait):
            async with gate:
                admitted.append(i)
                if wait:
                    await hold.wait()

        first = asyncio.create_task(request(0, True))
        second = asyncio.create_task(request(1, False))
        third = asyncio.create_task(request(2, False))
        await asyncio.sleep(0.01)
        second.cancel()  # gives up while waiting
        await asyncio.sleep(0.01)
        hold.set()
        await asyncio.gather(first, third)
        assert admitted == [0, 2]
        assert gate.inside == 0 and not gate.waiting

    asyncio.run(main())


def test_gate_survives_a_waiter_cancelled_while_a_holder_leaves():
    async def main():
        gate = Gate(1)
        await gate.__aenter__()  # the one place is taken
        waiter = asyncio.create_task(gate.__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()  # its turn is cancelled, and before it runs again ...
        await gate.__aexit__()  # ... the holder leaves and skips the cancelled turn
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.inside == 0 and not gate.waiting
        await gate.__aenter__()  # the place is free again
        assert gate.inside == 1

    asyncio.run(main())


def test_gate_without_limit_never_waits():
    async def main():
        gate = Gate(None)
        for _ in range(10_000):
            await gate.__aenter__()
        assert gate.inside == 10_000 and not gate.waiting

    asyncio.run(main())


def test_busy_clock_reports_mean_requests_in_engine():
    c = BusyClock(0.0)
    c.start(1.0)  # idle 0..1
    c.start(2.0)  # 1 request 1..2
    c.stop(4.0)  # 2 requests 2..4
    c.stop(5.0)  # 1 request 4..5
    assert c.busy == pytest.approx(4.0) and c.idle == pytest.approx(1.0)
    assert c.inflight_s == pytest.approx(1 + 4 + 1)  # request-seconds
    assert c.inflight_s / c.busy == pytest.approx(1.5)


class _Engine(Engine):
    def __init__(self, runs):
        self.runs = runs

    async def generate(self, request):
        return Result(text="")

    def close(self):
        pass

    def max_concurrency(self):
        return self.runs


@pytest.mark.parametrize(
    "resources, runs, limit",
    [
        ({}, 256, 512),  # twice what the engine runs at once (vLLM CPU: max_num_seqs 256)
        ({}, 1024, 2048),  # an H100/H200
        ({"max_inflight_requests": 100}, 256, 100),  # the spec decides
        ({}, None, None),  # an engine without a stated limit: no cap
    ],
)
def test_replica_request_limit(spec_dict, resources, runs, limit):
    spec_dict["resources"] = resources
    assert inflight_limit(parse_spec(spec_dict), _Engine(runs)) == limit


@pytest.mark.parametrize(
    "resources, engine, batches",
    [
        # 4 x 2048 rows (2 x 1024 requests) in batches of 32, the defaults
        ({}, {}, 256),
        ({"batch_size": 64}, {}, 128),
        ({"batch_size": 64}, {"max_num_seqs": 256}, 32),  # 4 x 2 x 256 rows
        ({"batch_size": 64, "max_inflight_requests": 1000}, {}, 63),  # 4000 rows
        ({"batch_size": 1}, {}, 512),  # at most 512 batches: one thread each
        ({"max_inflight_batches": 7}, {}, 7),  # the spec decides
    ],
)
def test_batch_window_holds_several_times_the_request_limit(spec_dict, resources, engine, batches):
    spec_dict["resources"] = resources
    spec_dict["engine"].update(engine)
    assert inflight_batches(parse_spec(spec_dict)) == batches


def test_batch_window_on_cpu_follows_the_cpu_engines_limit(spec_dict):
    # vLLM's CPU engine runs 256 sequences: 4 x 2 x 256 rows in batches of 32, not the
    # GPU's 256 batches (each batch in flight costs Ray Data's scheduler and the actor CPU)
    assert inflight_batches(parse_spec(spec_dict), "cpu") == 64
    spec_dict["engine"]["max_num_seqs"] = 1024  # the spec's limit wins on any device
    assert inflight_batches(parse_spec(spec_dict), "cpu") == 256


def test_the_replica_actor_runs_its_batches_on_threads_not_one_at_a_time():
    """Ray makes an actor whose class has a coroutine method an asyncio actor, and runs its
    blocking methods one at a time on the event loop: the replica's engine would see one
    batch at a time (seen: 8 requests in flight instead of 40)."""
    import inspect

    from batchjobs.actor import EarlyReplica

    coroutines = [
        name
        for name, member in inspect.getmembers(EarlyReplica)
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
    ]
    assert coroutines == []


@pytest.mark.parametrize(
    "device, asked, resources, placement",
    [
        ("cuda", None, {"replicas": 2}, "replicas"),  # the default on GPUs
        ("cpu", None, {"replicas": 2}, "pool"),  # not on CPU
        ("cuda", None, {"replicas": 4, "min_replicas": 2}, "pool"),  # autoscaling: Ray Data's
        ("cpu", "replicas", {"replicas": 1}, "replicas"),  # tests cover both on CPU
        ("cuda", "pool", {"replicas": 1}, "pool"),
        ("cpu", "pool", {"replicas": 4, "min_replicas": 2}, "pool"),
    ],
)
def test_where_the_engines_run(spec_dict, device, asked, resources, placement):
    from batchjobs.replicas import engine_placement

    spec_dict["resources"] = resources
    assert engine_placement(parse_spec(spec_dict), device, asked) == placement


def test_engine_placement_refuses_what_cannot_be(spec_dict):
    from batchjobs.replicas import engine_placement

    spec_dict["resources"] = {"replicas": 4, "min_replicas": 2}
    with pytest.raises(ValueError, match="needs a fixed pool"):
        engine_placement(parse_spec(spec_dict), "cuda", "replicas")
    spec_dict["resources"] = {"replicas": 1}
    with pytest.raises(ValueError, match="placement must be one of"):
        engine_placement(parse_spec(spec_dict), "cuda", "early")
