"""The pilot's quality guard (agreement with the reference candidate, pilot.min_agreement),
the pilot's choice in the shard records and the report. No Ray, no engine: pipeline.run is
faked by one that writes real pilot outputs (Parquet + manifest) whose texts differ by
candidate."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjobs import agreement, engineconfig, pilotview, projection
from batchjobs import pilot as pl
from batchjobs.errors import EngineError, SpecError
from batchjobs.manifest import Manifest, ShardRecord
from batchjobs.sink import OutputRoot
from batchjobs.spec import parse_spec

WORDS = 6


def words(text: str) -> list[int]:
    return [hash(w) % 10_000 for w in text.split()]


def test_prefix_agreement_is_the_common_prefix_over_the_longer_output():
    assert agreement.prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agreement.prefix_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5  # tokens after a split
    assert agreement.prefix_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # an output cut short
    assert agreement.prefix_agreement([7, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert agreement.prefix_agreement([], []) == 1.0
    assert agreement.cosine([1.0, 0.0], [2.0, 0.0]) == pytest.approx(1.0)
    assert agreement.cosine([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)


def test_compare_counts_one_sided_errors_as_disagreement_and_leaves_out_shared_ones():
    ref = {0: ["a b c d"], 1: ["a b c d"], 2: None, 3: None, 4: ["x y"]}
    cand = {0: ["a b c d"], 1: ["a b z d"], 2: None, 3: ["q"], 4: None}
    got = agreement.compare(ref, cand, lambda texts: [words(t) for t in texts])
    # rows 0, 1, 3, 4 (2 is an error row on both sides); 1: half the prefix; 3, 4: one-sided
    assert got["agreement_rows"] == 4
    assert got["identical_share"] == pytest.approx(1 / 4)
    assert got["agreement"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    # several samples per row: each sample's agreement, a missing sample agrees 0
    got = agreement.compare({0: ["a b", "c d"]}, {0: ["a b"]}, lambda t: [words(x) for x in t])
    assert got["agreement"] == pytest.approx(0.5) and got["identical_share"] == 0
    # without a tokenizer only identical outputs are measured
    got = agreement.compare(ref, cand, None)
    assert got["agreement"] is None and got["identical_share"] == pytest.approx(1 / 4)
    # vectors (embed): cosine similarity
    got = agreement.compare({0: [1.0, 0.0]}, {0: [1.0, 1.0]}, None)
    assert got["agreement"] == pytest.approx(2**-0.5) and got["identical_share"] == 0


# --------------------------------------------------------------------------- the pilot


@pytest.fixture
def guard_dict(spec_dict, tmp_path, write_jsonl):
    write_jsonl(
        tmp_path / "in" / "a.jsonl",
        [{"id": f"a{i}", "prompt": f"prompt {i}"} for i in range(8)],
    )
    spec_dict["input"]["id_column"] = "id"
    spec_dict["cost"] = {"usd_per_gpu_hour": 1.0}
    spec_dict["pilot"] = {
        "rows": 6,
        "min_agreement": 0.9,
        "candidates": [
            {"name": "ref", "max_num_seqs": 2},
            {"name": "same", "max_num_seqs": 8},
            {"name": "cheap", "max_num_seqs": 64, "args": {"drift": 0}},
        ],
    }
    return spec_dict


@pytest.fixture
def writing_engine(monkeypatch, fake_pipeline_run):
    """pipeline.run stand-in that writes each pilot row's text to a real output root: six
    words per row; ``engine.args.drift: k`` replaces every word from the k-th on, and a
    prompt ending in 3 is an error row for ``args.fail_3``. Faster with more max_num_seqs."""

    def write_rows(spec) -> int:
        inp = pq.read_table(f"{spec.input.path}/pilot.parquet").to_pylist()
        drift = spec.engine.args.get("drift")
        texts, errors = [], []
        for i, row in enumerate(inp):
            ws = [f"w{i}-{k}" if drift is None or k < drift else f"x{k}" for k in range(WORDS)]
            bad = spec.engine.args.get("fail_3") and row["prompt"].endswith("3")
            texts.append(None if bad else " ".join(ws))
            errors.append("engine error: boom" if bad else None)
        out = OutputRoot(spec.output.path)
        out.wipe()
        out.fs.makedirs(out.path("s0"), exist_ok=True)
        table = pa.table({"row_index": list(range(len(inp))), "text": texts, "error": errors})
        pq.write_table(table, out.path("s0", "part-0.parquet"))
        Manifest(out).commit(
            ShardRecord(shard_id="s0", source="x", status="committed", files=["part-0.parquet"])
        )
        return len(inp)

    monkeypatch.setattr(pl, "load_encoder", lambda *a: lambda texts: [words(t) for t in texts])
    return fake_pipeline_run(write_rows)


def test_min_agreement_rules_out_the_cheapest_candidate_that_answers_differently(
    guard_dict, writing_engine, tmp_path
):
    lines: list[str] = []
    prepared = pl.prepare(parse_spec(guard_dict), progress=lines.append)
    report = prepared.report
    rows = {r["name"]: r for r in report["candidates"]}
    assert report["reference"] == "ref" and report["min_agreement"] == 0.9
    assert rows["ref"]["agreement"] == 1.0 and rows["ref"]["identical_share"] == 1.0
    assert rows["same"]["agreement"] == 1.0 and rows["same"]["agreement_rows"] == 6
    assert rows["cheap"]["agreement"] == 0.0 and rows["cheap"]["identical_share"] == 0.0
    # the cheapest by far, but ruled out: the next cheapest runs the job
    assert rows["cheap"]["usd_per_1m_tokens"] < rows["same"]["usd_per_1m_tokens"]
    assert rows["cheap"]["excluded"] == "agreement 0.000 < min_agreement 0.9"
    assert report["chosen"] == "same" and prepared.spec.engine.max_num_seqs == 8
    assert "ruled out by pilot.min_agreement: cheap (agreement 0.000" in report["reason"]
    text = "\n".join(lines)
    assert "agree   same" in text
    assert "cheap            excluded" in text and "ref              ok (ref)" in text
    recorded = json.loads((tmp_path / "out" / "_pilot.json").read_text())
    assert recorded["candidates"][2]["excluded"] and recorded["chosen"] == "same"

    # no threshold: agreement is reported, the cheapest runs
    del guard_dict["pilot"]["min_agreement"]
    report = pl.prepare(parse_spec(guard_dict), fresh=True).report
    assert report["chosen"] == "cheap" and report["min_agreement"] is None
    assert {r["name"]: r["agreement"] for r in report["candidates"]}["cheap"] == 0.0


def test_partial_agreement_and_a_marked_reference(guard_dict, writing_engine):
    cands = guard_dict["pilot"]["candidates"]
    cands[2]["args"] = {"drift": 3}  # the second half of every row differs
    cands[1].update(reference=True, args={"fail_3": True})  # one error row the others lack
    guard_dict["pilot"]["min_agreement"] = 0.4
    report = pl.prepare(parse_spec(guard_dict)).report
    rows = {r["name"]: r for r in report["candidates"]}
    assert report["reference"] == "same"
    # against 'same': row 3 is an error row there only (agreement 0), the rest as measured
    assert rows["ref"]["identical_share"] == pytest.approx(5 / 6)
    assert rows["ref"]["agreement"] == pytest.approx(5 / 6)
    assert rows["cheap"]["identical_share"] == 0.0
    assert rows["cheap"]["agreement"] == pytest.approx(5 * 0.5 / 6)
    assert not rows["cheap"].get("excluded") and report["chosen"] == "cheap"
    assert "reference" not in pl.overrides(parse_spec(guard_dict).pilot.candidates[1])


def test_a_reference_that_was_not_measured_cannot_guard(guard_dict, writing_engine, monkeypatch):
    guard_dict["pilot"]["candidates"].append({"name": "trt", "kind": "trtllm", "reference": True})
    monkeypatch.setattr(pl, "installed", lambda kind: kind == "vllm")
    with pytest.raises(
        EngineError,
        match="min_agreement is set, but the reference candidate 'trt' was not measured",
    ):
        pl.prepare(parse_spec(guard_dict))
    del guard_dict["pilot"]["min_agreement"]
    report = pl.prepare(parse_spec(guard_dict)).report
    assert report["chosen"] == "cheap"
    assert report["agreement_note"] == (
        "no agreement: the reference candidate 'trt' was not measured (not installed)"
    )
    assert all(r.get("agreement") is None for r in report["candidates"])


def test_spec_refuses_two_references_and_a_bad_threshold(guard_dict):
    guard_dict["pilot"]["candidates"][0]["reference"] = True
    guard_dict["pilot"]["candidates"][2]["reference"] = True
    with pytest.raises(SpecError, match="at most one candidate may be the reference"):
        parse_spec(guard_dict)
    guard_dict["pilot"]["candidates"][2]["reference"] = False
    guard_dict["pilot"]["min_agreement"] = 1.5
    with pytest.raises(SpecError, match="min_agreement: input should be less than or equal to 1"):
        parse_spec(guard_dict)


def test_gpu_candidates_are_engine_args(guard_dict):
    guard_dict["pilot"]["candidates"] = [
        {"name": "bf16"},
        {"name": "fp8", "args": {"quantization": "fp8"}},
        {"name": "kv-fp8", "args": {"kv_cache_dtype": "fp8"}},
        {"name": "seqs", "max_num_seqs": 2048},
    ]
    spec = parse_spec(guard_dict)
    fp8, kv, seqs = (pl.apply_candidate(spec, c) for c in spec.pilot.candidates[1:])
    from batchjobs.engines.vllm import engine_args

    assert engine_args(fp8)["quantization"] == "fp8"
    assert engine_args(kv)["kv_cache_dtype"] == "fp8"
    assert engine_args(seqs)["max_num_seqs"] == 2048
    # FP8 changes the numbers, so the job's results: another fingerprint; max_num_seqs does not
    assert fp8.fingerprint() != spec.fingerprint() and seqs.fingerprint() == spec.fingerprint()


# --------------------------------------------------------------------------- tables, records


def test_the_pilot_table_names_the_resource_it_measured(guard_dict, writing_engine):
    report = pl.prepare(parse_spec(guard_dict)).report
    assert report["device"] == "cpu"
    text = "\n".join(projection.format_table(report))
    assert "job CPU-s" in text and "CPU-s/1M tok" in text and "GPU-s" not in text
    assert "/replica-h" in text
    report["device"] = "cuda"
    text = "\n".join(projection.format_table(report))
    assert "job GPU-s" in text and "/GPU-h" in text and "CPU-s" not in text


def test_shard_records_and_report_name_the_chosen_configuration(
    guard_dict, writing_engine, tmp_path
):
    prepared = pl.prepare(parse_spec(guard_dict))
    out = OutputRoot(str(tmp_path / "out"))
    got = engineconfig.configuration(out, prepared.spec)
    assert got == {"engine_config": "same", "engine_digest": pl.engine_digest(prepared.spec)}
    # another engine at the same root (pilot=null, an edited engine): its digest, no name
    other = parse_spec({**guard_dict, "pilot": None})
    assert engineconfig.configuration(out, other)["engine_config"] == ""
    assert engineconfig.configuration(OutputRoot(str(tmp_path / "none")), other)[
        "engine_digest"
    ] == pl.engine_digest(other)

    records = [
        ShardRecord(shard_id=f"s{i}", source="x", status="committed", **got) for i in range(3)
    ] + [ShardRecord(shard_id="old", source="y", status="committed")]
    assert pilotview.shards_by_config(records) == {"same": 3, "unrecorded": 1}
    report = prepared.report
    tokens = 1_000_000
    same = next(r for r in report["candidates"] if r["name"] == "same")
    # a job that measured 10% more replica time per token than the projection
    run = {
        "prompt_tokens": tokens,
        "completion_tokens": 0,
        "gpu_s": same["gpu_s_per_1m_tokens"] * 1.1,
    }
    html = "\n".join(pilotview.report_section(report, [run], records))
    assert "<h2>Pilot: candidates</h2>" in html and "same (" not in html
    assert "ref (reference)" in html and "agreement 0.000 &lt; min_agreement 0.9" in html
    assert "the job&#x27;s 1 run(s) measured" in html and "(-9.1%)" in html
    assert "Shards by engine configuration: same: 3, unrecorded: 1" in html
    assert pilotview.report_section(None, [run], records) == []
