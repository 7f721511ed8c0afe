"""`engine: auto` on CPU: a pilot of three real vLLM configurations, then the job with the
cheapest that answers like the reference. Two configurations of the tiny model agree token
for token (max_num_seqs changes the batching, not the arithmetic of a row); the third is a
model of the same shape with other weights, which cannot agree and is ruled out by
pilot.min_agreement. Starts four engines (three pilots, one job); the rerun starts none."""

from __future__ import annotations

import json

import pyarrow.dataset as pds
import pytest
import yaml
from cli_text import cli_text
from conftest import spec_dict
from typer.testing import CliRunner

from batchjobs.cli import app

pytestmark = pytest.mark.integration


def test_cli_pilot_guards_quality_picks_cheapest_and_reuses_it(tmp_path, tiny_model, ray_session):
    from batchjobs.tools.models import build_model

    other = build_model(tmp_path / "other-weights", "tiny", seed=1)
    inp = tmp_path / "in"
    inp.mkdir()
    ids = []
    for part in ("a", "b"):
        with open(inp / f"{part}.jsonl", "w") as f:
            for i in range(30):
                ids.append(f"{part}-{i}")
                f.write(json.dumps({"id": ids[-1], "prompt": f"the price of the job {part} {i}"}))
                f.write("\n")
    out = tmp_path / "out"
    spec = spec_dict(tiny_model, str(inp / "*.jsonl"), str(out), input={"id_column": "id"})
    spec["cost"] = {"usd_per_gpu_hour": 0.10}
    spec["pilot"] = {
        "rows": 24,
        "min_agreement": 0.9,
        "candidates": [
            {"name": "seqs2", "max_num_seqs": 2},
            {"name": "seqs64", "max_num_seqs": 64, "env": {"PILOT_SECRET": "hunter2-value"}},
            {"name": "other", "max_num_seqs": 64, "model": str(other)},
        ],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary_path = tmp_path / "s.json"
    runner = CliRunner()

    result = runner.invoke(app, ["run", str(path), "--summary-json", str(summary_path)])
    text = cli_text(result)
    assert result.exit_code == 0, text[-4000:]
    assert "hunter2-value" not in text

    decision = json.loads((out / "_pilot.json").read_text())
    assert "hunter2-value" not in json.dumps(decision)
    table = {r["name"]: r for r in decision["candidates"]}
    assert set(table) == {"seqs2", "seqs64", "other"}
    for r in table.values():
        assert r["status"] == "ok", r
        assert r["rows"] == 24 and r["error_rows"] == 0
        assert r["startup_s"] > 0 and r["engine_s"] > 0
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
        assert r["expected_rows"] == 60 and r["expected_gpu_s"] > 0
        assert r["usd_per_1m_tokens"] > 0 and r["gpu_s_per_1m_tokens"] > 0
    assert decision["metric"] == "usd_per_1m_tokens" and decision["device"] == "cpu"
    # the quality guard: agreement with the reference (the first candidate) on the pilot rows
    assert decision["reference"] == "seqs2"
    assert table["seqs2"]["agreement"] == 1.0 and table["seqs2"]["agreement_rows"] == 24
    assert table["seqs64"]["identical_share"] == 1.0 and table["seqs64"]["agreement"] == 1.0
    assert table["other"]["identical_share"] < 0.5 and table["other"]["agreement"] < 0.5
    assert table["other"]["excluded"].startswith("agreement 0.")
    assert not table["seqs64"].get("excluded")
    chosen = decision["chosen"]
    assert chosen in ("seqs2", "seqs64")
    eligible = [r["usd_per_1m_tokens"] for r in table.values() if not r.get("excluded")]
    assert table[chosen]["usd_per_1m_tokens"] == min(eligible)
    assert f"pilot: chose {chosen!r}" in text and "ruled out by pilot.min_agreement: other" in text
    assert "job CPU-s" in text and "GPU-s" not in text  # the table names what it measured
    assert f"engine: {chosen!r} chosen by pilot" in result.output

    # the job: every input row exactly once; the pilot's own outputs stay out of sight
    t = pds.dataset(str(out), format="parquet").to_table()
    assert sorted(t.column("id").to_pylist()) == sorted(ids)
    assert t.column("error").null_count == t.num_rows
    manifest = [json.loads(x) for x in (out / "_manifest.jsonl").read_text().splitlines()]
    assert {m["fingerprint"] for m in manifest} == {decision["chosen_fingerprint"]}
    # every shard says which configuration produced it
    assert {m["engine_config"] for m in manifest} == {chosen}
    assert {m["engine_digest"] for m in manifest} == {decision["chosen_engine_digest"]}

    summary = json.loads(summary_path.read_text())
    assert summary["engine_chosen"] == chosen
    assert summary["pilot"]["chosen"] == chosen and summary["rows"] == 60

    shown = runner.invoke(app, ["manifest", str(out)])
    assert shown.exit_code == 0, cli_text(shown)
    assert "engine chosen by pilot" in shown.output and f"chose {chosen!r}" in shown.output
    assert f"shards by engine configuration: {chosen} 2" in shown.output
    reported = runner.invoke(app, ["report", str(out)])
    assert reported.exit_code == 0, cli_text(reported)
    page = (out / "_report.html").read_text()
    assert "<h2>Pilot: candidates</h2>" in page and "seqs2 (reference)" in page
    assert "Projected " in page and "run(s) measured" in page
    assert f"Shards by engine configuration: {chosen}: 2" in page

    # a rerun on the same output reuses the recorded decision: no pilot, nothing to run
    again = runner.invoke(app, ["run", str(path)])
    text = cli_text(again)
    assert again.exit_code == 0, text[-4000:]
    assert "pilot: reusing the decision" in text
    assert "shards: 0 run, 2 skipped" in again.output
    assert f"engine: {chosen!r} chosen by pilot (recorded pilot decision reused" in again.output
