"""OpenAI Batch rows through an engine replica with fake engines (batchjobs/openai_batch/
tasks.py), the batch output files assembled from committed shards (files.py), and
run-batch's cut of the request file and its one output file (split.py, runbatch.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import BatchError, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from typer.testing import CliRunner

from batchjobs.engines.base import Engine, Request, Result
from batchjobs.errors import InputError
from batchjobs.manifest import COMMITTED, Manifest, ShardRecord
from batchjobs.openai_batch import files
from batchjobs.openai_batch.runbatch import model_defaults, pass_spec
from batchjobs.openai_batch.split import assemble, split_input
from batchjobs.readers import list_shards, read_shard
from batchjobs.sink import OutputRoot, output_table
from batchjobs.tasks import task_for

CHAT, CMPL, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
BODY_TYPES = {CHAT: ChatCompletion, CMPL: Completion, EMB: CreateEmbeddingResponse}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class FakeEngine(Engine):
    """Generates "n<prompt tokens>" and embeds a prompt as [its length, 0, 0]; records the
    requests it was given."""

    kind = "fake"

    def __init__(self):
        self.requests: list[Request] = []

    async def generate(self, request: Request) -> Result:
        self.requests.append(request)
        n = len(request.token_ids)
        return Result.finished(f"n{n}", 3, "length", {"length": "length"}, n, 0.01)

    async def embed(self, request: Request) -> Result:
        self.requests.append(request)
        n = len(request.token_ids)
        return Result(finish_reason="stop", prompt_tokens=n, embedding=np.array([n, 0, 0], "f4"))

    def close(self) -> None:
        pass

    def max_model_len(self) -> int | None:
        return 64


def req(cid: str, url: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


MSGS = [{"role": "user", "content": "hi there"}]
LINES = [
    req("c1", CHAT, messages=MSGS, max_tokens=5),
    req("c2", CHAT, messages=MSGS),  # max_tokens: the job's, cut to the room left
    req("p1", CMPL, prompt="Once upon a time"),  # max_tokens: 16, as OpenAI's default
    req("p2", CMPL, prompt="x " * 80),  # longer than the context of 64
    req("e1", EMB, input=["one", "two words"]),
    req("bad", CHAT, messages=MSGS, logit_bias={"1": 1}),
    req("greedy-n", CHAT, messages=MSGS, n=2),  # temperature 0 (the job's): refused
]


def through_replica(spec, path: Path, engine: FakeEngine) -> tuple:
    from batchjobs.actor import EngineReplica

    board = NS(report=NS(remote=lambda *a: None))
    replica = EngineReplica(spec, lambda _: engine, board)
    try:
        (shard,) = list_shards(str(path), spec.input.format)
        outs = [replica(b) for b in read_shard(shard, task_for(spec).input_columns(), 3)]
    finally:
        replica.close()
    return shard, pa.concat_tables(outs)


@pytest.fixture
def openai_spec(make_spec, tiny_tokenizer_dir, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "in" / "req.jsonl", LINES)

    def _spec(task="generate", **sections):
        engine = {"model": str(tiny_tokenizer_dir), **sections.pop("engine", {})}
        spec = make_spec(task=task, engine=engine, input={"format": "openai_batch"}, **sections)
        return spec, path

    return _spec


def test_generate_rows_through_a_replica(openai_spec, tiny_tokenizer_dir):
    spec, path = openai_spec(sampling={"max_tokens": 200, "temperature": 0.0})
    engine = FakeEngine()
    shard, out = through_replica(spec, path, engine)
    task = task_for(spec)
    assert out.schema.names[4:-1] == list(task.output_fields())
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert list(rows) == [x["custom_id"] for x in LINES]
    by_id = {r.request_id.split("#")[0]: r for r in engine.requests}
    assert set(by_id) == {"c1", "c2", "p1"}  # refused lines never reach the engine
    room = 64 - len(by_id["c2"].token_ids)
    assert by_id["c1"].params["max_tokens"] == 5
    assert by_id["c2"].params["max_tokens"] == room  # 200 does not fit: cut as vLLM does
    assert by_id["p1"].params["max_tokens"] == 16
    c1 = rows["c1"]
    assert (c1["status_code"], c1["text"], c1["error"], c1["url"], c1["line"]) == (
        200,
        c1["text"],
        None,
        CHAT,
        1,
    )
    body = ChatCompletion.model_validate({"id": "x", "created": 0, **json.loads(c1["response"])})
    assert body.usage.prompt_tokens == c1["prompt_tokens"] and body.model == tiny_tokenizer_dir.name
    assert (
        rows["p2"]["status_code"] == 400 and rows["p2"]["error_code"] == "context_length_exceeded"
    )
    assert rows["bad"]["error"] == f"{shard.url} line 6: " + rows["bad"]["error"].split(": ", 1)[1]
    assert (rows["bad"]["error_param"], rows["bad"]["status_code"]) == ("logit_bias", 400)
    assert rows["greedy-n"]["error_param"] == "n"
    assert rows["e1"]["error_code"] == "unsupported_endpoint"
    assert [rows[k]["finish_reason"] for k in ("c1", "bad")] == ["length", "error"]


def test_embed_rows_through_a_replica_several_inputs_per_line(openai_spec):
    spec, path = openai_spec(task="embed", embed={"truncate": "error"})
    engine = FakeEngine()
    _, out = through_replica(spec, path, engine)
    rows = {r["row_id"]: r for r in out.to_pylist()}
    e1 = rows["e1"]
    assert e1["status_code"] == 200 and len(e1["embeddings"]) == 2
    assert [v[0] for v in e1["embeddings"]] == [float(len(r.token_ids)) for r in engine.requests]
    assert e1["prompt_tokens"] == sum(len(r.token_ids) for r in engine.requests)
    assert {rows[k]["error_code"] for k in ("c1", "p1", "bad")} == {"unsupported_endpoint"}


def commit_shard(root: Path, shard, table: pa.Table) -> ShardRecord:
    """Write a replica's output as a committed shard of the output root, as the sink and
    the tracker do."""
    folder = root / shard.shard_id
    folder.mkdir(parents=True)
    pq.write_table(output_table(table, "custom_id", {}), folder / "part.parquet")
    rec = ShardRecord(
        shard_id=shard.shard_id,
        source=shard.url,
        status=COMMITTED,
        files=[str(folder / "part.parquet")],
    )
    Manifest(OutputRoot(str(root))).commit(rec)
    return rec


def parse_lines(data: bytes) -> list[dict]:
    """Every line parsed with the openai types: the body by its endpoint, the error as a
    BatchError."""
    lines = [json.loads(x) for x in data.decode().splitlines()]
    for x in lines:
        if x["error"] is None:
            body = x["response"]["body"]
            kind = {"chat.completion": CHAT, "text_completion": CMPL, "list": EMB}[body["object"]]
            BODY_TYPES[kind].model_validate(body)
        else:
            BatchError.model_validate(x["error"])
            assert x["response"]["status_code"] >= 400
    return lines


def test_batch_files_from_committed_shards_are_the_same_bytes_every_time(openai_spec, tmp_path):
    spec, path = openai_spec()
    shard, table = through_replica(spec, path, FakeEngine())
    root = tmp_path / "out"
    rec = commit_shard(root, shard, table)
    out = OutputRoot(str(root))
    task_for(spec).begin(out)  # the job's creation time, once
    info = files.write_job_files(out, {rec.shard_id: rec})
    good = (root / "_openai" / "batch_output.jsonl").read_bytes()
    bad = (root / "_openai" / "batch_errors.jsonl").read_bytes()
    ok, err = parse_lines(good), parse_lines(bad)
    assert [x["custom_id"] for x in ok] == ["c1", "c2", "p1"]
    assert [x["custom_id"] for x in err] == ["p2", "e1", "bad", "greedy-n"]
    assert (info["lines"], info["error_lines"]) == (3, 4)
    assert err[2]["error"]["line"] == 6 and err[2]["error"]["param"] == "logit_bias"
    assert len({x["id"] for x in ok + err}) == 7
    created = json.loads((root / "_openai" / "job.json").read_text())["created"]
    assert {x["response"]["body"]["created"] for x in ok} == {created}
    task_for(spec).begin(out)
    files.write_job_files(out, {rec.shard_id: rec})
    assert (root / "_openai" / "batch_output.jsonl").read_bytes() == good
    assert (root / "_openai" / "batch_errors.jsonl").read_bytes() == bad
    assert not list((root / "_openai").glob(".*.tmp"))


# --------------------------------------------------------------------------- run-batch


def test_split_cuts_whole_lines_and_keeps_the_cut_for_the_same_bytes(tmp_path, write_jsonl):
    src = tmp_path / "req.jsonl"
    rows = [req(f"r{i}", CHAT if i % 3 else EMB, messages=MSGS) for i in range(7)]
    src.write_text(
        "\n".join(json.dumps(r) for r in rows[:3])
        + "\n\n"
        + "".join(json.dumps(r) + "\n" for r in rows[3:])
    )
    state = str(tmp_path / "state")
    split = split_input(str(src), state, 3)
    assert [(c["name"], c["first_line"], c["rows"]) for c in split.chunks] == [
        ("lines-000000001-000000003.jsonl", 1, 3),
        ("lines-000000005-000000007.jsonl", 5, 3),
        ("lines-000000008-000000008.jsonl", 8, 1),
    ]
    assert split.lines == {"generate": 4, "embed": 3} and split.passes == ["generate", "embed"]
    chunk = tmp_path / "state" / "input" / split.chunks[1]["name"]
    mtime = os.stat(chunk).st_mtime_ns
    assert split_input(str(src), state, 3) == split and os.stat(chunk).st_mtime_ns == mtime
    src.write_text(json.dumps(rows[0]) + "\n")
    again = split_input(str(src), state, 3)
    assert again.passes == ["embed"] and len(list((tmp_path / "state" / "input").iterdir())) == 1
    src.write_text(
        json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[0]) + "\n"
    )
    with pytest.raises(InputError, match=r"custom_id repeated: 'r0' on lines 1 and 3"):
        split_input(str(src), state, 3)


def test_assemble_takes_each_line_from_the_pass_that_serves_it(openai_spec, tmp_path):
    spec, path = openai_spec()
    state = tmp_path / "state"
    split = split_input(str(path), str(state), 4)
    shards = list_shards(str(state / "input"), "openai_batch")
    for kind in ("generate", "embed"):
        job = pass_spec(kind, str(state), {"model": spec.engine.model}, 1, None, [])
        for shard in shards:
            _, table = through_replica_shard(job, shard, FakeEngine())
            commit_shard(state / kind, shard, table)
    out = tmp_path / "results.jsonl"
    counts = assemble(split, str(state), str(out))
    lines = parse_lines(out.read_bytes())
    assert [x["custom_id"] for x in lines] == [x["custom_id"] for x in LINES]
    # run-batch's default temperature is 1, as vLLM's server has it: n=2 runs
    assert counts == {"lines": 7, "errors": 2} and lines[6]["error"] is None
    e1 = lines[4]["response"]["body"]
    assert e1["object"] == "list" and len(e1["data"]) == 2  # from the embed pass
    bad = lines[5]["error"]
    assert bad["line"] == 6 and bad["message"].startswith(f"{path} line 6: logit_bias")


def through_replica_shard(spec, shard, engine):
    from batchjobs.actor import EngineReplica

    replica = EngineReplica(spec, lambda _: engine, NS(report=NS(remote=lambda *a: None)))
    try:
        outs = [replica(b) for b in read_shard(shard, task_for(spec).input_columns(), 3)]
    finally:
        replica.close()
    return shard, pa.concat_tables(outs)


def test_pass_specs_and_vllm_defaults(tmp_path, tiny_tokenizer_dir):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    assert model_defaults(str(model), None) == {
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 1024,
    }
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    assert model_defaults(str(model), 300) == {
        "temperature": 0.6,
        "top_p": 1.0,
        "top_k": 20,
        "max_tokens": 300,
    }
    engine = {"model": str(model), "served_model_name": "m", "tensor_parallel_size": 2}
    job = pass_spec("embed", "s3://b/o.batchjobs", engine, 3, None, ['engine.env.X="1"'])
    assert (job.task, job.input.path, job.output.path) == (
        "embed",
        "s3://b/o.batchjobs/input",
        "s3://b/o.batchjobs/embed",
    )
    assert (job.engine.tensor_parallel_size, job.resources.replicas, job.engine.env) == (
        2,
        3,
        {"X": "1"},
    )
    assert job.embed.truncate == "error" and job.input.id_column == "custom_id"


def test_run_batch_command_line(tmp_path):
    from batchjobs.cli import app

    (tmp_path / "m").mkdir()
    bad = tmp_path / "req.jsonl"
    bad.write_text('{"custom_id": "a"}\nnot json\n')
    args = [
        "run-batch",
        "-i",
        str(bad),
        "-o",
        str(tmp_path / "o.jsonl"),
        "--model",
        str(tmp_path / "m"),
    ]
    result = CliRunner().invoke(app, [*args, "-tp", "2", "--replicas", "2"])
    assert result.exit_code == 3  # an unreadable input, before any engine
    assert f"{bad} line 2: not valid JSON" in result.output
    result = CliRunner().invoke(app, [*args, "--tp", "x"])
    assert result.exit_code == 2  # a usage error: the flags above were taken


def test_split_reads_and_writes_fsspec_urls(memfs):
    rows = [req(f"r{i}", CHAT, messages=MSGS) for i in range(3)]
    memfs.pipe_file("/bucket/req.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    split = split_input("memory://bucket/req.jsonl", "memory://bucket/out.jsonl.batchjobs", 2)
    assert [c["rows"] for c in split.chunks] == [2, 1]
    names = sorted(
        p.rsplit("/", 1)[1] for p in memfs.ls("/bucket/out.jsonl.batchjobs/input", detail=False)
    )
    assert names == [c["name"] for c in split.chunks]
    assert (
        memfs.cat("/bucket/out.jsonl.batchjobs/input/" + names[1])
        == (json.dumps(rows[2]) + "\n").encode()
    )
