"""OpenAI Batch files end to end on the real vLLM CPU engine and a real local Ray.

``batchjobs run-batch`` runs a file that mixes chat, completions and embeddings lines
(and bad ones) as a subprocess, exactly as a user types it: a pass on a generating engine,
a pass on a pooling engine of the same model, one output file. ``batchjobs run`` on a
directory of request files (``input.format: auto``) writes ``_openai/batch_output.jsonl``
and ``batch_errors.jsonl``; its two runs share one engine (``EngineHost``,
shared_engine.py), as the eval tests do. Every output line is parsed with the ``openai``
package's own types.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pytest
from conftest import REPO, spec_dict
from openai.types import BatchError, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from shared_engine import attach, register, started_host

pytestmark = pytest.mark.integration

CHAT, CMPL, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
TYPES = {"chat.completion": ChatCompletion, "text_completion": Completion}
SERVED = "tiny"
SYSTEM = {"role": "system", "content": "Answer briefly."}


def req(cid: str, url: str = CHAT, method: str = "POST", **body) -> dict:
    return {"custom_id": cid, "method": method, "url": url, "body": {"model": SERVED, **body}}


def chat(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


MIXED = [
    *(req(f"c{i}", messages=chat(f"question {i}"), max_tokens=6, temperature=0) for i in range(4)),
    req("c-n2", messages=chat("two names"), n=2, temperature=0.8, seed=3, max_tokens=4),
    req(
        "c-logprobs",
        messages=chat("yes?"),
        logprobs=True,
        top_logprobs=2,
        max_tokens=3,
        temperature=0,
    ),
    req(
        "c-json",
        messages=chat("a json"),
        response_format={"type": "json_object"},
        max_tokens=8,
        temperature=0,
    ),
    req("p-text", CMPL, prompt="Once upon a time", max_tokens=5, temperature=0),
    req("p-ids", CMPL, prompt=[1, 40, 41, 42], logprobs=1, max_tokens=4, temperature=0),
    req("p-default", CMPL, prompt="The river", temperature=0),  # max_tokens: OpenAI's 16
    req("e-one", EMB, input="a document about shards"),
    req("e-b64", EMB, input=["first", "second document"], encoding_format="base64"),
    req("e-dims", EMB, input="matryoshka", dimensions=16),
    req("bad-field", messages=chat("hi"), logit_bias={"5": 1}),
    req("bad-model", model="gpt-4o", messages=chat("hi")),
    req("bad-url", "/v1/moderations", input="hi"),
    req("bad-method", method="GET", messages=chat("hi")),
    req("bad-long", messages=chat("word " * 300), max_tokens=4),  # > max_model_len 256
    req("bad-dims", EMB, input="x", dimensions=100000),
    req("e-long", EMB, input="word " * 300),  # run-batch refuses it, as vLLM's server does
]
ERRORS = {  # custom_id: (status, error code, param)
    "bad-field": (400, "unsupported_parameter", "logit_bias"),
    "bad-model": (404, "model_not_found", "model"),
    "bad-url": (400, "invalid_url", "url"),
    "bad-method": (400, "invalid_method", "method"),
    "bad-long": (400, "context_length_exceeded", "messages"),
    "bad-dims": (400, "invalid_request_error", None),
    "e-long": (400, "context_length_exceeded", "input"),
}


def check_lines(data: bytes) -> list[dict]:
    """Every line parsed with the openai types: a result's body by its object, an error as
    a BatchError (and its HTTP answer's status)."""
    lines = [json.loads(x) for x in data.decode().splitlines()]
    for x in lines:
        assert set(x) == {"id", "custom_id", "response", "error"}
        if x["error"] is None:
            assert x["response"]["status_code"] == 200
            body = x["response"]["body"]
            if body["object"] == "list":  # base64 vectors decoded, as the openai client does
                body = {**body, "data": [{**d, "embedding": decoded(d)} for d in body["data"]]}
            TYPES.get(body["object"], CreateEmbeddingResponse).model_validate(body)
        else:
            BatchError.model_validate(x["error"])
            assert x["response"]["status_code"] >= 400
            assert x["response"]["body"]["error"]["message"] == x["error"]["message"]
    return lines


def decoded(item: dict) -> list[float]:
    vector = item["embedding"]
    if isinstance(vector, str):
        return np.frombuffer(base64.b64decode(vector), "<f4").tolist()
    return vector


def parquet_rows(root: Path) -> dict[str, dict]:
    return {
        r["custom_id"]: r for r in pds.dataset(str(root), format="parquet").to_table().to_pylist()
    }


@pytest.fixture(scope="module")
def run_batch(tiny_model, tmp_path_factory):
    """The mixed file through `batchjobs run-batch` once; returns (command, workdir, output,
    process). The model is the tiny model declared Matryoshka, so `dimensions` applies."""
    tmp = tmp_path_factory.mktemp("run-batch")
    model = tmp / "tiny-matryoshka"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "is_matryoshka": True}))
    src = tmp / "requests.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in MIXED))
    out = tmp / "results.jsonl"
    cmd = [
        sys.executable, "-m", "batchjobs.cli", "run-batch",
        "-i", str(src), "-o", str(out), "--model", str(model), "--served-model-name", SERVED,
        "--max-model-len", "256", "--enforce-eager", "--shard-rows", "5", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cmd, env, out, proc


def test_run_batch_on_a_mixed_file_matches_the_openai_types_and_the_parquet(run_batch, tokenizer):
    cmd, env, out, proc = run_batch
    assert f"run-batch: {len(MIXED)} lines ({len(ERRORS)} errors) written to {out}" in proc.stdout
    assert "pass 1 of 2: 15 chat and completions lines" in proc.stderr
    assert "pass 2 of 2: 5 embeddings lines" in proc.stderr
    data = out.read_bytes()
    lines = check_lines(data)
    # every custom_id exactly once, in input order
    assert [x["custom_id"] for x in lines] == [x["custom_id"] for x in MIXED]
    assert len({x["id"] for x in lines}) == len(lines)
    by_id = {x["custom_id"]: x for x in lines}
    for cid, (status, code, param) in ERRORS.items():
        err = by_id[cid]["error"]
        assert (by_id[cid]["response"]["status_code"], err["code"], err["param"]) == (
            status,
            code,
            param,
        ), cid
        assert err["line"] == 1 + [x["custom_id"] for x in MIXED].index(cid)
        assert err["message"].startswith(f"{out.parent / 'requests.jsonl'} line {err['line']}: ")
    assert "logit_bias: not supported by batchjobs" in by_id["bad-field"]["error"]["message"]
    assert "dimensions" in by_id["bad-dims"]["error"]["message"]  # vLLM's own check

    # usage is what the Parquet shards hold, and the tokenizer's count of the prompt
    state = Path(f"{out}.batchjobs")
    generated, embedded = parquet_rows(state / "generate"), parquet_rows(state / "embed")
    assert len(generated) == len(embedded) == len(MIXED)
    for cid, line in by_id.items():
        if line["error"] is not None:
            continue
        body, usage = line["response"]["body"], line["response"]["body"]["usage"]
        row = (embedded if body["object"] == "list" else generated)[cid]
        assert row["status_code"] == 200 and row["error"] is None
        assert usage["prompt_tokens"] == row["prompt_tokens"], cid
        if body["object"] != "list":
            assert usage["completion_tokens"] == row["completion_tokens"], cid
            assert body["model"] == SERVED and body["choices"][0]["finish_reason"] in (
                "stop",
                "length",
            )
    request = {x["custom_id"]: x["body"] for x in MIXED}
    for cid in ("c0", "c-logprobs"):
        ids = tokenizer.apply_chat_template(
            request[cid]["messages"], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert by_id[cid]["response"]["body"]["usage"]["prompt_tokens"] == len(ids)
    assert generated["p-text"]["prompt_tokens"] == len(tokenizer("Once upon a time").input_ids)
    assert generated["p-ids"]["prompt_tokens"] == 4
    assert 1 <= generated["p-default"]["completion_tokens"] <= 16

    body = {cid: by_id[cid]["response"]["body"] for cid in by_id if by_id[cid]["error"] is None}
    assert len(body["c-n2"]["choices"]) == 2
    content = body["c-logprobs"]["choices"][0]["logprobs"]["content"]
    assert len(content) == body["c-logprobs"]["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    lp = body["p-ids"]["choices"][0]["logprobs"]
    assert (
        len(lp["tokens"])
        == len(lp["token_logprobs"])
        == body["p-ids"]["usage"]["completion_tokens"]
    )
    assert body["c0"]["choices"][0]["logprobs"] is None
    one = np.array(body["e-one"]["data"][0]["embedding"])
    assert one.shape == (128,) and abs(np.linalg.norm(one) - 1) < 1e-3
    b64 = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["e-b64"]["data"]]
    assert [v.shape for v in b64] == [(128,), (128,)]
    assert np.allclose([np.linalg.norm(v) for v in b64], 1, atol=1e-3)
    dims = np.array(body["e-dims"]["data"][0]["embedding"])
    assert dims.shape == (16,) and abs(np.linalg.norm(dims) - 1) < 1e-3

    # the same command again: every shard of both passes is committed, no engine starts,
    # and the file comes out the same, byte for byte
    out.unlink()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("shards: 0 run, 4 skipped") == 2
    assert out.read_bytes() == data


# --------------------------------------------------------------------------- batchjobs run

HOST = "batchjobs-openai-test-engine"


def hosted_engine(spec):
    """engine_factory: the module's engine, stating its max_model_len."""
    return attach(HOST, spec, context=True)


def job_spec(model: Path, inp: Path, out: Path) -> dict:
    # float32 and one request in the engine at a time: a shard run again gives the same
    # tokens (bfloat16 results move with the batch a request lands in)
    return spec_dict(
        model,
        str(inp),
        str(out),
        engine={"enable_prefix_caching": False, "dtype": "float32", "served_model_name": SERVED},
        sampling={"max_tokens": 5, "temperature": 0.0},
        resources={"batch_size": 4, "max_inflight_requests": 1, "rows_per_file": 4},
    )


@pytest.fixture(scope="module")
def engine_host(tiny_model, ray_session, tmp_path_factory):
    from batchjobs.spec import parse_spec

    register(__name__)  # workers cannot import tests
    tmp = tmp_path_factory.mktemp("host")
    (tmp / "in").mkdir()
    (tmp / "in" / "r.jsonl").write_text(json.dumps(req("x", messages=chat("x"))) + "\n")
    raw = job_spec(tiny_model, tmp / "in", tmp / "out")
    raw["input"]["format"] = "openai_batch"
    with started_host(HOST, parse_spec(raw), max_concurrency=100) as host:
        yield host


def test_run_writes_batch_files_and_a_resumed_job_writes_the_same(
    tmp_path, tiny_model, engine_host
):
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    a = [req(f"a{i}", messages=chat(f"a {i}")) for i in range(5)] + [req("a-emb", EMB, input="x")]
    b = [req(f"b{i}", CMPL, prompt=f"b {i}", max_tokens=4) for i in range(4)] + [
        req("b-bad", messages=chat("x"), tools=[])
    ]
    for name, rows in (("a.jsonl", a), ("b.jsonl", b)):
        (inp / name).write_text("".join(json.dumps(x) + "\n" for x in rows))
    spec = parse_spec(job_spec(tiny_model, inp, out))
    assert spec.input.format == "auto"  # found to be OpenAI Batch requests when run
    summary = run(spec, engine_factory=hosted_engine)
    assert (summary.rows, summary.error_rows, summary.shards_run) == (11, 2, 2)
    files = out / "_openai"
    good, bad = (
        (files / "batch_output.jsonl").read_bytes(),
        (files / "batch_errors.jsonl").read_bytes(),
    )
    ok, errors = check_lines(good), check_lines(bad)
    assert sorted(x["custom_id"] for x in ok + errors) == sorted(x["custom_id"] for x in a + b)
    assert [x["custom_id"] for x in errors] == ["a-emb", "b-bad"]
    assert "task: embed" in errors[0]["error"]["message"] and errors[1]["error"]["param"] == "tools"
    info = summary.metrics["openai_batch"]
    assert (info["lines"], info["error_lines"]) == (9, 2)
    assert {x["response"]["body"]["model"] for x in ok} == {SERVED}
    assert pds.dataset(str(out), format="parquet").to_table().num_rows == 11  # _openai: not Parquet

    # As a crash leaves it after shard a committed: b's output and record gone, no files.
    manifest = out / "_manifest.jsonl"
    records = [json.loads(x) for x in manifest.read_text().splitlines()]
    (b_rec,) = [r for r in records if "b.jsonl" in r["source"]]
    shutil.rmtree(out / b_rec["shard_id"])
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records if r is not b_rec))
    for name in ("batch_output.jsonl", "batch_errors.jsonl"):
        (files / name).unlink()
    again = run(spec, engine_factory=hosted_engine)
    assert (again.shards_run, again.shards_skipped) == (1, 1)
    assert (files / "batch_output.jsonl").read_bytes() == good
    assert (files / "batch_errors.jsonl").read_bytes() == bad
