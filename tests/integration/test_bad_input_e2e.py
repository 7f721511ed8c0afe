"""One generate job over the whole bad-input corpus (tests/data/bad/generate, plus a 10 MB
prompt and a shard deleted between planning and reading), on a real local Ray and the real
vLLM CPU engine: every readable row comes out once, as a result or an error row naming its
file, line or row and column; each unreadable shard fails alone; the run exits 3 naming
them. Rerun without the broken shards: nothing runs, and output.max_error_rate makes it
exit 7 from the CLI, with the summary and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pds
import pytest
import yaml
from bad_corpus import ROWS as CORPUS_ROWS
from bad_corpus import UNREADABLE
from conftest import REPO, spec_dict

pytestmark = pytest.mark.integration

CORPUS = REPO / "tests" / "data" / "bad" / "generate"
FAILING = {**UNREADABLE, "deleted.jsonl": "file vanished after planning"}
ROWS = {**CORPUS_ROWS, "huge.jsonl": 2}  # the corpus's and the 10 MB prompt's file
# id -> (file, place, what the error says); a generated id is "<shard>:<row_index>"
ERRORS = {
    "n-1": ("nulls.jsonl", "line 1", "'prompt' is null"),
    "n-2": ("nulls.jsonl", "line 2", "'prompt' is empty"),
    "n-3": ("nulls.jsonl", "line 3", "'prompt' is empty"),
    "n-4": ("nulls.jsonl", "line 4", "no column 'prompt'"),
    "n-5": ("nulls.jsonl", "line 5", "'prompt' is list, expected string"),
    "n-7": ("nulls.jsonl", "line 7", "'prompt' holds a lone surrogate"),
    "pn-1": ("nulls.parquet", "row 1", "'prompt' is null"),
    "pn-2": ("nulls.parquet", "row 2", "'prompt' is empty"),
    "pn-3": ("nulls.parquet", "row 3", "'prompt' is empty"),
    "w-7": ("weird.jsonl", "line 7", "'prompt' is float, expected string"),
    "t-1": ("too_long.jsonl", "line 1", "'prompt' has 601 tokens; engine.max_model_len is 256"),
    "h-1": ("huge.jsonl", "line 1", "more than engine.max_model_len 256 tokens can hold"),
    "s-2": ("sampling.jsonl", "line 2", "column 'budget' (sampling.max_tokens) is -1"),
    "s-3": ("sampling.jsonl", "line 3", "column 'budget' (sampling.max_tokens) is 0"),
    "s-4": ("sampling.jsonl", "line 4", "column 'budget' (sampling.max_tokens) is 'ten'"),
    "s-6": ("sampling.jsonl", "line 6", "column 'temp' (sampling.temperature) is -2"),
    "s-7": ("sampling.jsonl", "line 7", "column 'temp' (sampling.temperature) is 'hot'"),
    "s-8": ("sampling.jsonl", "line 8", "column 'budget' (sampling.max_tokens) is [1, 2]"),
}
UNNAMED = {  # rows whose id could not be read: (file, row_index) -> (place, error)
    ("malformed.jsonl", 2): ("line 3", "not valid JSON"),
    ("latin1.jsonl", 1): ("line 2", "not UTF-8 (byte 28)"),
    ("nulls.jsonl", 5): ("line 6", "id column 'id' is null or missing"),
    ("weird.jsonl", 0): ("line 1", "expected a JSON object, got list"),
    ("weird.jsonl", 1): ("line 2", "expected a JSON object, got str"),
    ("weird.jsonl", 2): ("line 3", "expected a JSON object, got NoneType"),
    ("weird.jsonl", 3): ("line 4", "not valid JSON (nested too deeply)"),
    ("weird.jsonl", 5): ("line 6", "not valid JSON (Unexpected UTF-8 BOM"),
    ("weird.jsonl", 7): ("line 8", "not valid JSON (Exceeds the limit (4300 digits)"),
    ("weird.jsonl", 8): ("line 9", "id column 'id' holds an object; an id is a string or"),
}
OK = ["g-0", "g-1", "g-2", "g-3", "m-1", "m-2", "m-4", "m-6", "l-1", "l-3", "n-8", "w-5"]
OK += ["t-2", "s-1", "s-5", "o-1", "pn-0", "h-2"]


def _spec(model: Path, inp: Path, out: Path, **over) -> dict:
    return spec_dict(
        model,
        str(inp),
        str(out),
        input={
            "id_column": "id",
            "sampling_columns": {"max_tokens": "budget", "temperature": "temp"},
        },
        output={"max_error_rate": 0.1},
        sampling={"max_tokens": 4, "temperature": 0.0},
        resources={"batch_size": 16},
        **over,
    )


def test_one_job_over_the_bad_corpus(tmp_path, tiny_model, ray_session, monkeypatch):
    from batchjobs import pipeline
    from batchjobs.errors import ShardsFailedError
    from batchjobs.spec import parse_spec

    inp, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(CORPUS, inp)
    ten_mb = "token " * ((10 << 20) // 6)
    with open(inp / "huge.jsonl", "w") as fh:  # a 10 MB prompt, made here, not committed
        fh.write(json.dumps({"id": "h-1", "prompt": ten_mb}) + "\n")
        fh.write(json.dumps({"id": "h-2", "prompt": "a small one after it"}) + "\n")
    (inp / "deleted.jsonl").write_text(json.dumps({"id": "d-1", "prompt": "gone"}) + "\n")
    raw = _spec(tiny_model, inp, out)
    spec = parse_spec(raw)

    real_plan = pipeline.plan_job

    def plan_then_delete(*args, **kwargs):  # the shard goes between planning and reading
        plan = real_plan(*args, **kwargs)
        (inp / "deleted.jsonl").unlink()
        return plan

    monkeypatch.setattr(pipeline, "plan_job", plan_then_delete)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardsFailedError) as info:
        pipeline.run(spec)
    assert info.value.exit_code == 3
    message = str(info.value)
    assert message.startswith("6 input shard(s) could not be read")
    for name, why in FAILING.items():
        line = next(x for x in message.splitlines() if name in x)
        assert f"file://{inp}/{name}" in line and why in line, line
    assert "Traceback" not in message and "ray" not in message.lower()
    assert "also: 28 of 49 rows (57.1%) are error rows, above output.max_error_rate 0.1" in message
    summary = info.value.summary
    assert len(summary.failed_shards) == 6 and summary.rows == 49 and summary.error_rows == 28

    # every row of every readable shard exactly once; nothing of the failed ones
    table = pds.dataset(str(out), format="parquet").to_table()
    rows = table.to_pylist()
    manifest = [json.loads(x) for x in (out / "_manifest.jsonl").read_text().splitlines()]
    by_shard = {Path(m["source"]).name: m for m in manifest}
    assert set(by_shard) == set(ROWS)
    for name, n in ROWS.items():
        assert by_shard[name]["rows"] == n and by_shard[name]["status"] == "committed", name
    sid = {name: m["shard_id"] for name, m in by_shard.items()}
    assert sorted((r["shard_id"], r["row_index"]) for r in rows) == sorted(
        (sid[name], i) for name, n in ROWS.items() for i in range(n)
    )
    assert not (out / "_staging").exists()
    assert not any(
        p.name.startswith(("truncated", "no_prompt", "prompt_", "deleted")) for p in out.iterdir()
    )

    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    # duplicate ids are kept: each row is run and written, told apart by shard and row_index
    dups = by_id["dup-1"]
    assert len(dups) == 3 and len({(r["shard_id"], r["row_index"]) for r in dups}) == 3
    for key in OK:
        (r,) = by_id[key]
        assert r["error"] is None and r["finish_reason"] in ("stop", "length"), (key, r["error"])
        assert 1 <= r["completion_tokens"] <= 4
    assert by_id["s-1"][0]["completion_tokens"] <= 3  # a row's own max_tokens
    assert by_id["s-5"][0]["completion_tokens"] <= 2  # 2.0 tokens, read as 2
    for key, (name, place, why) in ERRORS.items():
        (r,) = by_id[key]
        assert r["finish_reason"] == "error", key
        assert r["error"].startswith(f"file://{inp}/{name} {place}: "), (key, r["error"])
        assert why in r["error"], (key, r["error"])
    for (name, index), (place, why) in UNNAMED.items():
        (r,) = by_id[f"{sid[name]}:{index}"]
        assert r["error"].startswith(f"file://{inp}/{name} {place}: ") and why in r["error"], r
    errors = [r for r in rows if r["error"] is not None]
    assert len(errors) == 28
    assert all("Traceback" not in r["error"] for r in errors)
    # the odd file name is read as data, never as a command
    assert by_id["o-1"][0]["shard_id"].startswith("odd_name_quoted_touch_pwned_")
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()
    run_record = json.loads((out / "_runs.jsonl").read_text().splitlines()[-1])
    assert run_record["exit_code"] == 3 and len(run_record["failed_shards"]) == 6

    # Rerun without the broken shards, through the CLI: every shard left is committed, so
    # nothing runs (no engine), and too many error rows exit 7, after the summary.
    for name in FAILING:
        (inp / name).unlink(missing_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    cmd = [sys.executable, "-m", "batchjobs.cli", "run", str(path), "--skip-report"]
    cmd += ["--summary-json", str(tmp_path / "summary.json")]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7, proc.stderr[-3000:]
    assert "shards: 0 run, 13 skipped" in proc.stdout
    assert (
        "error: 28 of 49 rows (57.1%) are error rows, above output.max_error_rate 0.1"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    written = json.loads((tmp_path / "summary.json").read_text())  # for schedulers too
    assert (written["rows"], written["error_rows"]) == (0, 0)  # this run ran nothing
    proc = subprocess.run(
        [*cmd, "--set", "output.max_error_rate=0.6"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
