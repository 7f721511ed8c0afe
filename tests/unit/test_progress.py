"""_progress.jsonl (samples written, kept apart per run, bounded in size), error kinds, and
the Ray metrics' bookkeeping; the replicas' states from the actor table."""

from __future__ import annotations

import json

import pytest

from batchjobs import compat
from batchjobs.layout import PROGRESS
from batchjobs.progress import ProgressLog, RayMetrics, error_kind, read_samples
from batchjobs.sink import OutputRoot
from batchjobs.tracker import Progress


def _p(rows: int, t: float, **over) -> Progress:
    fields = dict(
        job="j",
        elapsed_s=t,
        rows=rows,
        rows_total=1000.0,
        error_rows=rows // 10,
        prompt_tokens=rows * 10,
        completion_tokens=rows * 20,
        shards_committed=rows // 100,
        shards_total=10,
        replicas=2,
        busy_share=0.9,
        started_at=1000.0,
        usd=rows / 1000,
        device="cpu",
        replica_figures={
            f"host:{i}:abcdef": {"busy_share": 0.9, "inflight": 12.5, "rows": rows // 2}
            for i in range(2)
        },
        error_kinds={"'prompt' is empty": rows // 10},
    )
    fields.update(over)
    return Progress(**fields)


def test_samples_are_written_with_what_the_report_needs(tmp_path):
    out = OutputRoot(str(tmp_path))
    log = ProgressLog(out, run=1000.0, every_s=5.0)
    log(_p(10, 5.0))
    log(_p(20, 6.0))  # within 5 s of the last: not written
    log(_p(30, 9.0), force=True)  # the last sample of a run always is
    samples = read_samples(out)
    assert [s["rows"] for s in samples] == [10, 30]
    log(_p(31, 9.5), force=True)  # moments after the last one: replaces it
    assert [s["rows"] for s in read_samples(out)] == [10, 31]
    s = samples[0]
    assert s["run"] == 1000.0 and s["t"] == 1005.0 and s["device"] == "cpu"
    assert s["usd"] == 0.01 and s["error_rows"] == 1
    assert s["replicas"]["host:0:abcdef"] == {"busy_share": 0.9, "inflight": 12.5, "rows": 5}
    assert s["errors"] == {"'prompt' is empty": 1}
    assert json.loads((tmp_path / PROGRESS).read_text().splitlines()[0])["v"] == 1


def test_a_resumed_job_keeps_earlier_runs_samples(tmp_path):
    out = OutputRoot(str(tmp_path))
    first = ProgressLog(out, run=1000.0, every_s=0)
    for i in range(3):
        first(_p(i * 10, float(i)))
    second = ProgressLog(out, run=2000.0, every_s=0)
    second(_p(40, 1.0, started_at=2000.0))
    runs = [s["run"] for s in read_samples(out)]
    assert runs == [1000.0, 1000.0, 1000.0, 2000.0]


def test_the_file_stays_bounded_and_spans_the_whole_run(tmp_path):
    out = OutputRoot(str(tmp_path))
    ProgressLog(out, run=500.0, every_s=0)(_p(1, 0.0, started_at=500.0))  # an earlier run
    log = ProgressLog(out, run=1000.0, every_s=1.0, max_bytes=20_000)
    n = 400
    for i in range(n):
        log(_p(i, float(i)))  # one a second
    log(_p(n - 1, float(n - 1)), force=True)  # the run's last, as the pipeline ends it
    size = (tmp_path / PROGRESS).stat().st_size
    assert size <= 20_000
    samples = read_samples(out)
    this_run = [s for s in samples if s["run"] == 1000.0]
    assert this_run[0]["rows"] == 0 and this_run[-1]["rows"] == n - 1  # first and last kept
    assert len(this_run) < n / 4  # thinned, spread over the run
    gaps = [b["rows"] - a["rows"] for a, b in zip(this_run, this_run[1:-1])]
    assert max(gaps) <= 2 * min(gaps)  # evenly spread, not just the start kept
    assert [s["run"] for s in samples][0] == 500.0  # the earlier run's sample survives
    assert log.every_s >= 4.0  # and this run now samples less often


def test_a_sample_that_cannot_be_written_does_not_stop_the_job(tmp_path, caplog):
    (tmp_path / "root").write_text("a file where the root should be")
    log = ProgressLog(OutputRoot(str(tmp_path / "root")), run=1.0, every_s=0)
    log(_p(1, 1.0))
    log(_p(2, 2.0))
    assert sum("cannot write progress samples" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("file:///in/part-000.jsonl line 58: 'prompt' is empty", "'prompt' is empty"),
        (
            "s3://b/x.parquet row 12: 'messages' message 3 has role 'wizard'",
            "'messages' message N has role 'wizard'",
        ),
        (
            "rejected by engine: VLLMValidationError: This model's maximum context length is "
            "512 tokens. However, your prompt contains at least 513 input tokens.",
            "rejected by engine: VLLMValidationError: This model's maximum context length is N tokens.",
        ),
        (None, "(no message)"),
    ],
)
def test_error_kinds_leave_out_what_differs_per_row(message, kind):
    assert error_kind(message) == kind


def test_error_kinds_are_short():
    assert len(error_kind("x" * 500)) == 100


class _Metric:
    def __init__(self, name, description="", tag_keys=()):
        self.name, self.calls = name, []

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))


def test_ray_metrics_count_increments_and_set_gauges(monkeypatch):
    import ray.util.metrics as rm

    made = {}

    def make(kind):
        def factory(name, description="", tag_keys=()):
            made[name] = _Metric(name)
            return made[name]

        return factory

    monkeypatch.setattr(rm, "Counter", make("counter"))
    monkeypatch.setattr(rm, "Gauge", make("gauge"))
    m = RayMetrics("j")
    m(_p(10, 1.0, window_s=10.0, window_rows=10))
    m(_p(30, 2.0))
    assert [c[1] for c in made["batchjobs_rows"].calls] == [10, 20]  # counters: the increments
    assert made["batchjobs_rows_per_s"].calls[0] == ("set", 1.0, {"job": "j"})
    assert made["batchjobs_cost_usd"].calls[-1][1] == 0.03
    busy = made["batchjobs_replica_busy_share"].calls
    assert busy[0] == ("set", 0.9, {"job": "j", "replica": "host:0:abcdef"})


def test_ray_metrics_give_up_quietly_without_a_metrics_agent(monkeypatch):
    import ray.util.metrics as rm

    def broken(*a, **k):
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(rm, "Counter", broken)
    m = RayMetrics("j")
    m(_p(1, 1.0))
    m(_p(2, 2.0))
    assert m.off


def test_replica_states_from_the_actor_table(monkeypatch):
    from ray._private import state

    monkeypatch.setattr(compat, "check_version", lambda *a: True)
    table = {
        "a": {"ActorClassName": "EarlyReplica", "State": "ALIVE", "NumRestarts": 1},
        "b": {"ActorClassName": "EarlyReplica", "State": "RESTARTING", "NumRestarts": 2},
        "c": {"ActorClassName": "MapWorker(MapBatches(EngineStage))", "State": "ALIVE"},
    }
    monkeypatch.setattr(state, "actors", lambda job_id: table)
    assert compat.ray_actor_states("01000000", "EarlyReplica") == (
        {"ALIVE": 1, "RESTARTING": 1},
        3,
    )
    assert compat.ray_actor_states("01000000", "EngineStage") == ({"ALIVE": 1}, 0)
    table["a"] = {"ActorClassName": "EarlyReplica"}  # the table changed shape
    with pytest.raises(compat.CompatError, match="ray_actor_states"):
        compat.ray_actor_states("01000000", "EarlyReplica")
