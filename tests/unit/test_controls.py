"""Generation controls (structured output, logprobs, n, LoRA per row) without an engine:
the spec's checks, the engine adapters' mapping and normalising (objects built to each
engine's documented shapes), the output columns, and cost per adapter. The real engine
runs them in tests/integration/test_controls_e2e.py."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace as NS

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjobs.engines import trtllm, vllm
from batchjobs.engines.base import Request, Result, Sample, TokenLogprob
from batchjobs.errors import InputError, SpecError
from batchjobs.readers import list_shards, preflight, read_shard
from batchjobs.spec import parse_spec
from batchjobs.structured import check_output, row_constraint
from batchjobs.tasks import task_for
from batchjobs.tasks.generated import adapter_sums, output_columns, output_fields

LABEL = {
    "type": "object",
    "properties": {"label": {"enum": ["pos", "neg"]}},
    "required": ["label"],
}


def _error(make_spec, **sections) -> str:
    with pytest.raises(SpecError) as info:
        make_spec(**sections)
    return str(info.value)


def _adapter(path: Path, rank: int = 8) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(path)


# --------------------------------------------------------------------------- the spec


def test_a_json_schema_may_be_inline_or_a_file(make_spec, tmp_path):
    inline = make_spec(sampling={"structured": {"json_schema": LABEL}})
    path = tmp_path / "label.json"
    path.write_text(json.dumps(LABEL))
    from_file = make_spec(sampling={"structured": {"json_schema": str(path)}})
    assert inline.sampling.structured.constraint() == {"json_schema": LABEL}
    assert from_file.sampling.structured.constraint() == {"json_schema": LABEL}
    # the schema itself, not its path, is what the fingerprint covers
    assert inline.fingerprint() == from_file.fingerprint()


@pytest.mark.parametrize(
    ("structured", "expected"),
    [
        (
            {"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}},
            "sampling.structured.json_schema: value error, is not a valid JSON Schema at "
            "properties/a/type",
        ),
        ({"json_schema": "no/such.json"}, "sampling.structured.json_schema: value error, "),
        (
            {"json_schema": "{not json"},
            "sampling.structured.json_schema: value error, is not valid JSON",
        ),
        (
            {"regex": "[a-z"},
            "sampling.structured.regex: value error, '[a-z' is not a valid regular",
        ),
        ({"choice": []}, "sampling.structured.choice: value error, choice lists no options"),
        ({"choice": ["a", "a"]}, "sampling.structured.choice: value error, choice repeats 'a'"),
        ({"grammar": "missing.gbnf"}, "sampling.structured.grammar: value error, 'missing.gbnf'"),
        (
            {"regex": "a", "choice": ["a", "b"]},
            "set one of json_schema, regex, choice, grammar, not regex and choice",
        ),
        ({"compact": True}, "sampling.structured sets no constraint"),
    ],
)
def test_an_invalid_constraint_is_a_validate_error_naming_the_key(make_spec, structured, expected):
    assert expected in _error(make_spec, sampling={"structured": structured})


def test_a_grammar_may_be_a_file(make_spec, tmp_path):
    path = tmp_path / "g.gbnf"
    path.write_text('root ::= "a" | "b"\n')
    spec = make_spec(sampling={"structured": {"grammar": str(path)}})
    assert spec.sampling.structured.grammar == 'root ::= "a" | "b"\n'


def test_rows_may_bring_every_constraint(make_spec):
    spec = make_spec(input={"schema_column": "schema"}, sampling={"structured": {"compact": True}})
    assert spec.sampling.structured.constraint() is None


@pytest.mark.parametrize("param", ["n", "logprobs", "prompt_logprobs", "structured"])
def test_output_shaping_keys_are_not_per_row(make_spec, param):
    message = _error(make_spec, input={"sampling_columns": {param: "x"}})
    assert f"{param!r} is not a sampling parameter" in message


def test_controls_the_engine_lacks_are_refused_naming_key_and_engines(make_spec):
    message = _error(
        make_spec,
        engine={"kind": "trtllm"},
        sampling={"structured": {"regex": "[0-9]+", "compact": True}},
    )
    assert (
        "sampling.structured.compact asks for whitespace-free JSON, which engine.kind " in message
    )
    assert "'trtllm' does not provide (use engine.kind: vllm)" in message
    message = _error(make_spec, engine={"kind": "trtllm"}, sampling={"prompt_logprobs": 1})
    assert "sampling.prompt_logprobs asks for the prompt tokens' log-probabilities" in message
    # what TensorRT-LLM maps is accepted
    make_spec(
        engine={"kind": "trtllm"},
        sampling={"n": 2, "temperature": 1.0, "logprobs": 1, "structured": {"choice": ["a", "b"]}},
    )


@pytest.mark.parametrize(
    ("task", "sections"),
    [
        ("embed", {"sampling": {"logprobs": 1}}),
        ("eval", {"sampling": {"n": 2}, "eval": {"scorers": ["exact"]}}),
    ],
)
def test_controls_apply_to_generate_and_chat_only(make_spec, task, sections):
    message = _error(make_spec, task=task, **sections)
    assert "only tasks generate and chat take generation controls" in message


def test_lora_needs_an_adapter_column_and_existing_adapters(make_spec, tmp_path):
    a = _adapter(tmp_path / "a", rank=16)
    ok = make_spec(engine={"lora": {"adapters": {"a": a}}}, input={"adapter_column": "adapter"})
    assert ok.engine.lora.adapters == {"a": a}
    assert "set input.adapter_column" in _error(make_spec, engine={"lora": {"adapters": {"a": a}}})
    assert "engine.lora lists none" in _error(make_spec, input={"adapter_column": "adapter"})
    missing = _error(
        make_spec,
        engine={"lora": {"adapters": {"gone": str(tmp_path / "gone")}}},
        input={"adapter_column": "adapter"},
    )
    assert f"engine.lora.adapters.gone: '{tmp_path / 'gone'}' is not a directory" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _error(
        make_spec, engine={"lora": {"adapters": {"e": str(empty)}}}, input={"adapter_column": "x"}
    )
    assert "has no adapter_config.json" in message
    message = _error(
        make_spec,
        engine={"lora": {"adapters": {"a": a}, "max_lora_rank": 8}},
        input={"adapter_column": "x"},
    )
    assert "engine.lora.adapters.a: rank 16 is above engine.lora.max_lora_rank 8" in message
    message = _error(
        make_spec, engine={"lora": {"adapters": {"base": a}}}, input={"adapter_column": "x"}
    )
    assert "'base' names the base model" in message


def test_offline_validation_does_not_look_for_adapters(spec_dict, tmp_path):
    raw = copy.deepcopy(spec_dict)
    raw["engine"]["lora"] = {"adapters": {"a": "/cluster/adapters/a"}}
    raw["input"]["adapter_column"] = "adapter"
    assert parse_spec(raw, offline=True).engine.lora.adapters["a"] == "/cluster/adapters/a"
    with pytest.raises(SpecError, match="engine.lora.adapters.a"):
        parse_spec(raw)


def test_the_pilot_does_not_take_per_row_controls(make_spec, tmp_path):
    message = _error(
        make_spec,
        input={"schema_column": "schema"},
        pilot={"candidates": [{"name": "a"}, {"name": "b", "max_num_seqs": 8}]},
    )
    assert "pilot: the pilot's sample of the input carries the prompt columns only" in message


def test_an_id_column_may_not_take_a_control_column_name(make_spec):
    message = _error(make_spec, input={"id_column": "parsed", "schema_column": "s"})
    assert "id_column 'parsed' clashes with an output column" in message


def _old_fingerprint(spec) -> str:
    """The fingerprint as it was computed before the generation controls existed."""
    from batchjobs.spec import PERF_ONLY_ENGINE_ARGS

    engine = spec.engine.model_dump(
        include={"kind", "model", "tokenizer", "dtype", "max_model_len", "trust_remote_code"}
    )
    engine["args"] = {k: v for k, v in spec.engine.args.items() if k not in PERF_ONLY_ENGINE_ARGS}
    sampling = spec.sampling.model_dump(exclude={"n", "logprobs", "prompt_logprobs", "structured"})
    payload = {
        "task": spec.task,
        "prompt_column": spec.input.prompt_column,
        "sampling_columns": spec.input.sampling_columns,
        "id_column": spec.input.id_column,
        "engine": engine,
        "sampling": sampling,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def test_jobs_without_controls_keep_their_fingerprint_and_controls_change_it(make_spec, tmp_path):
    plain = make_spec(sampling={"max_tokens": 9, "stop": ["\n"]})
    assert plain.fingerprint() == _old_fingerprint(plain)  # committed outputs still resume
    a = _adapter(tmp_path / "a")
    changed = [
        make_spec(sampling={"max_tokens": 9, "stop": ["\n"], "n": 2, "temperature": 0.5}),
        make_spec(sampling={"max_tokens": 9, "stop": ["\n"], "logprobs": 0}),
        make_spec(sampling={"max_tokens": 9, "stop": ["\n"], "structured": {"regex": "a+"}}),
        make_spec(sampling={"max_tokens": 9, "stop": ["\n"]}, input={"schema_column": "s"}),
        make_spec(
            sampling={"max_tokens": 9, "stop": ["\n"]},
            engine={"lora": {"adapters": {"a": a}}},
            input={"adapter_column": "x"},
        ),
    ]
    prints = {s.fingerprint() for s in changed}
    assert len(prints) == len(changed) and plain.fingerprint() not in prints
    # how many adapters the engine holds at once changes memory, not results
    more = make_spec(
        sampling={"max_tokens": 9, "stop": ["\n"]},
        engine={"lora": {"adapters": {"a": a}, "max_loras": 4}},
        input={"adapter_column": "x"},
    )
    assert more.fingerprint() == changed[-1].fingerprint()


# --------------------------------------------------------------------------- row constraints


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (LABEL, {"json_schema": LABEL}),
        (json.dumps(LABEL), {"json_schema": LABEL}),
        ({"json_schema": LABEL}, {"json_schema": LABEL}),
        ('{"regex": "[0-9]{3}"}', {"regex": "[0-9]{3}"}),
        ({"choice": ["x", "y"]}, {"choice": ["x", "y"]}),
        ({"grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
    ],
)
def test_a_rows_constraint_is_a_schema_or_one_kind(value, expected):
    assert row_constraint(value) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("{nope", "is not valid JSON"),
        ([1, 2], "is list, expected a JSON Schema or one of"),
        ({"regex": "a", "choice": ["a"]}, "give exactly one of"),
        ({"regex": "("}, "is not a valid regular expression"),
        ({"grammar": "some.gbnf"}, "has no '::=' rule"),  # rows give no file paths
        ({"type": "nonsense"}, "is not a valid JSON Schema"),
    ],
)
def test_a_bad_row_constraint_says_why(value, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace("'", "'")):
        row_constraint(value)


def test_row_controls_are_read_checked_and_may_be_left_out(tmp_path, write_jsonl, make_spec):
    a = _adapter(tmp_path / "a")
    spec = make_spec(
        input={"adapter_column": "adapter", "schema_column": "schema"},
        engine={"lora": {"adapters": {"a": a}}},
    )
    rows = [
        {"prompt": "p0"},  # neither key: the base model and the job's constraint
        {"prompt": "p1", "adapter": "a", "schema": {"choice": ["x", "y"]}},
        {"prompt": "p2", "adapter": "zz"},
        {"prompt": "p3", "schema": "{bad"},
    ]
    path = write_jsonl(tmp_path / "in" / "rows.jsonl", rows)
    (shard,) = list_shards(str(path))
    cols = task_for(spec).input_columns()
    preflight(shard, cols)
    (batch,) = list(read_shard(shard, cols))
    errors = batch.column("input_error").to_pylist()
    assert errors[:2] == [None, None]
    assert errors[2].endswith(
        "'adapter' names adapter 'zz', which engine.lora.adapters does not list (known: a; "
        "null: the base model)"
    )
    assert "line 4: 'schema' is not valid JSON" in errors[3]
    payloads = [json.loads(p) if p else None for p in batch.column("payload").to_pylist()]
    prepared = task_for(spec).prepare_batch(
        batch.column("row_id").to_pylist(),
        batch.column("payload").to_pylist(),
        errors,
        [None] * 4,
    )
    assert payloads[0] == {"prompt": "p0", "adapter": None, "schema": None}
    assert prepared[0].request.adapter is None and prepared[0].request.structured is None
    assert prepared[1].request.adapter == "a"
    assert prepared[1].request.structured == {"choice": ["x", "y"]}
    assert prepared[1].extra["_constraint"] == {"choice": ["x", "y"]}
    assert prepared[2] == errors[2] and prepared[3] == errors[3]


def test_a_parquet_schema_column_must_hold_text(tmp_path, make_spec):
    spec = make_spec(input={"path": str(tmp_path / "*.parquet"), "schema_column": "schema"})
    pq.write_table(pa.table({"prompt": ["p"], "schema": [3]}), tmp_path / "x.parquet")
    (shard,) = list_shards(str(tmp_path / "*.parquet"))
    with pytest.raises(InputError, match="column 'schema' has type int64, expected string"):
        preflight(shard, task_for(spec).input_columns())


# --------------------------------------------------------------------------- outputs


def test_check_output_parses_or_names_why_not():
    schema = {"json_schema": LABEL}
    assert check_output(schema, '{ "label": "pos" }', "stop", 9) == ('{"label":"pos"}', None)
    parsed, error = check_output(schema, '{"label": "po', "length", 9)
    assert parsed is None and error.startswith(
        "structured output cut at max_tokens (9) before it satisfied the JSON Schema (is not "
        "valid JSON"
    )
    parsed, error = check_output(schema, '{"label": "x"}', "stop", 9)
    assert error.startswith("structured output does not validate against the JSON Schema at label")
    assert check_output({"regex": "[0-9]{2}"}, "42", "stop", 4) == ('"42"', None)
    assert check_output({"regex": "[0-9]{2}"}, "4", "length", 4)[1].startswith(
        "structured output cut at max_tokens (4) before it satisfied regex '[0-9]{2}'"
    )
    assert check_output({"choice": ["a", "b"]}, "b", "stop", 4) == ('"b"', None)
    assert check_output({"grammar": "root ::= x"}, "x", "stop", 4) == ('"x"', None)
    assert "may be incomplete" in check_output({"grammar": "root ::= x"}, "x", "length", 4)[1]


def test_output_fields_follow_the_controls(make_spec, tmp_path):
    plain = make_spec()
    assert list(output_fields(plain)) == [
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "latency_s",
        "error",
    ]
    a = _adapter(tmp_path / "a")
    full = make_spec(
        sampling={
            "n": 2,
            "temperature": 1.0,
            "logprobs": 1,
            "prompt_logprobs": 0,
            "structured": {"regex": "a"},
        },
        engine={"lora": {"adapters": {"a": a}}},
        input={"adapter_column": "x"},
    )
    fields = output_fields(full)
    assert list(fields)[:4] == ["texts", "finish_reasons", "sample_tokens", "finish_reason"]
    assert fields["parsed"] == pa.list_(pa.string())
    assert fields["adapter"] == pa.string()
    assert fields["cumulative_logprob"] == pa.list_(pa.float64())
    assert pa.types.is_list(fields["logprobs"].value_type)  # a list of tokens per sample
    assert "text" not in fields


def _tok(i: int, lp: float) -> TokenLogprob:
    return TokenLogprob(i, lp, f"t{i}", (TokenLogprob(i, lp, f"t{i}"),))


def test_output_columns_of_several_structured_samples(make_spec):
    spec = make_spec(
        sampling={"n": 2, "temperature": 1.0, "logprobs": 1, "structured": {"choice": ["a", "b"]}}
    )
    ok = Result(
        text="a",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=3,
        samples=[
            Sample("a", "stop", 1, [_tok(5, -0.5)], -0.5),
            Sample("b", "stop", 2, [_tok(6, -0.1), _tok(2, -0.2)], -0.3),
        ],
    )
    cut = Result(
        text="",
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=2,
        samples=[Sample("", "length", 1, [_tok(7, -1.0)], -1.0), Sample("b", "stop", 1, [], 0.0)],
    )
    failed = Result.failed("rejected by engine: too long")
    extra = {"_constraint": {"choice": ["a", "b"]}, "_max_tokens": 1}
    cols = output_columns(spec, [ok, cut, failed], [extra, extra, {}])
    table = pa.table(cols)
    assert table.schema == pa.schema(list(output_fields(spec).items()))
    rows = table.to_pylist()
    assert rows[0]["texts"] == ["a", "b"] and rows[0]["parsed"] == ['"a"', '"b"']
    assert rows[0]["finish_reasons"] == ["stop", "stop"] and rows[0]["error"] is None
    assert rows[0]["sample_tokens"] == [1, 2] and rows[0]["completion_tokens"] == 3
    assert rows[0]["cumulative_logprob"] == [-0.5, -0.3]
    assert rows[0]["logprobs"][1][0] == {
        "token_id": 6,
        "token": "t6",
        "logprob": pytest.approx(-0.1),
        "top": [{"token_id": 6, "token": "t6", "logprob": pytest.approx(-0.1)}],
    }
    assert rows[1]["finish_reason"] == "length" and rows[1]["parsed"] == [None, '"b"']
    assert rows[1]["error"].startswith("sample 0: structured output cut at max_tokens (1)")
    assert rows[2]["texts"] is None and rows[2]["error"] == "rejected by engine: too long"
    assert rows[2]["finish_reason"] == "error"


def test_a_plain_job_writes_the_columns_it_always_did(make_spec):
    from batchjobs.tasks.generate import TEXT_FIELDS, text_columns

    spec = make_spec()
    results = [Result(text="x", finish_reason="stop", prompt_tokens=2, completion_tokens=1)]
    assert output_fields(spec) == TEXT_FIELDS
    assert pa.table(output_columns(spec, results, [{}])) == pa.table(text_columns(results))


# --------------------------------------------------------------------------- vLLM


def _lp(logprob: float, rank: int, token: str) -> NS:
    return NS(logprob=logprob, rank=rank, decoded_token=token)


def _vllm_output(n_samples: int = 1) -> NS:
    # vllm.RequestOutput with logprobs=2: per position the sampled token plus the top 2
    # (here the sampled token is rank 3 at position 1: three entries)
    comps = [
        NS(
            text=f"xy{k}",
            token_ids=[10, 11],
            finish_reason="stop" if k == 0 else "length",
            logprobs=[
                {10: _lp(-0.1, 1, "x"), 12: _lp(-2.5, 2, "z")},
                {13: _lp(-0.3, 1, "q"), 14: _lp(-0.9, 2, "r"), 11: _lp(-1.5, 3, "y")},
            ],
            cumulative_logprob=-1.6,
        )
        for k in range(n_samples)
    ]
    return NS(
        request_id="r",
        prompt_token_ids=[1, 2],
        prompt_logprobs=[None, {2: _lp(-4.0, 7, "b"), 9: _lp(-0.5, 1, "c")}],
        outputs=comps,
        lora_request=NS(lora_name="a"),
        finished=True,
    )


def test_vllm_logprobs_alternatives_samples_and_adapter_are_normalised():
    final = _vllm_output(n_samples=3)
    result = vllm.details(final, vllm.normalize(final, 0.1), NS(logprobs=2, prompt_logprobs=1))
    first = result.logprobs
    assert [t.token_id for t in first] == [10, 11] and first[1].logprob == -1.5
    assert [a.token_id for a in first[0].top] == [10, 12]
    assert [a.token_id for a in first[1].top] == [13, 14]  # the sampled one is rank 3: not top 2
    assert result.cumulative_logprob == -1.6
    assert math.isclose(sum(t.logprob for t in first), result.cumulative_logprob)
    assert [s.finish_reason for s in result.samples] == ["stop", "length", "length"]
    assert result.completion_tokens == 6  # every sample's tokens: what the engine generated
    assert result.adapter == "a"
    assert result.prompt_token_logprobs[0] is None
    assert result.prompt_token_logprobs[1] == TokenLogprob(
        2, -4.0, "b", (TokenLogprob(9, -0.5, "c"),)
    )


def test_vllm_plain_requests_get_no_extras():
    final = _vllm_output()
    final.outputs[0].logprobs = None
    final.lora_request = None
    result = vllm.details(
        final, vllm.normalize(final, 0.1), NS(logprobs=None, prompt_logprobs=None)
    )
    assert result.logprobs is None and result.samples is None and result.adapter is None
    assert result.prompt_token_logprobs is None and result.completion_tokens == 2


def test_vllm_sampling_and_engine_args_carry_the_controls(make_spec, tmp_path):
    a, b = _adapter(tmp_path / "a", rank=8), _adapter(tmp_path / "b", rank=16)
    spec = make_spec(
        sampling={
            "n": 3,
            "temperature": 0.7,
            "logprobs": 2,
            "prompt_logprobs": 1,
            "structured": {"regex": "x", "compact": True},
        },
        engine={"lora": {"adapters": {"a": a, "b": b}}},
        input={"adapter_column": "adapter"},
    )
    kw = vllm.sampling_kwargs(spec.sampling)
    assert kw["n"] == 3 and kw["logprobs"] == 2 and kw["prompt_logprobs"] == 1
    gpu = vllm.engine_args(spec)
    assert gpu["enable_lora"] is True and gpu["max_loras"] == 2
    assert gpu["max_lora_rank"] == 16  # the largest adapter's, as vLLM reserves ranks
    assert gpu["structured_outputs_config"] == {
        "backend": "xgrammar",
        "disable_any_whitespace": True,
    }
    cpu = vllm.engine_args(spec, cpu=True)
    assert cpu["max_loras"] == 3 and cpu["max_cpu_loras"] >= 3  # a slot kept empty on CPU
    plain = vllm.engine_args(make_spec())
    assert "enable_lora" not in plain and "structured_outputs_config" not in plain
    assert vllm.vllm_fields({"json_schema": LABEL}) == {"json": LABEL}


def test_vllm_requests_carry_a_rows_adapter_and_constraint():
    req = Request("r", prompt="p", structured={"regex": "a"}, adapter="x")
    assert req.structured == {"regex": "a"} and req.adapter == "x"


# --------------------------------------------------------------------------- TensorRT-LLM


def test_trtllm_maps_the_controls_it_has(make_spec, tmp_path):
    from batchjobs.structured import trtllm_fields

    a = _adapter(tmp_path / "a", rank=8)
    spec = make_spec(
        engine={"kind": "trtllm", "lora": {"adapters": {"a": a}}},
        input={"adapter_column": "adapter"},
        sampling={
            "n": 2,
            "temperature": 1.0,
            "logprobs": 1,
            "structured": {"choice": ["yes", "no"]},
        },
    )
    kw = trtllm.llm_kwargs(spec)
    assert kw["guided_decoding_backend"] == "xgrammar"
    assert kw["lora_config"] == {
        "lora_dir": [a],
        "max_lora_rank": 8,
        "max_loras": 1,
        "max_cpu_loras": 1,
    }
    sk = trtllm.sampling_kwargs(spec)
    assert sk["n"] == 2 and sk["logprobs"] == 1 and "structured" not in sk
    assert trtllm_fields({"choice": ["yes", "no."]}) == {"regex": r"(yes|no\.)"}
    assert trtllm_fields({"json_schema": LABEL}) == {"json": LABEL}


def test_trtllm_samples_and_logprobs_are_normalised():
    comp = NS(
        text="ab",
        token_ids=[3, 4],
        finish_reason="length",
        logprobs=[{3: NS(logprob=-0.2, rank=1)}, -0.7],
        cumulative_logprob=-0.9,
    )
    (sample,) = trtllm.samples(NS(outputs=[comp]), 1)
    assert sample.finish_reason == "length" and sample.completion_tokens == 2
    assert [t.logprob for t in sample.logprobs] == [-0.2, -0.7]
    assert sample.logprobs[0].top == (TokenLogprob(3, -0.2),)
    assert sample.cumulative_logprob == -0.9
    (plain,) = trtllm.samples(NS(outputs=[comp]), None)
    assert plain.logprobs is None


# --------------------------------------------------------------------------- cost per adapter


def test_cost_is_charged_per_adapter_and_adds_up_to_the_shard():
    from batchjobs.cost import Weights
    from batchjobs.manifest import ShardRecord

    table = pa.table(
        {
            "adapter": ["a", None, "a", None],
            "prompt_tokens": [10, 20, 30, 0],
            "completion_tokens": [5, 5, 10, 0],
            "error": [None, None, None, "line 4: 'adapter' names adapter 'x' ..."],
        }
    )
    sums = adapter_sums(table)
    assert sums == {
        "adapter.a.rows": 2,
        "adapter.a.prompt_tokens": 40,
        "adapter.a.completion_tokens": 15,
        "adapter.base.rows": 1,
        "adapter.base.prompt_tokens": 20,
        "adapter.base.completion_tokens": 5,
    }
    rec = ShardRecord(
        shard_id="s",
        source="x",
        rows=4,
        error_rows=1,
        prompt_tokens=60,
        completion_tokens=20,
        cached_tokens=30,
        metrics=dict(sums),
    )
    rec.finalise(Weights(0.001, 0.01, "fit"), gpus_per_replica=2, usd_per_gpu_hour=3.6)
    m = rec.metrics
    # the cache's hits (half the prompt tokens) spread by prompt tokens
    assert m["adapter.a.engine_s"] == pytest.approx(0.001 * 20 + 0.01 * 15)
    assert m["adapter.base.engine_s"] == pytest.approx(0.001 * 10 + 0.01 * 5)
    assert m["adapter.a.engine_s"] + m["adapter.base.engine_s"] == pytest.approx(rec.engine_s)
    assert m["adapter.a.cost_usd"] + m["adapter.base.cost_usd"] == pytest.approx(rec.cost_usd)
    assert m["adapter.a.cost_usd"] == pytest.approx(m["adapter.a.engine_s"] * 2 * 3.6 / 3600)


def test_the_run_report_sums_each_adapter_over_shards(make_spec, tmp_path):
    from batchjobs.manifest import ShardRecord

    a = _adapter(tmp_path / "a")
    spec = make_spec(engine={"lora": {"adapters": {"a": a}}}, input={"adapter_column": "x"})
    recs = {
        s: ShardRecord(
            shard_id=s,
            source="x",
            metrics={
                "adapter.a.rows": 2,
                "adapter.a.prompt_tokens": 10,
                "adapter.a.completion_tokens": 10,
                "adapter.a.cost_usd": 0.5,
            },
        )
        for s in ("s1", "s2")
    }
    report = task_for(spec).report(None, recs)
    assert report == {
        "adapters": {
            "a": {
                "rows": 4,
                "prompt_tokens": 20,
                "completion_tokens": 20,
                "cost_usd": 1.0,
                "usd_per_1m_tokens": pytest.approx(1.0 / 40e-6),
            }
        }
    }
    assert task_for(make_spec()).report(None, recs) is None
    from batchjobs.tasks.generated import adapter_lines

    assert adapter_lines(report["adapters"])[1] == (
        "  a: 4 rows, 20 in, 20 out, $1.000000 ($25000.0000 per 1M tokens)"
    )


# --------------------------------------------------------------------------- make-model --lora


def test_a_tiny_lora_adapter_has_peft_files_for_the_models_shape(tmp_path):
    pytest.importorskip("torch")
    from safetensors import safe_open

    from batchjobs.tools.lora import build_lora

    base = tmp_path / "base"
    base.mkdir()
    config = {
        "model_type": "llama",
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_hidden_layers": 2,
    }
    (base / "config.json").write_text(json.dumps(config))
    out = build_lora(tmp_path / "lora", base, rank=8, seed=3)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        a = fh.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        b = fh.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    assert len(keys) == 2 * 4 * 2  # A and B, four projections, two layers
    assert tuple(a.shape) == (8, 128) and tuple(b.shape) == (128, 8)
    assert float(b.abs().sum()) > 0  # B is not PEFT's zeros: the adapter changes outputs
    with pytest.raises(ValueError, match="rank 5 is not one vLLM serves"):
        build_lora(tmp_path / "bad", base, rank=5)


def test_make_model_lora_writes_an_adapter_for_a_model(tmp_path):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from batchjobs.cli import app

    base = tmp_path / "base"
    base.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 1}
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(
        app, ["make-model", str(out), "--lora", str(base), "--rank", "16", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    bad = CliRunner().invoke(app, ["make-model", str(tmp_path / "x"), "--lora", str(tmp_path)])
    assert bad.exit_code == 2 and "is not a model directory (no config.json)" in bad.output


def test_several_samples_need_a_temperature(make_spec):
    message = _error(make_spec, sampling={"n": 3})
    assert "sampling.n 3 with temperature 0: greedy decoding gives one answer" in message
