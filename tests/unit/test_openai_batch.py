"""OpenAI Batch request lines in (batchjobs/openai_batch/requests.py), response bodies out
(bodies.py) checked against the ``openai`` package's own types, and what a job spec on
OpenAI Batch files may ask for (spec.py). No engine."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from openai.types import BatchError, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from batchjobs.engines.base import Result, Sample, TokenLogprob
from batchjobs.errors import InputError, SpecError
from batchjobs.openai_batch import bodies
from batchjobs.openai_batch.requests import Refusal, parse, preflight
from batchjobs.openai_batch.spec import accepted_names, resolve, served_name
from batchjobs.readers import list_shards

NAMES = {"tiny-llama", "models/tiny-llama"}
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


def line(url=CHAT, method="POST", call="generate", **body):
    return parse({"method": method, "url": url, "body": body}, call, NAMES)


def refused(url=CHAT, method="POST", call="generate", **body) -> Refusal:
    with pytest.raises(Refusal) as info:
        line(url, method, call, **body)
    return info.value


# --------------------------------------------------------------------------- request lines


def test_a_chat_line_becomes_messages_and_engine_parameters():
    got = line(
        model="tiny-llama",
        messages=[
            {"role": "system", "content": "Be brief.", "name": "sys"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_tokens=50,
        max_completion_tokens=7,  # wins over max_tokens, as in vLLM
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop="END",
        n=2,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.1,
        user="someone",
        logit_bias=None,  # null: left out, as OpenAI reads it
        response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    )
    assert got.kind == "chat" and got.model == "tiny-llama"
    assert got.messages == [
        {"role": "system", "content": "Be brief.", "name": "sys"},
        {"role": "user", "content": "a\nb"},
    ]
    assert got.max_tokens == 7 and got.n == 2 and got.logprobs == 3
    assert got.params == {
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["END"],
        "n": 2,
        "logprobs": 3,
        "presence_penalty": 0.1,
    }
    assert got.structured == {"json_schema": {"type": "object"}}
    assert line(messages=MSGS, response_format={"type": "json_object"}).structured == {
        "json_schema": {"type": "object"}
    }
    assert line(messages=MSGS, response_format={"type": "text"}).structured is None
    assert line(messages=MSGS, logprobs=True).logprobs == 0  # the chosen tokens only
    assert line(messages=MSGS).logprobs is None and line(messages=MSGS).model is None


def test_completion_and_embedding_lines():
    c = line("/v1/completions", prompt="Once", logprobs=2, echo=False, stream=False)
    assert (c.kind, c.prompt, c.logprobs, c.max_tokens) == ("completion", "Once", 2, None)
    assert line("/v1/completions", prompt=[[1, 2, 3]]).prompt == [1, 2, 3]
    e = line("/v1/embeddings", call="embed", input=["a", "b"], dimensions=8)
    assert (e.kind, e.inputs, e.params, e.encoding) == (
        "embedding",
        ["a", "b"],
        {"dimensions": 8},
        "float",
    )
    assert line("/v1/embeddings", call="embed", input=[5, 6]).inputs == [[5, 6]]
    e = line("/v1/embeddings", call="embed", input="x", encoding_format="base64")
    assert e.encoding == "base64"


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "param", "says"),
    [
        ({"method": "GET", "messages": MSGS}, 400, "invalid_method", "method", "only POST"),
        ({"url": "/v1/moderations", "input": "x"}, 400, "invalid_url", "url", "/v1/embeddings"),
        (
            {"url": "/v1/embeddings", "input": "x"},
            400,
            "unsupported_endpoint",
            "url",
            "task: embed",
        ),
        ({"call": "embed", "messages": MSGS}, 400, "unsupported_endpoint", "url", "task: generate"),
        (
            {"messages": MSGS, "logit_bias": {"1": 2}},
            400,
            "unsupported_parameter",
            "logit_bias",
            "remove it",
        ),
        (
            {"messages": MSGS, "tools": [], "tool_choice": "auto"},
            400,
            "unsupported_parameter",
            "tool_choice",
            "tools",
        ),
        (
            {"messages": MSGS, "model": "gpt-4o"},
            404,
            "model_not_found",
            "model",
            "`gpt-4o` does not exist",
        ),
        ({"messages": MSGS, "temperature": 3}, 400, "invalid_value", "temperature", "out of range"),
        ({"messages": MSGS, "top_p": 0}, 400, "invalid_value", "top_p", "above 0.0"),
        ({"messages": MSGS, "n": 0}, 400, "invalid_value", "n", "from 1 to 128"),
        (
            {"messages": MSGS, "max_tokens": True},
            400,
            "invalid_value",
            "max_tokens",
            "not an integer",
        ),
        (
            {"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]},
            400,
            "invalid_value",
            "stop",
            "at most 4",
        ),
        (
            {"messages": MSGS, "top_logprobs": 2},
            400,
            "invalid_value",
            "top_logprobs",
            "logprobs: true",
        ),
        ({"messages": MSGS, "stream": True}, 400, "unsupported_value", "stream", "one piece"),
        ({"messages": []}, 400, "invalid_value", "messages", "non-empty list"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            "invalid_value",
            "messages[0].role",
            "robot",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
            400,
            "unsupported_parameter",
            "messages[0].tool_calls",
            "text messages only",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "unsupported_parameter",
            "messages[0].content[0]",
            "'image_url'",
        ),
        (
            {"messages": MSGS, "response_format": {"type": "xml"}},
            400,
            "invalid_value",
            "response_format",
            "xml",
        ),
        (
            {
                "messages": MSGS,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
            },
            400,
            "invalid_value",
            "response_format",
            "not a valid JSON Schema",
        ),
        (
            {"url": "/v1/completions", "prompt": ["a", "b"]},
            400,
            "unsupported_value",
            "prompt",
            "a list of 2 prompts",
        ),
        ({"url": "/v1/completions", "prompt": ""}, 400, "invalid_value", "prompt", "empty"),
        (
            {"url": "/v1/completions", "prompt": "x", "echo": True},
            400,
            "unsupported_value",
            "echo",
            "false",
        ),
        (
            {"url": "/v1/completions", "prompt": "x", "suffix": "y"},
            400,
            "unsupported_parameter",
            "suffix",
            "suffix",
        ),
        (
            {"url": "/v1/embeddings", "call": "embed", "input": []},
            400,
            "invalid_value",
            "input",
            "expected",
        ),
        (
            {"url": "/v1/embeddings", "call": "embed", "input": ["a", " "]},
            400,
            "invalid_value",
            "input[1]",
            "empty",
        ),
        (
            {"url": "/v1/embeddings", "call": "embed", "input": ["a", [1]]},
            400,
            "invalid_value",
            "input[1]",
            "cannot mix",
        ),
        (
            {"url": "/v1/embeddings", "call": "embed", "input": "a", "encoding_format": "int8"},
            400,
            "invalid_value",
            "encoding_format",
            "int8",
        ),
    ],
)
def test_a_line_is_refused_with_its_status_code_and_field(kwargs, status, code, param, says):
    err = refused(**kwargs)
    assert (err.status, err.code, err.param) == (status, code, param)
    assert says in err.message


def test_the_model_may_be_named_as_served_or_as_written(make_spec, tmp_path):
    spec = make_spec(input={"format": "openai_batch"})
    written = spec.engine.model
    assert served_name(spec) == "model" and accepted_names(spec) == {"model", written}
    named = make_spec(input={"format": "openai_batch"}, engine={"served_model_name": "m1"})
    assert served_name(named) == "m1" and accepted_names(named) == {"m1"}


# --------------------------------------------------------------------------- response bodies


def tok(token_id: int, text: str | None, lp: float, top=()) -> TokenLogprob:
    return TokenLogprob(token_id, lp, text, tuple(top))


def test_chat_and_completion_bodies_parse_as_the_openai_types():
    lps = [tok(5, "Hi", -0.5, [tok(5, "Hi", -0.5), tok(6, "Yo", -1.2)]), tok(7, None, -math.inf)]
    result = Result(
        text="Hi!", finish_reason="stop", prompt_tokens=9, completion_tokens=2, logprobs=lps
    )
    head = {"id": "chatcmpl-x", "created": 1}
    chat = ChatCompletion.model_validate({**head, **bodies.chat_body(result, "m", 1)})
    assert chat.choices[0].message.content == "Hi!" and chat.model == "m"
    assert chat.usage.prompt_tokens == 9 and chat.usage.total_tokens == 11
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hi", "token_id:7"]
    assert content[1].logprob == bodies.FLOOR  # -inf is not JSON
    assert [t.token for t in content[0].top_logprobs] == ["Hi", "Yo"]
    assert content[0].bytes == list(b"Hi")
    plain = ChatCompletion.model_validate({**head, **bodies.chat_body(result, "m", None)})
    assert plain.choices[0].logprobs is None
    cmpl = Completion.model_validate({**head, **bodies.completion_body(result, "m", 1)})
    lp = cmpl.choices[0].logprobs
    assert lp.tokens == ["Hi", "token_id:7"] and lp.text_offset == [0, 2]
    assert lp.top_logprobs[0] == {"Hi": -0.5, "Yo": -1.2}
    assert lp.token_logprobs == [-0.5, bodies.FLOOR]
    json.dumps(bodies.completion_body(result, "m", 1), allow_nan=False)  # finite throughout


def test_several_samples_are_several_choices_and_usage_counts_them_all():
    result = Result(
        text="a",
        finish_reason="stop",
        prompt_tokens=4,
        completion_tokens=5,
        samples=[Sample("a", "stop", 2), Sample("bcd", "length", 3)],
    )
    chat = ChatCompletion.model_validate(
        {"id": "x", "created": 0, **bodies.chat_body(result, "m", None)}
    )
    assert [(c.index, c.message.content, c.finish_reason) for c in chat.choices] == [
        (0, "a", "stop"),
        (1, "bcd", "length"),
    ]
    assert chat.usage.completion_tokens == 5


def test_embedding_bodies_in_floats_and_base64():
    vectors = [np.array([0.5, -0.25, 1.0], dtype=np.float32), [0.1, 0.2, 0.3]]
    floats = CreateEmbeddingResponse.model_validate(bodies.embedding_body(vectors, "float", "m", 7))
    assert floats.data[0].embedding == [0.5, -0.25, 1.0] and floats.usage.total_tokens == 7
    b64 = bodies.embedding_body(vectors, "base64", "m", 7)
    decoded = np.frombuffer(base64.b64decode(b64["data"][1]["embedding"]), dtype="<f4")
    assert decoded.tolist() == np.asarray(vectors[1], dtype=np.float32).tolist()


def test_error_bodies():
    body = bodies.error_body(404, "model_not_found", "The model `x` does not exist.", "model")
    assert body["error"]["type"] == "invalid_request_error"
    assert bodies.error_body(500, "server_error", "m", None)["error"]["type"] == "server_error"
    err = BatchError.model_validate({"code": "c", "message": "m", "param": "p", "line": 3})
    assert err.line == 3


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("sections", "says"),
    [
        ({"task": "chat"}, "use task: generate"),
        ({"sampling": {"n": 2, "temperature": 1.0}}, "sampling.n"),
        ({"sampling": {"logprobs": 1}}, "sampling.logprobs"),
        ({"input": {"format": "openai_batch", "id_column": "id"}}, "named by custom_id"),
        (
            {"input": {"format": "openai_batch", "sampling_columns": {"max_tokens": "b"}}},
            "input.sampling_columns",
        ),
        ({"engine": {"kind": "trtllm"}}, "engine.kind vllm"),
    ],
)
def test_a_spec_on_openai_batch_input_refuses_what_lines_set(make_spec, sections, says):
    sections.setdefault("input", {"format": "openai_batch"})
    with pytest.raises(SpecError, match=says):
        make_spec(**sections)


def test_openai_output_needs_openai_input_and_the_fingerprint_knows_the_format(make_spec):
    with pytest.raises(SpecError, match="needs OpenAI Batch request files"):
        make_spec(input={"format": "jsonl"}, output={"format": "openai_batch"})
    spec = make_spec(input={"format": "openai_batch"})
    assert spec.input.id_column == "custom_id"
    plain = make_spec(input={"format": "jsonl"})
    assert spec.fingerprint() != plain.fingerprint()
    named = make_spec(input={"format": "openai_batch"}, engine={"served_model_name": "x"})
    assert named.fingerprint() != spec.fingerprint()


def test_auto_format_finds_request_files(make_spec, tmp_path, write_jsonl):
    request = {"custom_id": "a", "method": "POST", "url": CHAT, "body": {"messages": MSGS}}
    write_jsonl(tmp_path / "in" / "0.jsonl", [request])
    spec = resolve(make_spec())
    assert (spec.input.format, spec.input.id_column) == ("openai_batch", "custom_id")
    assert resolve(spec) is spec  # decided once
    plain = make_spec(input={"path": str(tmp_path / "plain" / "*.jsonl")})
    write_jsonl(tmp_path / "plain" / "0.jsonl", [{"prompt": "x"}])
    assert resolve(plain).input.format == "auto"
    with pytest.raises(SpecError, match="not OpenAI Batch request lines"):
        resolve(
            make_spec(input={"path": str(tmp_path / "plain")}, output={"format": "openai_batch"})
        )
    with pytest.raises(SpecError, match="sampling.n"):  # checked as such a job once found
        resolve(make_spec(sampling={"n": 2, "temperature": 1.0}))


def test_preflight_reads_whole_files(tmp_path, write_jsonl):
    ok = {"custom_id": "a", "method": "POST", "url": CHAT, "body": {}}
    write_jsonl(
        tmp_path / "a.jsonl",
        [ok, {**ok, "custom_id": "b"}, {**ok, "url": "/v1/embeddings", "custom_id": "c"}],
    )
    assert preflight(list_shards(str(tmp_path / "a.jsonl"))) == {CHAT: 2, "/v1/embeddings": 1}
    write_jsonl(tmp_path / "d.jsonl", [ok, {**ok, "custom_id": "b"}, ok])
    with pytest.raises(
        InputError, match=r"custom_id repeated: 'a' on .*d.jsonl line 1 and .*line 3"
    ):
        preflight(list_shards(str(tmp_path / "d.jsonl")))
    write_jsonl(tmp_path / "n.jsonl", [ok, {"method": "POST"}])
    with pytest.raises(InputError, match=r"n.jsonl line 2: no custom_id"):
        preflight(list_shards(str(tmp_path / "n.jsonl")))
    (tmp_path / "j.jsonl").write_text(json.dumps(ok) + "\n{oops\n")
    with pytest.raises(InputError, match=r"j.jsonl line 2: not valid JSON"):
        preflight(list_shards(str(tmp_path / "j.jsonl")))
