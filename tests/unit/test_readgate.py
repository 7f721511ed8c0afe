"""The read-ahead gate: reading waits while the rows read and not yet written reach the
limit, goes on as rows are written, and never hangs a job whose writes stopped."""

from __future__ import annotations

import asyncio

from batchjobs.readgate import ReadGate, read_ahead_rows


def test_reading_waits_at_the_limit_and_goes_on_as_rows_are_written():
    async def scenario():
        gate = ReadGate(limit=10, patience_s=3600)
        await gate.admit(6)
        await gate.admit(6)  # 6 held < 10: admitted, now 12 held
        waiting = asyncio.create_task(gate.admit(5))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # 12 held >= 10
        await gate.wrote(2)
        await asyncio.sleep(0.2)
        assert not waiting.done()  # 10 held: still at the limit
        await gate.wrote(4)
        await asyncio.wait_for(waiting, timeout=30)
        return await gate.state()

    assert asyncio.run(scenario()) == {"limit": 10, "read": 17, "written": 6, "forced": 0}


def test_a_gate_whose_writes_stopped_lets_reading_through_after_its_patience():
    async def scenario():
        gate = ReadGate(limit=1, patience_s=0.1)
        await gate.admit(5)
        await asyncio.wait_for(gate.admit(1), timeout=30)  # nothing written: forced
        return await gate.state()

    assert asyncio.run(scenario())["forced"] == 1


def test_the_limit_covers_every_stage_of_the_pipeline_twice(make_spec):
    spec = make_spec(resources={"replicas": 2, "batch_size": 32, "max_inflight_batches": 4})
    rows = read_ahead_rows(spec, "cpu")
    held, writes = 2 * 4 * 32, spec.resources.rows_per_file * 2  # at least one write task
    assert rows >= 2 * (held + writes)
