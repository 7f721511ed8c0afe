"""`engine: auto` (the pilot section): spec checks, the cost projection and ranking, the pilot
input, and reuse of a recorded decision. No Ray, no engine: pipeline.run is faked."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchjobs import pilot as pl
from batchjobs import projection, readers
from batchjobs.cli import app
from batchjobs.errors import EngineError, OutputError, SpecError
from batchjobs.readers import count_rows, list_shards, read_shard
from batchjobs.spec import parse_spec
from batchjobs.tasks import task_for


@pytest.fixture
def pilot_dict(spec_dict):
    spec_dict["engine"].update(args={"enforce_eager": True}, env={"KV": "job-secret-1"})
    spec_dict["pilot"] = {
        "rows": 5,
        "candidates": [
            {"name": "slow", "max_num_seqs": 2},
            {"name": "fast", "max_num_seqs": 64, "env": {"TOKEN": "cand-secret-2"}},
        ],
    }
    return spec_dict


@pytest.fixture
def jsonl_input(tmp_path, write_jsonl):
    write_jsonl(
        tmp_path / "in" / "a.jsonl",
        [{"id": f"a{i}", "prompt": f"prompt a {i}", "mt": i % 3 or None} for i in range(3)],
    )
    write_jsonl(
        tmp_path / "in" / "b.jsonl",
        [{"id": f"b{i}", "prompt": f"prompt b {i}", "mt": 2} for i in range(4)],
    )


def _error(raw) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, source="job.yaml")
    return str(info.value)


# --------------------------------------------------------------------------- the spec


def test_pilot_section_parses_and_defaults(pilot_dict):
    del pilot_dict["pilot"]["rows"]
    spec = parse_spec(pilot_dict)
    assert spec.pilot.rows == 200
    assert [c.name for c in spec.pilot.candidates] == ["slow", "fast"]
    assert pl.overrides(spec.pilot.candidates[0]) == {"max_num_seqs": 2}


def test_unknown_candidate_key_names_its_path_and_suggests(pilot_dict):
    pilot_dict["pilot"]["candidates"][1]["max_num_seq"] = 8
    msg = _error(pilot_dict)
    assert "pilot.candidates[1].max_num_seq: unknown key (did you mean 'max_num_seqs'?)" in msg


def test_pilot_typo_suggests(pilot_dict):
    pilot_dict["pilot"]["row"] = 10
    assert "pilot.row: unknown key (did you mean 'rows'?)" in _error(pilot_dict)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["candidates"].pop(), "pilot.candidates: list should have at least 2 items"),
        (
            lambda p: p["candidates"][1].update(name="slow"),
            "candidate names must be unique (slow repeated)",
        ),
        (
            lambda p: p["candidates"][0].update(max_num_seqs=0),
            "pilot.candidates[0].max_num_seqs: input should be greater than or equal to 1",
        ),
        (
            lambda p: p["candidates"][0].update(kind="tgi"),
            "pilot.candidates[0].kind: input should be 'vllm' or 'trtllm'",
        ),
        (lambda p: p["candidates"][0].pop("name"), "pilot.candidates[0].name: required key"),
        (lambda p: p.update(rows=0), "pilot.rows: input should be greater than or equal to 1"),
        (
            lambda p: p["candidates"][0].update(model="/no/such/model"),
            "candidates[0].model '/no/such/model' does not exist",
        ),
    ],
)
def test_bad_pilot_sections_are_refused(pilot_dict, mutate, expected):
    mutate(pilot_dict["pilot"])
    assert expected in _error(pilot_dict)


def test_candidate_is_the_job_engine_with_overrides(pilot_dict):
    pilot_dict["engine"]["dtype"] = "bfloat16"
    pilot_dict["pilot"]["candidates"][1]["args"] = {"max_num_batched_tokens": 4096}
    spec = parse_spec(pilot_dict)
    slow, fast = (pl.apply_candidate(spec, c) for c in spec.pilot.candidates)
    assert slow.pilot is None and fast.pilot is None
    assert (slow.engine.max_num_seqs, fast.engine.max_num_seqs) == (2, 64)
    assert fast.engine.dtype == "bfloat16" and fast.engine.model == spec.engine.model
    # args and env merge into the job's
    assert fast.engine.args == {"enforce_eager": True, "max_num_batched_tokens": 4096}
    assert fast.engine.env == {"KV": "job-secret-1", "TOKEN": "cand-secret-2"}
    # max_num_seqs changes speed, not results: one fingerprint; a dtype change is another job
    assert slow.fingerprint() == fast.fingerprint() == spec.fingerprint()
    pilot_dict["pilot"]["candidates"][1]["dtype"] = "float32"
    spec = parse_spec(pilot_dict)
    assert pl.apply_candidate(spec, spec.pilot.candidates[1]).fingerprint() != spec.fingerprint()


def test_secrets_stay_out_of_redacted_spec_and_tables(pilot_dict):
    spec = parse_spec(pilot_dict)
    blob = json.dumps(spec.redacted()) + json.dumps(
        [pl.shown_overrides(c) for c in spec.pilot.candidates]
    )
    assert "cand-secret-2" not in blob and "job-secret-1" not in blob
    assert "TOKEN" in blob


# --------------------------------------------------------------------------- arithmetic


def _measured(**over):
    m = {
        "rows": 10,
        "prompt_tokens": 600,
        "completion_tokens": 400,
        "startup_s": 40.0,
        "engine_s": 2.0,
        "gpus_per_replica": 2,
    }
    return {**m, **over}


def test_projection_amortises_start_up_over_the_job():
    p = projection.project(_measured(), expected_rows=1000, replicas=4, usd_per_gpu_hour=3.0)
    # 100 tokens/row × 1000 rows; 2 GPUs × (40 s × 4 replicas + 2 s × 1000/10)
    assert p["tokens_per_row"] == 100
    assert p["expected_tokens"] == 100_000
    assert p["expected_gpu_s"] == pytest.approx(720.0)
    assert p["expected_usd"] == pytest.approx(0.6)
    assert p["gpu_s_per_1m_tokens"] == pytest.approx(7200.0)
    assert p["usd_per_1m_tokens"] == pytest.approx(6.0)
    assert (
        projection.project(_measured(prompt_tokens=0, completion_tokens=0), 10, 1, 1.0)[
            "usd_per_1m_tokens"
        ]
        is None
    )


def test_projection_pays_the_draining_tail_once_per_replica_like_start_up():
    p = projection.project(
        _measured(drain_s=5.0), expected_rows=1000, replicas=4, usd_per_gpu_hour=3.0
    )
    # 2 GPUs × ((40 s + 5 s) × 4 replicas + 2 s × 1000/10)
    assert p["expected_gpu_s"] == pytest.approx(760.0)
    assert p["tokens_per_s"] == pytest.approx(1000 / 2.0)  # the pilot rows' work rate


def test_job_size_decides_between_quick_start_and_fast_engine():
    quick_start = _measured(startup_s=5.0, engine_s=4.0)
    fast_engine = _measured(startup_s=60.0, engine_s=1.0)

    def winner(rows):
        table = [
            {
                "name": "quick-start",
                "status": "ok",
                **projection.project(quick_start, rows, 1, 2.0),
            },
            {
                "name": "fast-engine",
                "status": "ok",
                **projection.project(fast_engine, rows, 1, 2.0),
            },
        ]
        return projection.rank(table, "usd_per_1m_tokens")

    assert winner(100) == "quick-start"  # start-up dominates a small job
    assert winner(100_000) == "fast-engine"  # throughput dominates a large one


def test_rank_skips_failed_and_breaks_ties_by_order():
    table = [
        {"name": "broken", "status": "failed", "usd_per_1m_tokens": None},
        {"name": "a", "status": "ok", "usd_per_1m_tokens": 2.0, "gpu_s_per_1m_tokens": 9.0},
        {"name": "b", "status": "ok", "usd_per_1m_tokens": 2.0, "gpu_s_per_1m_tokens": 8.0},
        {"name": "c", "status": "not installed"},
    ]
    assert projection.rank(table, "usd_per_1m_tokens") == "a"
    assert projection.rank(table, "gpu_s_per_1m_tokens") == "b"
    assert projection.rank(table[:1], "usd_per_1m_tokens") is None
    assert projection.metric_for(0.0) == "gpu_s_per_1m_tokens"
    assert projection.metric_for(0.5) == "usd_per_1m_tokens"


def test_count_rows_parquet_footer_jsonl_lines_and_estimate(tmp_path, write_jsonl, monkeypatch):
    d = tmp_path / "rows"
    write_jsonl(d / "a.jsonl", [{"prompt": "x"}] * 7)
    (d / "b.jsonl").write_text('{"prompt": "y"}\n\n{"prompt": "z"}\n')
    pq.write_table(pa.table({"prompt": ["p"] * 11}), d / "c.parquet")
    shards = list_shards(str(d))
    assert count_rows(shards) == (20, False)
    monkeypatch.setattr(readers, "COUNT_JSONL_BYTES", 10)
    rows, estimated = count_rows(shards)
    assert estimated and rows == 11 + 7 + 2  # b.jsonl estimated from a.jsonl's bytes per row


# --------------------------------------------------------------------------- pilot input


def test_pilot_input_is_the_first_rows_with_ids_and_sampling_columns(pilot_dict, jsonl_input):
    pilot_dict["input"].update(id_column="id", sampling_columns={"max_tokens": "mt"})
    spec = parse_spec(pilot_dict)
    shards = list_shards(spec.input.path)
    path, rows = pl.write_pilot_input(spec, shards)
    assert rows == 5
    (shard,) = list_shards(path)
    # read back as the job reads it: the same task columns, ids and sampling columns
    t = next(read_shard(shard, task_for(spec).input_columns(), 100))
    assert t.column("row_id").to_pylist() == ["a0", "a1", "a2", "b0", "b1"]
    assert json.loads(t.column("payload")[3].as_py()) == {"prompt": "prompt b 0"}
    assert t.column("input_error").null_count == 5
    params = [json.loads(p) if p else None for p in t.column("params").to_pylist()]
    assert params == [None, {"max_tokens": 1}, {"max_tokens": 2}, {"max_tokens": 2}] + [
        {"max_tokens": 2}
    ]


CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"


def _chat_pilot_input(pilot_dict, tmp_path, write_jsonl, conversations):
    write_jsonl(
        tmp_path / "in" / "a.jsonl",
        [{"id": f"c{i}", "messages": m} for i, m in enumerate(conversations)],
    )
    pilot_dict["task"] = "chat"
    pilot_dict["chat"] = {"template": CHAT_TEMPLATE}
    pilot_dict["input"].update(id_column="id")
    pilot_dict["pilot"]["rows"] = 3
    spec = parse_spec(pilot_dict)
    path, rows = pl.write_pilot_input(spec, list_shards(spec.input.path))
    (shard,) = list_shards(path)
    cols = task_for(spec).input_columns()
    readers.preflight(shard, cols)  # the pilot run's own preflight
    return rows, next(read_shard(shard, cols, 100))


def test_chat_pilot_input_keeps_the_conversations(pilot_dict, tmp_path, write_jsonl):
    hi = [{"role": "user", "content": "hi"}]
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "yo"}]
    rows, t = _chat_pilot_input(pilot_dict, tmp_path, write_jsonl, [hi, [], two, hi])
    assert rows == 3
    assert t.column("row_id").to_pylist() == ["c0", "c1", "c2"]
    payloads = [json.loads(p) if p else None for p in t.column("payload").to_pylist()]
    assert payloads == [{"messages": hi}, None, {"messages": two}]
    # the row the job refuses is refused in the pilot too (as a null conversation)
    assert t.column("input_error").is_null().to_pylist() == [True, False, True]


def test_chat_pilot_input_of_bad_rows_only_is_still_chat_input(pilot_dict, tmp_path, write_jsonl):
    rows, t = _chat_pilot_input(pilot_dict, tmp_path, write_jsonl, [[], "x", None])
    assert rows == 3 and t.column("input_error").null_count == 0


# --------------------------------------------------------------------------- the pilot (faked)


@pytest.fixture
def fake_engine(fake_pipeline_run):
    """pipeline.run stand-in: engine time per row falls with max_num_seqs; 'boom' fails."""

    def rows_of(spec) -> int:
        if spec.engine.args.get("boom"):
            raise EngineError("replica r: engine vllm failed to start: out of memory")
        return 5 if ".pilot." in spec.name else 7

    return fake_pipeline_run(rows_of)


def test_prepare_pilots_records_and_then_reuses(pilot_dict, jsonl_input, fake_engine, tmp_path):
    pilot_dict["cost"] = {"usd_per_gpu_hour": 1.0}
    spec = parse_spec(pilot_dict)
    lines: list[str] = []
    prepared = pl.prepare(spec, progress=lines.append)
    assert prepared.spec.engine.max_num_seqs == 64 and prepared.spec.pilot is None
    assert prepared.spec.output.mode == "resume" and prepared.fresh is False
    report = prepared.report
    assert report["chosen"] == "fast" and report["expected_rows"] == 7
    assert [r["status"] for r in report["candidates"]] == ["ok", "ok"]
    assert [c.output.path for c in fake_engine] == [
        str(tmp_path / "out" / "_pilot" / "slow"),
        str(tmp_path / "out" / "_pilot" / "fast"),
    ]
    assert all(c.resources.replicas == 1 and c.output.mode == "overwrite" for c in fake_engine)
    recorded = json.loads((tmp_path / "out" / "_pilot.json").read_text())
    assert recorded["chosen"] == "fast"
    assert recorded["chosen_fingerprint"] == prepared.spec.fingerprint()
    shown = "\n".join(lines) + json.dumps(recorded)
    assert "pilot: chose 'fast'" in shown
    assert recorded["pilot_gpu_s"] == pytest.approx((30 + 5 * 8 / 2) + (30 + 5 * 8 / 64))
    assert "the pilot itself took 80.6 CPU-s" in shown  # the fake runs on CPU
    assert "cand-secret-2" not in shown and "job-secret-1" not in shown

    # the same spec again: the decision is reused, nothing is piloted
    fake_engine.clear()
    lines.clear()
    again = pl.prepare(spec, progress=lines.append)
    assert fake_engine == []
    assert again.spec == prepared.spec and again.report["reused"] is True
    assert any("reusing the decision" in line for line in lines)

    # the chosen candidate changed: pilot again
    pilot_dict["pilot"]["candidates"][1]["max_num_seqs"] = 32
    changed = pl.prepare(parse_spec(pilot_dict), progress=lines.append)
    assert len(fake_engine) == 2 and changed.report["reused"] is False
    assert any("not reusing" in line and "'fast'" in line for line in lines)


def test_failed_and_missing_candidates_are_rows_not_fatal(
    pilot_dict, jsonl_input, fake_engine, monkeypatch
):
    pilot_dict["pilot"]["candidates"][1]["args"] = {"boom": True}
    pilot_dict["pilot"]["candidates"].append({"name": "trt", "kind": "trtllm"})
    monkeypatch.setattr(pl, "installed", lambda kind: kind == "vllm")
    prepared = pl.prepare(parse_spec(pilot_dict))
    rows = {r["name"]: r for r in prepared.report["candidates"]}
    assert prepared.report["chosen"] == "slow"
    assert rows["fast"]["status"] == "failed" and "out of memory" in rows["fast"]["error"]
    assert rows["trt"]["status"] == "not installed"
    assert prepared.report["metric"] == "gpu_s_per_1m_tokens"  # no price: ranked by GPU-s
    assert "no price set" in prepared.report["reason"]


def test_all_candidates_failing_is_an_engine_error(pilot_dict, jsonl_input, fake_engine):
    for cand in pilot_dict["pilot"]["candidates"]:
        cand["args"] = {"boom": True}
    with pytest.raises(EngineError, match="every candidate failed: slow: .*; fast: "):
        pl.prepare(parse_spec(pilot_dict))


def test_output_modes_apply_before_the_pilot(pilot_dict, jsonl_input, fake_engine, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    pilot_dict["output"]["mode"] = "error"
    with pytest.raises(OutputError, match="not empty"):
        pl.prepare(parse_spec(pilot_dict))
    assert fake_engine == []
    pilot_dict["output"]["mode"] = "overwrite"
    prepared = pl.prepare(parse_spec(pilot_dict))
    assert not (out / "old.txt").exists() and (out / "_pilot.json").exists()
    assert prepared.spec.output.mode == "resume"  # the job must not wipe the pilot's record


def test_cli_run_prints_and_returns_the_decision(
    pilot_dict, jsonl_input, fake_engine, write_yaml, tmp_path, monkeypatch
):
    from batchjobs import cli

    monkeypatch.setattr(cli, "_check_engine_installed", lambda kind: None)
    path = write_yaml(pilot_dict)
    summary = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["run", str(path), "--quiet", "--summary-json", str(summary)])
    assert result.exit_code == 0, result.output
    assert "engine: 'fast' chosen by pilot" in result.output
    data = json.loads(summary.read_text())
    assert data["engine_chosen"] == "fast" and data["pilot"]["chosen"] == "fast"
    assert fake_engine[-1].engine.max_num_seqs == 64  # the job ran with the choice
    shown = CliRunner().invoke(app, ["manifest", str(tmp_path / "out")])
    assert shown.exit_code == 1  # the fake run committed nothing: no manifest records


def test_validate_lists_candidates(pilot_dict, jsonl_input, write_yaml, monkeypatch):
    from batchjobs import cli

    monkeypatch.setattr(cli, "_check_engine_installed", lambda kind: None)
    monkeypatch.setattr(pl, "installed", lambda kind: True)
    result = CliRunner().invoke(app, ["validate", str(write_yaml(pilot_dict))])
    assert result.exit_code == 0, result.output
    assert "pilot candidate slow: engine vllm, fingerprint " in result.output
    assert "pilot candidate fast:" in result.output


def test_demo_auto_yaml_loads(monkeypatch):
    from pathlib import Path

    from batchjobs.spec import load_spec

    repo = Path(__file__).resolve().parents[2]
    if not (repo / "models" / "tiny-llama").is_dir():
        pytest.skip("models/tiny-llama not built (batchjobs make-model models/tiny-llama)")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_spec("jobs/demo_auto.yaml")
    assert [c.name for c in spec.pilot.candidates] == ["seqs-4", "seqs-64"]
    assert load_spec("jobs/demo_auto.yaml", ["pilot=null"]).pilot is None
