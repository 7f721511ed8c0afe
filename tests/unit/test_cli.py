"""The batchjobs command (typer), driven in-process with CliRunner: no Ray, no engine."""

from __future__ import annotations

import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_text import cli_text
from typer.testing import CliRunner

from batchjobs import cli, cli_print
from batchjobs.cli import app
from batchjobs.cost import Weights
from batchjobs.layout import MANIFEST
from batchjobs.manifest import COMMITTED, Manifest, ShardRecord
from batchjobs.readers import list_shards, read_shard
from batchjobs.sink import OutputRoot
from batchjobs.spec import load_spec
from batchjobs.tasks import task_for

runner = CliRunner()


@pytest.fixture
def good_spec(spec_dict, tmp_path, write_yaml, write_jsonl):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": "hi", "id": 1}, {"prompt": "yo", "id": 2}])
    spec_dict["input"]["id_column"] = "id"
    return write_yaml(spec_dict)


@pytest.fixture
def engine_installed(monkeypatch):
    """validate also checks that vLLM is importable; pretend it is, whatever this venv holds."""
    monkeypatch.setattr(cli, "_check_engine_installed", lambda kind: None)


def test_validate_bad_spec_exits_2_with_key_path(spec_dict, write_yaml):
    spec_dict["engine"]["tensor_parallel_sise"] = 2
    path = write_yaml(spec_dict)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, cli_text(result)
    text = cli_text(result)
    assert "error:" in text
    assert "engine.tensor_parallel_sise: unknown key" in text
    assert "did you mean 'tensor_parallel_size'?" in text
    assert "Traceback" not in text


def test_validate_good_spec_exits_0(good_spec, engine_installed):
    result = runner.invoke(app, ["validate", str(good_spec)])
    assert result.exit_code == 0, cli_text(result)
    assert result.output.startswith("ok: unit-job: 1 shard(s), engine vllm ")
    assert "fingerprint " in result.output


def test_validate_applies_set_overrides(good_spec, engine_installed):
    result = runner.invoke(app, ["validate", str(good_spec), "--set", "resources.replicas=0"])
    assert result.exit_code == 2
    assert "resources.replicas: input should be greater than or equal to 1" in cli_text(result)
    ok = runner.invoke(app, ["validate", str(good_spec), "-s", "resources.replicas=2"])
    assert ok.exit_code == 0, cli_text(ok)


def test_validate_malformed_set_exits_2(good_spec, engine_installed):
    result = runner.invoke(app, ["validate", str(good_spec), "--set", "noequals"])
    assert result.exit_code == 2
    assert "expected KEY=VALUE" in cli_text(result)


def test_validate_missing_input_exits_3(spec_dict, tmp_path, write_yaml, engine_installed):
    spec_dict["input"]["path"] = str(tmp_path / "nowhere")
    path = write_yaml(spec_dict)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 3
    assert f"input.path {str(tmp_path / 'nowhere')!r} does not exist" in cli_text(result)


def test_validate_missing_prompt_column_exits_3(
    spec_dict, tmp_path, write_yaml, write_jsonl, engine_installed
):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"question": "hi"}])
    path = write_yaml(spec_dict)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 3
    text = cli_text(result)
    assert "line 1: no column 'prompt' (columns: question)" in text
    assert "set input.prompt_column" in text


def test_validate_without_vllm_exits_4(good_spec, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "vllm" else real(name, *a, **k),
    )
    result = runner.invoke(app, ["validate", str(good_spec)])
    assert result.exit_code == 4
    assert "engine.kind 'vllm' needs vLLM: pip install" in cli_text(result)


def test_validate_and_read_agree_on_missing_parquet_sampling_column(
    spec_dict, tmp_path, write_yaml, engine_installed
):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "in" / "a.parquet")
    spec_dict["input"] = {"path": str(tmp_path / "in"), "sampling_columns": {"max_tokens": "mt"}}
    path = write_yaml(spec_dict)
    result = runner.invoke(app, ["validate", str(path)])
    if result.exit_code != 0:  # refusing up front is one acceptable fix
        assert result.exit_code == 3
        assert "'mt'" in cli_text(result)
        return
    # validate said ok: then reading the shard must work too
    (shard,) = list_shards(str(tmp_path / "in"))
    cols = task_for(load_spec(path)).input_columns()
    assert sum(t.num_rows for t in read_shard(shard, cols)) == 2


def test_manifest_without_manifest_exits_1(tmp_path):
    result = runner.invoke(app, ["manifest", str(tmp_path)])
    assert result.exit_code == 1
    assert f"no manifest records under {tmp_path}" in cli_text(result)


def test_manifest_corrupt_exits_5(tmp_path):
    (tmp_path / MANIFEST).write_text("{oops\n")
    result = runner.invoke(app, ["manifest", str(tmp_path)])
    assert result.exit_code == 5
    assert "line 1 is not a shard record" in cli_text(result)


def test_manifest_prints_records(tmp_path):
    m = Manifest(OutputRoot(str(tmp_path)))
    rec = ShardRecord(
        shard_id="shard-one",
        source="file:///x",
        status=COMMITTED,
        rows=12,
        error_rows=1,
        prompt_tokens=1000,
        completion_tokens=3000,
    )
    rec.finalise(Weights(0.001, 0.003, "fit"), 2, 3.6)
    m.records[rec.shard_id] = rec
    m.save()
    assert json.loads((tmp_path / MANIFEST).read_text())["rows"] == 12
    result = runner.invoke(app, ["manifest", str(tmp_path)])
    assert result.exit_code == 0, cli_text(result)
    out = result.output
    assert "shard-one" in out
    assert "committed" in out
    assert "$0.02" in out  # cost_usd
    assert "$5.00" in out  # $ per 1M tokens


def test_no_args_shows_help():
    result = runner.invoke(app, [])
    assert "validate" in cli_text(result)
    assert "manifest" in cli_text(result)


def test_replica_line_says_how_much_of_the_time_the_engines_had_work():
    """The run summary's replica line: start-up, the engines' share of time with work after
    start-up (over all replicas), and the mean in-flight requests."""
    reps = {
        "a": {
            "startup_s": 30.0,
            "busy_s": 90.0,
            "idle_s": 10.0,
            "mean_inflight": 100.0,
            "inflight_limit": 512,
        },
        "b": {
            "startup_s": 40.0,
            "busy_s": 60.0,
            "idle_s": 40.0,
            "mean_inflight": 50.0,
            "inflight_limit": 512,
        },
    }
    line = cli_print._replica_line(reps)
    assert line.startswith(
        "replicas: 2, ready after 40.0s; engines had work 75% of the time after start-up; "
    )
    assert "75 requests in each engine on average (cap 512)" in line
    # A replica that never got a row has no share to show, rather than a made-up 0 % or 100 %.
    idle = {"a": {"startup_s": 5.0, "busy_s": 0.0, "idle_s": 0.0, "inflight_limit": 0}}
    assert "had work" not in cli_print._replica_line(idle)


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], prog_name="batchjobs")
    assert result.exit_code == 0, cli_text(result)
    return cli_text(result)


def _option_rows(text: str) -> dict[str, list[str]]:
    """Each option row of a help screen (box drawing removed): first word -> the words after it."""
    rows = {}
    for line in text.splitlines():
        words = line.replace("│", " ").replace("|", " ").split()
        if words and words[0].startswith("--"):
            rows[words[0]] = words[1:]
    return rows


@pytest.mark.parametrize(
    "command", [[], ["validate"], ["run"], ["manifest"], ["make-model"], ["schema"]]
)
def test_help_shows_flags_without_a_value_placeholder(command):
    """A flag's row goes straight to its help text: no `<bool>` or `--no-fresh`, which read as
    if the flag took a value (typer 0.27+ prints them; pyproject.toml keeps it below)."""
    text = _help(*command)
    rows = _option_rows(text)
    assert rows["--help"][:2] == ["Show", "this"], text
    assert "<bool>" not in text
    assert "--no-" not in text


def test_run_help_reads_as_usage_with_value_types_only_where_values_go():
    text = _help("run")
    assert "Usage: batchjobs run [OPTIONS] SPEC" in text
    assert "{spec}" not in text
    rows = _option_rows(text)
    assert rows["--fresh"][0] == "Delete", text
    assert rows["--quiet"][:2] == ["-q", "No"], text
    assert rows["--set"][:2] == ["-s", "TEXT"], text  # options that take a value name its type
    assert rows["--summary-json"][0] == "PATH", text


def test_validate_help_names_the_spec_argument():
    text = _help("validate")
    assert "Usage: batchjobs validate [OPTIONS] SPEC" in text
    assert "The job spec, a YAML file." in text
