"""End to end with a real local Ray and the real vLLM CPU engine on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, spec_dict, tmp_spec
from report_checks import check_run_outputs

pytestmark = pytest.mark.integration


def _read_output(root: Path) -> pa.Table:
    # pyarrow skips "_staging" and "_manifest.jsonl" (leading underscore) on its own.
    return pds.dataset(str(root), format="parquet").to_table()


def test_cli_jsonl_to_parquet_with_bad_rows_resume_and_refusal(tmp_path, tiny_model, tokenizer):
    """`batchjobs run` on two JSONL shards: every row out exactly once, ids kept, token counts
    right, bad rows become error rows; a rerun skips everything; a changed spec is refused."""
    inp = tmp_path / "in"
    inp.mkdir()
    prompts = {f"a-{i}": f"the model of the night job number {i}" for i in range(12)}
    with open(inp / "a.jsonl", "w") as f:
        for k, p in prompts.items():
            f.write(json.dumps({"id": k, "prompt": p}) + "\n")
    with open(inp / "b.jsonl", "w") as f:
        f.write(json.dumps({"id": "b-ok", "prompt": "explain the price of data"}) + "\n")
        f.write(json.dumps({"id": "b-long", "prompt": "the data " * 400}) + "\n")  # > max_model_len
        f.write(json.dumps({"id": "b-empty", "prompt": ""}) + "\n")
        f.write("{this is not json\n")
        f.write(json.dumps({"id": "b-int", "prompt": 7}) + "\n")
    out = tmp_path / "out"
    secrets = ["sekrit-storage-option-1", "sekrit-engine-env-2"]  # must not be written out
    spec = spec_dict(
        tiny_model,
        str(inp / "*.jsonl"),
        str(out),
        input={"id_column": "id", "storage_options": {"client_kwargs": {"token": secrets[0]}}},
        engine={"env": {"VLLM_CPU_KVCACHE_SPACE": "1", "BATCHJOBS_E2E_SECRET": secrets[1]}},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "batchjobs.cli",
        "run",
        str(path),
        "--summary-json",
        str(tmp_path / "s.json"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: it: 17 rows (4 errors)" in proc.stdout
    assert "requests in each engine on average (cap " in proc.stdout
    assert "engines had work " in proc.stdout
    # what the user reads and what the run leaves: report, samples, log (issue 30)
    check_run_outputs(out, proc.stdout, proc.stderr, secrets, rows=17)

    t = _read_output(out)
    assert t.num_rows == 17
    rows = {r["id"]: r for r in t.to_pylist()}
    # the malformed line has no id: it gets the generated "<shard>:<row>" id
    assert set(prompts) | {"b-ok", "b-long", "b-empty", "b-int"} <= set(rows)
    assert len(rows) == 17
    for k, p in prompts.items():
        r = rows[k]
        assert r["error"] is None and r["finish_reason"] in ("stop", "length")
        assert r["prompt_tokens"] == len(tokenizer(p).input_ids)
        assert 1 <= r["completion_tokens"] <= 8
    # too long for max_model_len: refused before the engine, naming file, line and column
    assert rows["b-long"]["error"].startswith(f"file://{inp}/b.jsonl line 2: 'prompt' has ")
    assert "more than engine.max_model_len 256 tokens can hold" in rows["b-long"]["error"]
    assert "'prompt' is empty" in rows["b-empty"]["error"]
    assert "is int, expected string" in rows["b-int"]["error"]
    bad = [r for r in rows.values() if r["id"].endswith(":3")]
    assert len(bad) == 1 and "line 4: not valid JSON" in bad[0]["error"]

    manifest = [json.loads(line) for line in (out / "_manifest.jsonl").read_text().splitlines()]
    assert sorted(m["rows"] for m in manifest) == [5, 12]
    assert all(m["status"] == "committed" for m in manifest)
    assert sum(m["prompt_tokens"] for m in manifest) == sum(
        r["prompt_tokens"] for r in rows.values()
    )
    assert not (out / "_staging").exists()

    # rerun: both shards are committed for this fingerprint, so nothing runs
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shards: 0 run, 2 skipped" in proc.stdout
    assert _read_output(out).num_rows == 17
    assert "last run of 2" in (out / "_report.html").read_text()  # one job, its runs marked

    # a changed sampling config must not mix with the old results
    proc = subprocess.run(
        cmd + ["--set", "sampling.max_tokens=9"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 5
    assert "--fresh" in proc.stderr and "Traceback" not in proc.stderr


# ~160 tokens shared by every prompt of the Parquet test: more than one 128-token KV block
SHARED = "the city council met on a cold night to talk about the price of data and the river. " * 6


def test_parquet_generated_ids_and_per_row_max_tokens(tmp_path, tiny_model, ray_session):
    """Parquet in without an id column: generated stable ids; per-row max_tokens honoured;
    a prompt longer than the model takes is one error row; the engine's prefix cache serves
    the prompts' shared first block (and the replica says so)."""
    from batchjobs.pipeline import run

    inp = tmp_path / "in"
    inp.mkdir()
    n = 40
    pq.write_table(
        pa.table(
            {
                "prompt": [f"{SHARED}write a story about the city {i}" for i in range(n)]
                + ["word " * 400],  # > max_model_len 256: refused before the engine
                "budget": [None if i % 4 == 0 else 1 + i % 5 for i in range(n)] + [None],
            }
        ),
        inp / "p.parquet",
    )
    out = tmp_path / "out"
    spec = tmp_spec(
        tiny_model,
        tmp_path,
        input={"sampling_columns": {"max_tokens": "budget"}},
        sampling={"max_tokens": 6, "ignore_eos": True},
    )
    summary = run(spec)
    assert (summary.rows, summary.error_rows, summary.shards_run) == (n + 1, 1, 1)
    t = _read_output(out).sort_by("row_index")
    shard_id = t.column("shard_id")[0].as_py()
    assert t.column("row_id").to_pylist() == [f"{shard_id}:{i}" for i in range(n + 1)]
    refused = t.slice(n).to_pylist()[0]
    assert refused["finish_reason"] == "error" and refused["completion_tokens"] == 0
    assert refused["error"].startswith(f"file://{inp}/p.parquet row {n}: 'prompt' has ")
    assert "tokens; engine.max_model_len is 256" in refused["error"]
    t = t.slice(0, n)
    expected = [6 if i % 4 == 0 else 1 + i % 5 for i in range(n)]
    assert t.column("completion_tokens").to_pylist() == expected
    assert summary.completion_tokens == sum(expected)
    # cost bookkeeping: the shard's rows' work is what the replica's rows were charged, and
    # with its under-fill makes the replica's busy time
    (rep,) = summary.replicas.values()
    assert summary.engine_s == pytest.approx(rep["engine_s"], rel=1e-6)
    assert rep["engine_s"] + rep["underfill_s"] == pytest.approx(rep["busy_s"], rel=1e-6)
    assert rep["underfill_s"] >= -1e-9 and summary.cost_weights["method"] in (
        "fit",
        "tokens",
        "busy",
    )
    assert rep["startup_s"] > 0 and rep["idle_s"] >= 0
    # 41 rows went into an engine that admits many more: all were in at once at the start
    assert 1 <= rep["mean_inflight"] <= n + 1 and rep["inflight_limit"] >= n + 1
    # 40 prompts of ~170 tokens exceed one step's 4096-token prefill budget on CPU, so rows
    # scheduled after the first step find the shared 128-token block in the prefix cache.
    assert rep["prompt_tokens"] == summary.prompt_tokens
    assert 0 < rep["cached_tokens"] < rep["prompt_tokens"], rep
    assert rep["prefix_cache_hit"] == pytest.approx(rep["cached_tokens"] / rep["prompt_tokens"])
    # Σ shard seconds + overhead (start-up + idle + under-fill) = what the replica held
    assert summary.overhead_s == pytest.approx(
        rep["startup_s"] + rep["idle_s"] + rep["underfill_s"], rel=1e-6
    )
    assert summary.gpu_s == pytest.approx(summary.engine_s + summary.overhead_s, rel=1e-6)
    assert summary.engine_s > 0 and summary.gpu_s <= summary.wall_s
