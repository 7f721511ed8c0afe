"""`engine: auto` on CPU: a pilot of two real vLLM configurations of the tiny model, then the job
with the cheaper one. Starts three engines (two pilots, one job); the rerun starts none."""

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


def test_cli_pilot_two_vllm_configs_picks_cheapest_and_reuses_it(tmp_path, tiny_model, ray_session):
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
        "candidates": [
            {"name": "seqs2", "max_num_seqs": 2},
            {"name": "seqs64", "max_num_seqs": 64, "env": {"PILOT_SECRET": "hunter2-value"}},
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
    assert set(table) == {"seqs2", "seqs64"}
    for r in table.values():
        assert r["status"] == "ok", r
        assert r["rows"] == 24 and r["error_rows"] == 0
        assert r["startup_s"] > 0 and r["engine_s"] > 0
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
        assert r["expected_rows"] == 60 and r["expected_gpu_s"] > 0
        assert r["usd_per_1m_tokens"] > 0 and r["gpu_s_per_1m_tokens"] > 0
    assert decision["metric"] == "usd_per_1m_tokens"
    chosen = decision["chosen"]
    assert table[chosen]["usd_per_1m_tokens"] == min(r["usd_per_1m_tokens"] for r in table.values())
    assert f"pilot: chose {chosen!r}" in text
    assert f"engine: {chosen!r} chosen by pilot" in result.output

    # the job: every input row exactly once; the pilot's own outputs stay out of sight
    t = pds.dataset(str(out), format="parquet").to_table()
    assert sorted(t.column("id").to_pylist()) == sorted(ids)
    assert t.column("error").null_count == t.num_rows
    manifest = [json.loads(x) for x in (out / "_manifest.jsonl").read_text().splitlines()]
    assert {m["fingerprint"] for m in manifest} == {decision["chosen_fingerprint"]}

    summary = json.loads(summary_path.read_text())
    assert summary["engine_chosen"] == chosen
    assert summary["pilot"]["chosen"] == chosen and summary["rows"] == 60

    shown = runner.invoke(app, ["manifest", str(out)])
    assert shown.exit_code == 0, cli_text(shown)
    assert "engine chosen by pilot" in shown.output and f"chose {chosen!r}" in shown.output

    # a rerun on the same output reuses the recorded decision: no pilot, nothing to run
    again = runner.invoke(app, ["run", str(path)])
    text = cli_text(again)
    assert again.exit_code == 0, text[-4000:]
    assert "pilot: reusing the decision" in text
    assert "shards: 0 run, 2 skipped" in again.output
    assert f"engine: {chosen!r} chosen by pilot (recorded pilot decision reused" in again.output
