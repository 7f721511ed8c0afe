"""The report from a made-up output root: two runs (one failed, then a resume), progress
samples, an embed job's vectors, _eval.json and _pilot.json. A real CPU run's output is
reported in tests/integration/test_e2e.py."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_checks import check_page

from batchjobs.cost import Weights
from batchjobs.layout import EVAL_JSON, PILOT_JSON, PROGRESS, REPORT, RUNS, stamped
from batchjobs.manifest import COMMITTED, Manifest, ShardRecord
from batchjobs.report import load, read_runs, write_report
from batchjobs.sink import OutputRoot

SECRET = "hunter2-very-secret"


def _root(tmp_path, task="generate"):
    root = tmp_path / "out"
    out = OutputRoot(str(root))
    m = Manifest(out)
    for i in range(3):
        sid = f"part-{i}.jsonl-abc{i}"
        (root / sid).mkdir(parents=True)
        n = 50
        cols = {
            "row_id": [f"{sid}:{j}" for j in range(n)],
            "shard_id": [sid] * n,
            "row_index": list(range(n)),
            "prompt_tokens": [10 + j for j in range(n)],
            "latency_s": [0.1 * (1 + j % 7) for j in range(n)],
            "error": [
                f"file:///in/{i}.jsonl line {j}: 'prompt' is empty" if j < 2 else None
                for j in range(n)
            ],
        }
        if task == "embed":
            vecs = [[0.6, 0.8] if j >= 2 else None for j in range(n)]
            cols["embedding"] = pa.array(vecs, pa.list_(pa.float32(), 2))
        else:
            cols["completion_tokens"] = [j % 16 for j in range(n)]
        pq.write_table(pa.table(cols), root / sid / "x.parquet")
        rec = ShardRecord(
            shard_id=sid,
            source=f"file:///in/{i}.jsonl",
            status=COMMITTED,
            rows=n,
            error_rows=2,
            prompt_tokens=1000 + i,
            completion_tokens=400 * (i + 1),
            files=[f"/elsewhere/out/{sid}/x.parquet"],  # where the root was written first
            engine="vllm 0.24.0",
            model="/models/m",
        )
        rec.finalise(Weights(1e-4, 2e-3, "fit"), 1, 3.0)
        m.records[sid] = rec
    m.save()
    spec = {
        "name": "nightly",
        "task": task,
        "input": {"path": "s3://b/in/", "storage_options": {"key": "***"}},
        "engine": {"model": "/models/m", "env": {"HF_TOKEN": "***"}},
    }
    base = {"name": "nightly", "task": task, "device": "cpu", "spec": spec, "shards": 3}
    runs = [
        {
            **base,
            "started_at": 1000.0,
            "ended_at": 1100.0,
            "wall_s": 100.0,
            "status": "failed",
            "exit_code": 4,
            "reason": "engine replica died",
            "rows": 50,
            "gpu_s": 90.0,
            "overhead_s": 40.0,
            "cost_usd": 0.075,
            "prompt_tokens": 1000,
            "completion_tokens": 400,
            "replicas": {"h:1:aa": {"busy_share": 0.6, "mean_inflight": 30, "startup_s": 35.0}},
        },
        {
            **base,
            "started_at": 5000.0,
            "ended_at": 5120.0,
            "wall_s": 120.0,
            "status": "succeeded",
            "exit_code": 0,
            "reason": None,
            "rows": 100,
            "shards_run": 2,
            "shards_skipped": 1,
            "gpu_s": 110.0,
            "overhead_s": 40.0,
            "cost_usd": 0.092,
            "prompt_tokens": 2003,
            "completion_tokens": 2000,
            "replicas": {
                "h:2:bb": {"busy_share": 0.97, "mean_inflight": 60, "startup_s": 30.0},
                "h:3:cc": {"busy_share": 0.93, "mean_inflight": 55, "startup_s": 31.0},
            },
        },
    ]
    (root / RUNS).write_text("".join(json.dumps(stamped(RUNS, r)) + "\n" for r in runs))
    samples = []
    for run, t0, n in ((1000.0, 1000.0, 6), (5000.0, 5000.0, 8)):
        for k in range(1, n + 1):
            samples.append(
                stamped(
                    PROGRESS,
                    {
                        "run": run,
                        "t": t0 + 30 + 10 * k,
                        "elapsed_s": 30 + 10 * k,
                        "rows": 10 * k,
                        "rows_total": 100.0,
                        "error_rows": k // 2,
                        "prompt_tokens": 200 * k,
                        "completion_tokens": 300 * k,
                        "shards_committed": k // 4,
                        "shards_total": 3,
                        "usd": 0.03 + 0.005 * k,
                        "usd_projected": 0.09,
                        "device_s": 40 + 6 * k,
                        "device": "cpu",
                        "replicas": {},
                        "errors": {},
                    },
                )
            )
    (root / PROGRESS).write_text("".join(json.dumps(s) + "\n" for s in samples))
    return root


def test_report_of_a_resumed_generate_job(tmp_path):
    root = _root(tmp_path)
    where = write_report(str(root))
    assert where == f"{root}/{REPORT}"
    page = (root / REPORT).read_text()
    parsed = check_page(page, secrets=[SECRET])
    assert parsed.headings[:2] == ["Runs", "Throughput over time"]
    for heading in (
        "Cumulative cost",
        "$ per 1M tokens per shard",
        "Latency and length",
        "Errors",
        "Replicas",
        "Spec",
    ):
        assert heading in parsed.headings
    assert "Embedding norms" not in parsed.headings and "Eval accuracy" not in parsed.headings
    assert "failed (exit 4)" in page and "engine replica died" in page  # runs marked
    assert "CPU-s" in page and "GPU-s" not in page
    assert "$0.167" in page  # cost over both runs
    assert "HF_TOKEN: &#x27;***&#x27;" in page or "HF_TOKEN: '***'" in page
    # error kinds from the output rows, file and line left out
    assert "&#x27;prompt&#x27; is empty" in page
    # the output files are found under the root, not where the manifest says they were
    assert "from 150 of 150 output rows read" in page


def test_report_of_an_embed_eval_job_with_a_pilot(tmp_path):
    root = _root(tmp_path, task="embed")
    ev = {
        "rows": 150,
        "error_rows": 6,
        "group_by": "subject",
        "metrics": {"exact": {"accuracy": 0.7, "ci95": [0.62, 0.77]}},
        "groups": {
            "math": {"metrics": {"exact": {"accuracy": 0.5, "ci95": [0.38, 0.62]}}},
            "history": {"metrics": {"exact": {"accuracy": 0.9, "ci95": [0.8, 0.95]}}},
        },
    }
    (root / EVAL_JSON).write_text(json.dumps(stamped(EVAL_JSON, ev)))
    pilot = {
        "pilot_rows": 200,
        "expected_rows": 10000,
        "replicas": 2,
        "metric": "usd_per_1m_tokens",
        "chosen": "fp8",
        "reason": "cheapest",
        "candidates": [
            {"name": "bf16", "status": "ok", "usd_per_1m_tokens": 0.31},
            {"name": "fp8", "status": "ok", "usd_per_1m_tokens": 0.22},
            {"name": "trt", "status": "not installed"},
        ],
    }
    (root / PILOT_JSON).write_text(json.dumps(stamped(PILOT_JSON, pilot)))
    write_report(str(root))
    page = (root / REPORT).read_text()
    parsed = check_page(page)
    for heading in ("Embedding norms", "Eval accuracy", "Pilot: engine candidates"):
        assert heading in parsed.headings
    data = load(OutputRoot(str(root)))
    assert data.vectors and all(v == pytest.approx(1.0) for v in data.vectors)  # |(0.6, 0.8)|


def test_report_of_a_copied_root_and_of_no_root(tmp_path):
    root = _root(tmp_path)
    copy = tmp_path / "laptop" / "out"
    shutil.copytree(root, copy)
    shutil.rmtree(root)  # the original is gone: the report reads only the copy
    write_report(str(copy))
    check_page((copy / REPORT).read_text())
    assert len(read_runs(OutputRoot(str(copy)))) == 2
    from batchjobs.errors import OutputError

    with pytest.raises(OutputError, match="no manifest and no run records"):
        write_report(str(tmp_path / "empty"))


def test_report_hides_secrets_the_spec_recorded(tmp_path, make_spec):
    """The run record's spec (secrets.public_spec) keeps no storage option or env value."""
    from batchjobs.secrets import public_spec

    spec = make_spec(
        input={"storage_options": {"secret": SECRET}},
        engine={"env": {"HF_TOKEN": SECRET}, "args": {"note": f"x{SECRET}y"}},
    )
    public = json.dumps(public_spec(spec))
    assert SECRET not in public and "***" in public
