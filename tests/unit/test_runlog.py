"""``_runs.jsonl`` gets a record on every exit of ``pipeline.run``: status, exit code and
reason, times and the counters known so far. No Ray: the steps that need it are faked."""

from __future__ import annotations

import json
import time

import pytest

from batchjobs import pipeline
from batchjobs.cost import Weights
from batchjobs.errors import EngineError, OutputError
from batchjobs.layout import MANIFEST, MANIFEST_DELTAS, RUN_V, RUNS
from batchjobs.manifest import COMMITTED, ShardRecord
from batchjobs.sink import OutputRoot
from batchjobs.spec import parse_spec


@pytest.fixture
def job(spec_dict, write_jsonl, tmp_path):
    """Two input shards; the engine env holds a token that must never reach a record."""
    for name in ("a", "b"):
        write_jsonl(tmp_path / "in" / f"{name}.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    spec_dict["engine"]["env"] = {"HF_TOKEN": "hf_do-not-leak"}
    return spec_dict


@pytest.fixture
def fake_cluster(monkeypatch):
    """Everything ``run`` would start on Ray, as no-ops; ``execute`` decides what happens."""
    calls = {"stopped": 0}
    for name in ("connect_ray", "check_resources", "start_board", "stop_replicas"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: None, raising=False)
    monkeypatch.setattr(pipeline, "resolve_device", lambda spec: "cpu")
    monkeypatch.setattr(pipeline, "start_replicas", lambda *a, **k: None)

    def stop_engines(replicas):
        calls["stopped"] += 1
        return 0.0

    monkeypatch.setattr(pipeline, "_stop_engines", stop_engines)

    def use(execute):
        monkeypatch.setattr(pipeline, "_execute", execute)
        return calls

    return use


def _commit(plan, shard, rows=2):
    rec = ShardRecord(
        shard_id=shard.shard_id,
        source=shard.url,
        status=COMMITTED,
        rows=rows,
        prompt_tokens=7 * rows,
        completion_tokens=3 * rows,
        fingerprint=plan.fingerprint,
        committed_at=time.time(),
    )
    rec.finalise(Weights(0.0, 0.5 / rows, "fit"), 1, 3.6)  # 3 × rows decode tokens: 1.5 s
    plan.manifest.commit(rec)


def _runs(out) -> list[dict]:
    return [json.loads(line) for line in (out / RUNS).read_text().splitlines()]


def test_a_failure_mid_run_records_exit_code_reason_and_what_was_committed(
    job, fake_cluster, tmp_path
):
    committed = []

    def execute(plan, summary, *args, **kwargs):
        _commit(plan, plan.todo[0])
        committed.append(plan.todo[0].shard_id)
        raise EngineError("replica r0 died: out of memory with HF_TOKEN=hf_do-not-leak\ndetails")

    fake_cluster(execute)
    t0 = time.time()
    with pytest.raises(EngineError, match="out of memory"):
        pipeline.run(parse_spec(job))
    out = tmp_path / "out"
    [rec] = _runs(out)
    assert rec["v"] == RUN_V
    assert (rec["status"], rec["exit_code"]) == ("failed", 4)
    assert rec["reason"] == "replica r0 died: out of memory with HF_TOKEN=***"
    assert t0 <= rec["started_at"] <= rec["ended_at"] <= time.time()
    assert (rec["shards"], rec["shards_run"], rec["shards_committed"]) == (2, 2, 1)
    assert (rec["rows"], rec["prompt_tokens"], rec["completion_tokens"]) == (2, 14, 6)
    assert rec["gpu_s"] == pytest.approx(1.5) and rec["wall_s"] > 0
    assert "hf_do-not-leak" not in (out / RUNS).read_text()
    # the commit so far is in one compacted _manifest.jsonl
    assert not (out / MANIFEST_DELTAS).exists()
    lines = (out / MANIFEST).read_text().splitlines()
    assert [json.loads(x)["shard_id"] for x in lines] == committed


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (RuntimeError("a bug\nwith a traceback"), 1, "RuntimeError: a bug"),
        (OutputError("cannot write /o/x: disk full"), 5, "cannot write /o/x: disk full"),
    ],
)
def test_every_kind_of_failure_gets_its_exit_code(job, fake_cluster, tmp_path, exc, code, reason):
    def execute(*args, **kwargs):
        raise exc

    fake_cluster(execute)
    with pytest.raises(type(exc)):
        pipeline.run(parse_spec(job))
    [rec] = _runs(tmp_path / "out")
    assert (rec["status"], rec["exit_code"], rec["reason"]) == ("failed", code, reason)
    assert rec["shards_committed"] == 0 and rec["rows"] == 0


def test_a_success_appends_after_earlier_records(job, fake_cluster, tmp_path):
    def fail(*args, **kwargs):
        raise EngineError("no engine")

    def execute(plan, summary, *args, **kwargs):
        for shard in plan.todo:
            _commit(plan, shard)

    fake_cluster(fail)
    with pytest.raises(EngineError):
        pipeline.run(parse_spec(job))
    calls = fake_cluster(execute)
    summary = pipeline.run(parse_spec(job))
    assert calls["stopped"] == 1
    failed, ok = _runs(tmp_path / "out")
    assert failed["status"] == "failed"
    assert (ok["status"], ok["exit_code"], ok["reason"]) == ("succeeded", 0, None)
    assert ok["rows"] == summary.rows == 4 and ok["shards_committed"] == 2
    assert ok["started_at"] <= ok["ended_at"]


def test_a_failure_before_planning_finished_is_recorded(job, tmp_path):
    job["input"]["path"] = str(tmp_path / "nowhere" / "*.jsonl")
    with pytest.raises(Exception) as info:
        pipeline.run(parse_spec(job))
    [rec] = _runs(tmp_path / "out")
    assert rec["status"] == "failed" and rec["exit_code"] == info.value.exit_code == 3
    assert rec["name"] == "unit-job" and "nowhere" in rec["reason"]


def test_mode_error_gets_no_record_that_would_refuse_the_rerun(job, tmp_path):
    job["input"]["path"] = str(tmp_path / "nowhere" / "*.jsonl")
    job["output"]["mode"] = "error"
    with pytest.raises(Exception, match="nowhere"):
        pipeline.run(parse_spec(job))
    assert OutputRoot(str(tmp_path / "out")).is_empty()


def test_a_record_that_cannot_be_written_does_not_hide_the_failure(
    job, fake_cluster, monkeypatch, caplog
):
    def execute(*args, **kwargs):
        raise EngineError("the real reason")

    real = OutputRoot.write_atomic

    def no_runs(self, name, data):
        if name == RUNS:
            raise OutputError("cannot write _runs.jsonl: read-only")
        real(self, name, data)

    fake_cluster(execute)
    monkeypatch.setattr(OutputRoot, "write_atomic", no_runs)
    with pytest.raises(EngineError, match="the real reason"):
        pipeline.run(parse_spec(job))
    assert "cannot record the failed run" in caplog.text
