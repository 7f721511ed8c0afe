"""The live panel and the plain lines, drawn from a real Tracker fed staged files as the
write stage reports them (no Ray: the replicas' board is filled in by hand)."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from batchjobs.display import Display, duration, manifest_tables, panel, usd
from batchjobs.planning import plan_job
from batchjobs.sink import write_staged
from batchjobs.tracker import Progress, Tracker

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x1b]")


@pytest.fixture
def tracker(make_spec, tmp_path, write_jsonl):
    """A Tracker over two input shards of 4 and 2 rows, as the driver holds it."""
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": f"a{i}"} for i in range(4)])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"prompt": f"b{i}"} for i in range(2)])
    spec = make_spec(resources={"replicas": 2}, cost={"usd_per_gpu_hour": 3.6})
    plan = plan_job(spec)
    t = Tracker(plan, gpus_per_replica=1, progress=None, on_progress=lambda p: None, device="cpu")
    t.ids = sorted(s.shard_id for s in plan.todo)  # a.jsonl's shard, then b.jsonl's
    return t


def _feed(tracker, engine_output, rows):
    tracker.add(write_staged(engine_output(rows), tracker.plan.spec.output.path, {}, None))


def _board(tracker, busy=(30.0, 20.0)):
    """What two replicas would have reported: 10 s start-up each, then busy and idle time."""
    tracker.raw = {
        f"node:{i}:abc": {
            "startup_s": 10.0,
            "ready_at": time.time() - 40,
            "busy_s": b,
            "idle_s": 40 - b,
            "inflight_s": b * 12,
            "rows": 3,
            "prompt_tokens": 30,
            "completion_tokens": 15,
            "cached_tokens": 6,
            "limit": 16,
        }
        for i, b in enumerate(busy)
    }
    from batchjobs.tracker import replica_summary

    tracker.replicas = {k: replica_summary(v, tracker.weights) for k, v in tracker.raw.items()}
    tracker.states = {"ALIVE": 1, "RESTARTING": 1}
    tracker.restarts = 1


def test_live_panel_from_a_tracker_on_a_recording_console(tracker, engine_output):
    a, b = tracker.ids
    _feed(
        tracker,
        engine_output,
        [
            {"shard_id": a, "row_index": 0, "shard_rows": 4},
            {
                "shard_id": a,
                "row_index": 1,
                "shard_rows": 4,
                "error": "file:///in/a.jsonl line 2: 'prompt' is empty",
            },
            {
                "shard_id": a,
                "row_index": 2,
                "shard_rows": 4,
                "error": "file:///in/a.jsonl line 3: 'prompt' is empty",
            },
        ],
    )
    _feed(
        tracker, engine_output, [{"shard_id": b, "row_index": i, "shard_rows": 2} for i in (0, 1)]
    )
    _board(tracker)
    p = tracker.snapshot()
    assert (p.rows, p.error_rows, p.shards_committed, p.shards_total) == (5, 2, 1, 2)
    assert p.error_kinds == {"'prompt' is empty": 2}
    assert p.device_s == pytest.approx(2 * 10 + 80)  # start-up + busy + idle, both replicas
    assert p.usd == pytest.approx(100 / 3600 * 3.6)

    console = Console(record=True, width=100, file=io.StringIO())
    console.print(panel(p))
    text = console.export_text()
    assert "5 of ~6 (83%)" in text  # rows done of the total estimated from the bytes seen
    assert "1 of 2 committed" in text
    assert "$0.1 so far" in text and "100 CPU-s, start-up included" in text  # a CPU run
    assert "2 rows (40.0%)" in text and "2 × 'prompt' is empty" in text
    assert "1 of 2 up · 1 restarting · 1 restart(s) so far" in text
    assert "node:0:abc" in text and "busy 75%" in text and "busy 50%" in text
    assert "avg: since the first engine was ready" in text  # the rates say what they cover
    assert max(len(line) for line in text.splitlines()) <= 100


def test_panel_before_the_engines_are_up_and_the_clock_between_samples():
    d = Display("job", Console(record=True, width=100, file=io.StringIO()), live=False)
    d.started -= 75
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(d.render())
    text = console.export_text()
    assert "job · 1m15s" in text and "starting Ray" in text
    d.update(_sample(elapsed_s=100.0))
    d.sampled_at -= 20  # the next sample is late: the clock goes on meanwhile
    console.print(d.render())
    assert "j · 2m00s" in console.export_text()


def _sample(**over) -> Progress:
    base = dict(
        job="j",
        elapsed_s=100.0,
        rows=50,
        rows_total=100.0,
        error_rows=0,
        prompt_tokens=500,
        completion_tokens=1000,
        shards_committed=1,
        shards_total=2,
        replicas=1,
        busy_share=0.9,
        first_row_s=50.0,
        window_s=30.0,
        window_rows=30,
        window_completion_tokens=600,
        usd=1.0,
        usd_per_s=0.01,
    )
    base.update(over)
    return Progress(**base)


def test_rates_eta_and_projection_exclude_start_up():
    p = _sample()
    assert p.rows_per_s_avg == 1.0  # 50 rows in the 50 s since the first row
    assert p.output_tokens_per_s_now == 20.0  # 600 tokens over the last 30 s
    assert p.eta_s == 50.0  # 50 rows left at 1 row/s (not 100 s, start-up included)
    assert p.usd_projected == pytest.approx(1.0 + 0.01 * 50)
    line = p.line()
    assert line.startswith("[j] 50 rows (50%), 0 errors, 1/2 shards committed; ")
    assert "output 20 tok/s now, 20 since the engines were ready" in line and "ETA 50s" in line
    done = _sample(rows=100)
    assert done.eta_s is None and done.usd_projected == 1.0


def test_plain_lines_have_no_control_characters_and_come_every_few_seconds():
    buf = io.StringIO()
    d = Display.for_terminal("j", buf, quiet=False, plain_every_s=5.0)
    assert d.live is None  # not a terminal
    d.message("[j] starting 1 engine replica(s)")
    d.update(_sample())
    d.update(_sample(rows=60))  # within 5 s of the last line: not printed
    d.update(_sample(rows=100))  # the last one always is
    d.close()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[j] starting 1 engine replica(s)"
    assert [line.split(" rows")[0] for line in lines[1:]] == ["[j] 50", "[j] 100"]
    assert not CONTROL.search(buf.getvalue())


def test_quiet_shows_warnings_only():
    buf = io.StringIO()
    d = Display.for_terminal("j", buf, quiet=True)
    d.message("[j] 1 rows")
    d.update(_sample())
    d.alert("warning: something to fix")
    assert buf.getvalue() == "warning: something to fix\n"


def test_live_mode_redraws_on_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    d = Display("j", console, live=True)
    d.update(_sample())
    d.message("a message above the panel")
    d.close()
    out = buf.getvalue()
    assert "a message above the panel" in out and "50 of ~100" in out
    assert "\x1b[" in out  # the terminal gets cursor codes; logs never do (above)


def test_figures_formatting():
    assert [usd(v) for v in (0, 0.000083, 0.0421, 1.234, 12345)] == [
        "$0",
        "$0.000083",
        "$0.0421",
        "$1.23",
        "$12,345",
    ]
    assert [duration(s) for s in (5, 192, 7500)] == ["5s", "3m12s", "2h05m"]


def test_manifest_table_fits_100_columns_and_says_what_it_covers(tmp_path):
    from batchjobs.cost import Weights
    from batchjobs.manifest import COMMITTED, ShardRecord

    recs = []
    for i in range(3):
        r = ShardRecord(
            shard_id=f"part-{i:05d}.parquet-0123456789abcdef",
            source=f"s3://bucket/some/long/prefix/part-{i:05d}.parquet",
            status=COMMITTED,
            rows=123456,
            error_rows=12,
            prompt_tokens=98765432,
            completion_tokens=12345678,
        )
        r.finalise(Weights(0.0001, 0.002, "fit"), 8, 3.0)
        recs.append(r)
    runs = [{"device": "cpu", "gpu_s": 5000.0, "overhead_s": 300.0, "cost_usd": 4.2}]
    console = Console(record=True, width=100, file=io.StringIO())
    for part in manifest_tables(recs, runs, "s3://bucket/out", wide=False):
        console.print(part)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert sum("part-" in line for line in lines) == 3  # one line per shard: nothing wrapped
    assert "CPU-s" in text and "GPU-s" not in text  # a CPU run says CPU-seconds
    assert "98.8M" in text and "276,543" in text  # large figures kept short
    assert "per shard: its rows' work only" in text and "Job total over 1 run(s)" in text
    wide = Console(record=True, width=250, file=io.StringIO())
    for part in manifest_tables(recs, runs, "s3://bucket/out", wide=True):
        wide.print(part)
    assert "s3://bucket/some/long/prefix/part-00000.parquet" in wide.export_text()


def test_engines_still_starting_cost_from_the_start_and_rates_start_when_ready(tracker):
    tracker.t0 -= 100  # the data stage began 100 s ago; no replica has reported yet
    tracker.states = {"PENDING_CREATION": 2}
    p = tracker.snapshot()
    assert p.device_s == pytest.approx(200, abs=1)  # two replicas holding a device each
    assert p.usd == pytest.approx(200 / 3600 * 3.6, rel=0.01)
    assert "0 of 2 up · 2 starting" in _text(panel(p))
    assert "; engines starting (0 of 2 up); " in p.line()
    _board(tracker)  # now both have reported: ready 40 s ago
    tracker.done_ctok = 400
    p = tracker.snapshot()
    assert p.ready_s == pytest.approx(60, abs=1)
    assert p.device_s >= 200  # they reported 100 s in all: "so far" does not go down
    assert p.output_tokens_per_s_avg == pytest.approx(10, rel=0.05)  # 400 tokens in 40 s


def _text(renderable) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_plain_lines_while_nothing_comes_in_are_fewer():
    buf = io.StringIO()
    d = Display.for_terminal("j", buf, quiet=False, plain_every_s=5.0)
    d.update(_sample(rows=0))
    d.printed_at -= 10  # 10 s later, still no row: not yet
    d.update(_sample(rows=0))
    d.printed_at -= 25  # 35 s after the last line
    d.update(_sample(rows=0))
    d.printed_at -= 6  # rows come in again: every 5 s
    d.update(_sample(rows=10))
    assert [line.split(" rows")[0] for line in buf.getvalue().splitlines()] == [
        "[j] 0",
        "[j] 0",
        "[j] 10",
    ]
