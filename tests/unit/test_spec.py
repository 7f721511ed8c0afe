"""The job spec: parsing, error messages, --set overrides, fingerprint, redaction."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from batchjobs.errors import SpecError
from batchjobs.spec import JobSpec, load_spec, parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]


def _spec_error(raw: dict, source: str = "job.yaml") -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, source=source)
    return str(info.value)


# --------------------------------------------------------------------------- valid specs


def test_minimal_spec_parses_with_defaults(spec_dict, model_dir):
    spec = parse_spec(spec_dict)
    assert isinstance(spec, JobSpec)
    assert spec.name == "unit-job"
    assert spec.engine.model == str(model_dir)
    assert spec.engine.kind == "vllm"
    assert spec.input.prompt_column == "prompt"
    assert spec.input.id_column is None
    assert spec.output.mode == "resume"
    assert spec.resources.replicas == 1
    assert spec.sampling.max_tokens == 256
    assert spec.gpus_per_replica() == 1


def test_gpus_per_replica_is_tp_times_pp(spec_dict):
    spec_dict["engine"].update(tensor_parallel_size=4, pipeline_parallel_size=2)
    assert parse_spec(spec_dict).gpus_per_replica() == 8


def test_demo_yaml_loads(monkeypatch):
    if not (REPO_ROOT / "models" / "tiny-llama").is_dir():
        pytest.skip("models/tiny-llama not built (batchjobs make-model models/tiny-llama)")
    # Relative paths in a spec resolve against the current directory; with the hub off,
    # models/tiny-llama must really exist rather than pass as an org/name hub id.
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_spec("jobs/demo.yaml")
    assert spec.name == "demo"
    assert spec.input.path == "jobs/data/demo/*.jsonl"
    assert spec.input.id_column == "id"
    assert spec.engine.model == "models/tiny-llama"
    assert spec.engine.max_model_len == 512
    assert spec.engine.args == {"enforce_eager": True}
    assert spec.engine.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert spec.sampling.max_tokens == 32
    assert spec.resources.batch_size == 16
    assert spec.resources.max_inflight_batches is None  # the default window
    assert spec.cost.price_per_gpu_hour() == pytest.approx(0.10)


# --------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    ("section", "typo", "suggestion"),
    [
        ("engine", "tensor_parallel_sise", "tensor_parallel_size"),
        ("sampling", "max_token", "max_tokens"),
        ("resources", "replica", "replicas"),
        ("input", "prompt_colum", "prompt_column"),
    ],
)
def test_unknown_key_names_path_and_suggests(spec_dict, section, typo, suggestion):
    spec_dict.setdefault(section, {})[typo] = 2
    msg = _spec_error(spec_dict)
    assert "job.yaml is not a valid job spec" in msg
    assert f"{section}.{typo}: unknown key" in msg
    assert f"did you mean {suggestion!r}?" in msg


def test_unknown_top_level_key_suggests(spec_dict):
    spec_dict["resource"] = {"replicas": 2}
    msg = _spec_error(spec_dict)
    assert "resource: unknown key (did you mean 'resources'?)" in msg


def test_unknown_key_without_close_match_lists_allowed_keys(spec_dict):
    spec_dict["output"]["zzzz"] = 1
    msg = _spec_error(spec_dict)
    assert (
        "output.zzzz: unknown key (allowed keys: compact_mb, format, max_error_rate, mode, path, retries, "
        "retry_wait_s, storage_options)" in msg
    )


def test_wrong_type_names_key_and_value(spec_dict):
    spec_dict["resources"] = {"batch_size": "abc"}
    msg = _spec_error(spec_dict)
    assert "resources.batch_size:" in msg
    assert "valid integer" in msg
    assert "(got 'abc')" in msg


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("engine", "tensor_parallel_size", 0, "greater than or equal to 1 (got 0)"),
        ("resources", "replicas", 0, "greater than or equal to 1 (got 0)"),
        ("sampling", "top_p", 0, "greater than 0 (got 0)"),
        ("sampling", "temperature", -1, "greater than or equal to 0 (got -1)"),
        ("sampling", "max_tokens", 0, "greater than or equal to 1 (got 0)"),
    ],
)
def test_impossible_values_name_the_key(spec_dict, section, key, value, expected):
    spec_dict.setdefault(section, {})[key] = value
    msg = _spec_error(spec_dict)
    assert f"{section}.{key}: input should be {expected}" in msg


def test_every_error_is_listed(spec_dict):
    spec_dict["sampling"] = {"top_p": 0, "temperature": -1}
    spec_dict["resources"] = {"replicas": 0}
    msg = _spec_error(spec_dict)
    assert "sampling.top_p:" in msg
    assert "sampling.temperature:" in msg
    assert "resources.replicas:" in msg
    assert msg.count("\n  - ") == 3


def test_missing_required_section(spec_dict):
    del spec_dict["engine"]
    msg = _spec_error(spec_dict)
    assert "engine: required key is missing" in msg


def test_missing_required_nested_key(spec_dict):
    del spec_dict["output"]["path"]
    msg = _spec_error(spec_dict)
    assert "output.path: required key is missing" in msg


def test_spec_error_exit_code_is_2(spec_dict):
    del spec_dict["engine"]
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict)
    assert info.value.exit_code == 2


def test_missing_model_path_is_named(spec_dict, tmp_path):
    missing = tmp_path / "no-such-model"
    spec_dict["engine"]["model"] = str(missing)
    msg = _spec_error(spec_dict)
    assert "engine:" in msg
    assert f"model {str(missing)!r} does not exist" in msg


def test_missing_tokenizer_path_is_named(spec_dict, tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    spec_dict["engine"]["tokenizer"] = str(missing)
    msg = _spec_error(spec_dict)
    assert f"tokenizer {str(missing)!r} does not exist" in msg


def test_hub_name_accepted_online_refused_offline(spec_dict, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so that "some-org/some-model" is surely not a local path
    spec_dict["engine"]["model"] = "some-org/some-model"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert parse_spec(spec_dict).engine.model == "some-org/some-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _spec_error(spec_dict)
    assert "model 'some-org/some-model' does not exist" in msg


@pytest.mark.parametrize(
    "column", ["text", "error", "shard_id", "row_index", "payload", "embedding", "truncated"]
)
def test_id_column_clashing_with_output_column_is_refused(spec_dict, column):
    spec_dict["input"]["id_column"] = column
    msg = _spec_error(spec_dict)
    assert f"id_column {column!r} clashes with an output column" in msg


@pytest.mark.parametrize("column", ["_cached_tokens", "_replica", "_replica_startup_s"])
def test_id_column_named_like_an_internal_column(spec_dict, tmp_path, engine_output, column):
    from batchjobs.sink import write_staged

    spec_dict["input"]["id_column"] = column
    try:
        parse_spec(spec_dict)
    except SpecError as exc:  # refusing it in the spec is one acceptable fix
        assert f"id_column {column!r} clashes" in str(exc)
        return
    # accepted: then the write stage must cope with it
    batch = engine_output([{"shard_id": "s", "row_index": 0, "shard_rows": 1, "row_id": "u0"}])
    (row,) = write_staged(batch, str(tmp_path / "out"), {}, column).to_pylist()
    assert row["rows"] == 1


def test_unknown_sampling_column_parameter_is_refused(spec_dict):
    spec_dict["input"]["sampling_columns"] = {"max_tokenz": "mt"}
    msg = _spec_error(spec_dict)
    assert "input.sampling_columns:" in msg
    assert "'max_tokenz' is not a sampling parameter" in msg
    assert "max_tokens" in msg  # the allowed list


def test_invalid_name_is_refused(spec_dict):
    spec_dict["name"] = "bad name/with slash"
    msg = _spec_error(spec_dict)
    assert "name:" in msg
    assert "'bad name/with slash'" in msg


# --------------------------------------------------------------------------- load_spec


def test_load_spec_with_overrides_uses_yaml_types(spec_dict, write_yaml):
    assert "resources" not in spec_dict and "sampling" not in spec_dict
    path = write_yaml(spec_dict)
    spec = load_spec(
        path,
        [
            "resources.replicas=3",
            "sampling.stop=[a, b]",
            "engine.args.enforce_eager=false",
            "sampling.temperature=0.5",
        ],
    )
    assert spec.resources.replicas == 3
    assert spec.sampling.stop == ["a", "b"]
    assert spec.engine.args == {"enforce_eager": False}
    assert spec.sampling.temperature == 0.5


def test_override_replaces_existing_value(spec_dict, write_yaml):
    spec_dict["resources"] = {"replicas": 1, "batch_size": 7}
    path = write_yaml(spec_dict)
    spec = load_spec(path, ["resources.replicas=5"])
    assert spec.resources.replicas == 5
    assert spec.resources.batch_size == 7  # siblings are kept


def test_override_value_is_validated(spec_dict, write_yaml):
    path = write_yaml(spec_dict)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["resources.replicas=0"])
    assert "resources.replicas:" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("item", ["noequals", "=5"])
def test_malformed_override(spec_dict, write_yaml, item):
    path = write_yaml(spec_dict)
    with pytest.raises(SpecError) as info:
        load_spec(path, [item])
    msg = str(info.value)
    assert "expected KEY=VALUE" in msg
    assert repr(item) in msg


def test_override_into_a_scalar_is_refused(spec_dict, write_yaml):
    path = write_yaml(spec_dict)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["name.sub=1"])
    assert "name is not a section" in str(info.value)


def test_override_with_invalid_yaml_value(spec_dict, write_yaml):
    path = write_yaml(spec_dict)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["sampling.stop=[a, b"])
    assert "value is not valid YAML" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_non_mapping_yaml_names_the_file(write_yaml, text):
    path = write_yaml(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "a job spec is a YAML mapping" in msg


def test_invalid_yaml_names_the_file(write_yaml):
    path = write_yaml("name: [unclosed\ninput: {\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert f"{path} is not valid YAML" in msg


def test_missing_spec_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert f"cannot read job spec {path}" in str(info.value)


# --------------------------------------------------------------------------- fingerprint


@pytest.fixture
def other_model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model-b"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _fp(raw: dict) -> str:
    return parse_spec(raw).fingerprint()


def test_fingerprint_is_stable(spec_dict):
    a = _fp(spec_dict)
    assert a == _fp(copy.deepcopy(spec_dict))
    assert len(a) == 16
    int(a, 16)  # hex


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r, other: r["engine"].update(model=str(other)), id="model"),
        pytest.param(lambda r, other: r.update(sampling={"max_tokens": 17}), id="max_tokens"),
        pytest.param(lambda r, other: r.update(sampling={"temperature": 0.7}), id="temperature"),
        pytest.param(lambda r, other: r["input"].update(prompt_column="q"), id="prompt_column"),
        pytest.param(lambda r, other: r["input"].update(id_column="uid"), id="id_column"),
        pytest.param(
            lambda r, other: r["input"].update(sampling_columns={"max_tokens": "mt"}),
            id="sampling_columns",
        ),
        pytest.param(lambda r, other: r["engine"].update(dtype="float16"), id="dtype"),
        pytest.param(
            lambda r, other: r["engine"].update(args={"quantization": "fp8"}), id="engine_args"
        ),
    ],
)
def test_fingerprint_changes_with_result_affecting_keys(spec_dict, other_model_dir, mutate):
    before = _fp(spec_dict)
    changed = copy.deepcopy(spec_dict)
    mutate(changed, other_model_dir)
    assert _fp(changed) != before


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: r.update(resources={"replicas": 4}), id="replicas"),
        pytest.param(lambda r: r.update(resources={"batch_size": 8}), id="batch_size"),
        pytest.param(
            lambda r: r["engine"].update(args={"enforce_eager": True}), id="enforce_eager"
        ),
        pytest.param(lambda r: r["engine"].update(max_num_seqs=4), id="max_num_seqs"),
        pytest.param(lambda r: r["output"].update(path="/elsewhere"), id="output_path"),
        pytest.param(lambda r: r.update(cost={"usd_per_gpu_hour": 2.0}), id="cost"),
        pytest.param(lambda r: r.update(name="renamed"), id="name"),
    ],
)
def test_fingerprint_ignores_performance_and_bookkeeping_keys(spec_dict, mutate):
    before = _fp(spec_dict)
    changed = copy.deepcopy(spec_dict)
    mutate(changed)
    assert _fp(changed) == before


def test_fingerprint_ignores_perf_args_but_not_others_mixed(spec_dict):
    spec_dict["engine"]["args"] = {"quantization": "fp8"}
    base = _fp(spec_dict)
    spec_dict["engine"]["args"] = {"quantization": "fp8", "enforce_eager": True, "block_size": 32}
    assert _fp(spec_dict) == base


# --------------------------------------------------------------------------- redaction, cost


def test_redacted_hides_storage_option_values(spec_dict):
    spec_dict["input"]["storage_options"] = {"key": "AKIA-SECRET-ID", "secret": "s3cr3t-value"}
    spec_dict["output"]["storage_options"] = {"token": "out-token-xyz"}
    spec = parse_spec(spec_dict)
    red = spec.redacted()
    assert red["input"]["storage_options"] == {"key": "***", "secret": "***"}
    assert red["output"]["storage_options"] == {"token": "***"}
    blob = json.dumps(red, default=str)
    for secret in ("AKIA-SECRET-ID", "s3cr3t-value", "out-token-xyz"):
        assert secret not in blob
    # the rest of the spec is still there, and the spec itself is untouched
    assert red["engine"]["model"] == spec.engine.model
    assert spec.input.storage_options["secret"] == "s3cr3t-value"


def test_price_per_gpu_hour_prefers_accelerator_price(spec_dict):
    spec_dict["cost"] = {"usd_per_gpu_hour": 1.5, "accelerator": "H100", "prices": {"H100": 4.0}}
    assert parse_spec(spec_dict).cost.price_per_gpu_hour() == 4.0
    spec_dict["cost"]["accelerator"] = "A100"  # not in prices: the flat price applies
    assert parse_spec(spec_dict).cost.price_per_gpu_hour() == 1.5


@pytest.mark.parametrize(
    "resources, gate",
    [
        ({}, -1),  # one replica: nothing to spread, reads are not held back
        ({"replicas": 4}, -1),  # the default: feed each replica as soon as it is up
        ({"replicas": 4, "start_timeout_s": 60}, 60.0),
        ({"replicas": 4, "start_timeout_s": 1, "min_replicas": 1}, -1),  # may run on one
        ({"replicas": 4, "start_timeout_s": 1800, "min_replicas": 2}, 1800.0),
    ],
)
def test_replicas_are_gated_only_when_there_is_work_to_spread(spec_dict, resources, gate):
    from batchjobs.feeding import start_gate_s

    spec_dict["resources"] = resources
    assert start_gate_s(parse_spec(spec_dict)) == gate


@pytest.mark.parametrize(
    "rows, resources, per_replica",
    [
        (2000, {"replicas": 4}, 8),  # 32 batches of 64 over 4: a share of 8, not 16
        (2000, {"replicas": 2}, 16),  # a share of 16 = max_inflight_batches
        (2000, {"replicas": 4, "min_replicas": 2}, 16),  # shared over the 2 the pool starts with
        (2000, {"replicas": 1}, 16),  # one replica: nothing to share
        (100, {"replicas": 4}, 2),  # 8 shards of 12 rows: one batch each, 8 batches over 4
        (200_000, {"replicas": 4}, 16),  # a big job: every replica can hold the full 16
    ],
)
def test_a_replica_holds_at_most_its_share_of_a_small_job(
    tmp_path, spec_dict, rows, resources, per_replica
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchjobs.feeding import tasks_per_replica
    from batchjobs.readers import list_shards

    (tmp_path / "in").mkdir()
    for s in range(8):
        n = rows // 8
        pq.write_table(pa.table({"prompt": ["x"] * n}), tmp_path / "in" / f"{s}.parquet")
    spec_dict["input"] = {"path": str(tmp_path / "in"), "format": "parquet"}
    spec_dict["resources"] = {"batch_size": 64, "max_inflight_batches": 16, **resources}
    spec = parse_spec(spec_dict)
    todo = list_shards(spec.input.path, "parquet", {})
    assert tasks_per_replica(spec, todo) == per_replica
