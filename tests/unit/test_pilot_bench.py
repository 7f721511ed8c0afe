"""`bench/pilot_gpu.py`: the GPU candidates as specs, the workload's output lengths, and the
table's two ratios (default over picked; the picked projection's error)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pilot_gpu.py"


@pytest.fixture(scope="module")
def pb():
    spec = importlib.util.spec_from_file_location("pilot_gpu_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path[:] = [p for p in sys.path if p != str(BENCH.parent)]


def test_gpu_candidates_parse_as_a_pilot_section(pb, tmp_path):
    from batchjobs.pilot import apply_candidate
    from batchjobs.spec import parse_spec

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    a = pb.argparse.Namespace(
        workdir=str(tmp_path), model=str(model), max_model_len=2048, engine_args="{}",
        resources='{"replicas": 1}', price=2.0, pilot_rows=600, min_agreement=None,
        candidates="gpu", load_format="dummy",
    )  # fmt: skip
    spec = parse_spec(pb.job_spec(a, data), offline=True)
    cands = {c.name: c for c in spec.pilot.candidates}
    assert list(cands) == ["bf16", "fp8", "kv-fp8", "fp8-kv-fp8", "seqs-2048", "trtllm"]
    assert spec.pilot.reference().name == "bf16"
    both = apply_candidate(spec, cands["fp8-kv-fp8"]).engine.args
    assert both == {"load_format": "dummy", "quantization": "fp8", "kv_cache_dtype": "fp8"}
    assert apply_candidate(spec, cands["seqs-2048"]).engine.max_num_seqs == 2048
    trt = apply_candidate(spec, cands["trtllm"]).engine
    assert trt.kind == "trtllm" and "load_format" not in trt.args


def test_tail_scale_gives_a_mean_of_about_128_output_tokens(pb):
    rows = pb.bench.make_rows("longtail", 4000, 10, 64, 0.49)
    assert 120 <= statistics.mean(r["max_tokens"] for r in rows) <= 136
    assert max(r["max_tokens"] for r in rows) == int(1536 * 0.49)


def test_table_ratios(pb):
    report = {
        "chosen": "fp8",
        "reference": "bf16",
        "device": "cuda",
        "candidates": [
            {"name": "bf16", "status": "ok", "usd_per_1m_tokens": 0.40, "agreement": 1.0},
            {"name": "fp8", "status": "ok", "usd_per_1m_tokens": 0.27, "agreement": 0.2},
            {"name": "trtllm", "status": "not installed"},
        ],
    }
    jobs = {
        "baseline": {"usd_per_1m_tokens": 0.42, "tokens_per_device_s": 1000.0},
        "picked": {"usd_per_1m_tokens": 0.30, "tokens_per_device_s": 1400.0},
    }
    lines, ratios = pb.table(report, jobs, "usd_per_1m_tokens")
    assert ratios["default_over_picked"] == pytest.approx(1.4)
    assert ratios["projection_error_picked"] == pytest.approx(0.1)
    assert ratios["projection_error_baseline"] == pytest.approx(0.02 / 0.42)
    text = "\n".join(lines)
    assert "1.400 (goal >= 1.25)" in text and "10.0% (goal <= 10%" in text
    assert "ok *" in text and "not installed" in text
    # the pilot alone (no whole jobs yet): no ratios, the table still prints
    lines, ratios = pb.table(report, {}, "usd_per_1m_tokens")
    assert ratios == {} and len(lines) == 6
