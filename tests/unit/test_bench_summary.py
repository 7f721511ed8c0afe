"""`bench/bench.py summary`: ratios to raw across invocations, from their result files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(mode: str, wall: float, start: float) -> dict:
    return {"mode": mode, "wall_s": wall, "startup_s": start, "workload": "longtail", "n": 10}


def write(tmp_path: Path, name: str, results: list[dict]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def test_each_run_against_its_own_invocations_raw(bench, tmp_path, capsys):
    a = write(tmp_path, "a.json", [run("raw", 100.0, 40.0), run("batchjobs_head", 125.0, 50.0)])
    b = write(tmp_path, "b.json", [run("batchjobs_head", 90.0, 30.0), run("raw", 120.0, 60.0)])
    out = bench.summarize([a, b], "batchjobs_head")

    first, second = out["rows"]
    assert (first["first"], second["first"]) == ("raw", "batchjobs_head")
    assert first["e2e"] == pytest.approx(100 / 125)
    assert first["ex_start"] == pytest.approx(60 / 75)
    assert second["e2e"] == pytest.approx(120 / 90)
    assert second["ex_start"] == pytest.approx(60 / 60)
    assert out["geomean_e2e"] == pytest.approx(math.sqrt(0.8 * 120 / 90))
    assert out["summed_wall_ratio"] == pytest.approx(220 / 215)
    assert out["mean_start_diff_s"] == pytest.approx(((50 - 40) + (30 - 60)) / 2)
    assert (out["min_e2e"], out["max_e2e"]) == (pytest.approx(0.8), pytest.approx(120 / 90))
    assert "over 2 runs" in capsys.readouterr().out


def test_several_raw_runs_average_and_every_mode_run_counts(bench, tmp_path):
    # The CPU series: raw, batchjobs, raw, batchjobs in one invocation.
    f = write(
        tmp_path,
        "cpu.json",
        [
            run("raw", 80.0, 50.0),
            run("batchjobs", 85.0, 50.0),
            run("raw", 84.0, 50.0),
            run("batchjobs", 90.0, 52.0),
            run("batchjobs:other", 1.0, 0.5),
        ],
    )
    rows = bench.summarize([f], "batchjobs")["rows"]
    assert len(rows) == 2
    assert rows[0]["raw_wall_s"] == pytest.approx(82.0)
    assert rows[0]["ex_start"] == pytest.approx(32 / 35)
    assert rows[1]["ex_start"] == pytest.approx(32 / 38)


def test_files_without_a_pair_are_left_out_and_none_at_all_is_an_error(bench, tmp_path, capsys):
    pair = write(tmp_path, "pair.json", [run("raw", 100.0, 40.0), run("batchjobs", 100.0, 40.0)])
    lone = write(tmp_path, "lone.json", [run("raydata", 200.0, 0.0)])
    assert bench.summarize([pair, lone], "batchjobs")["runs"] == 1
    assert "lone.json: no raw run and batchjobs run to compare" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no batchjobs run with a raw run beside it"):
        bench.summarize([lone], "batchjobs")


def test_table_shows_the_engines_busy_share(bench, capsys):
    """The run table's `eng busy`: batchjobs' replicas' time with work after start-up over
    all replicas (from the run summary), where a CPU run has no GPU to sample; raw has none."""

    def counted(mode, replicas=None):
        r = run(mode, 100.0, 40.0) | {"rows": 10, "completion_tokens": 100, "prompt_tokens": 50}
        return r | ({"replicas": replicas} if replicas else {})

    results = [
        counted("raw"),
        counted(
            "batchjobs",
            {"a": {"busy_s": 50.0, "idle_s": 0.0}, "b": {"busy_s": 30.0, "idle_s": 20.0}},
        ),
    ]
    bench.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    assert "eng busy" in lines[0]
    assert results[1]["engine_busy_share"] == pytest.approx(0.8)
    assert "0.800" in lines[2]
    assert results[0]["engine_busy_share"] is None
