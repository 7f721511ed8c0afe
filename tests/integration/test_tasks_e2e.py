"""Chat and embedding jobs end to end on a real local Ray and the real vLLM CPU engine."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from conftest import spec_dict
from test_faults import _engine_actor_pids

pytestmark = pytest.mark.integration

# The engine in Ray Data's actor: the placement on CPU.
POOL_ACTOR = "ray::MapWorker(MapBatches(EngineStage))"


def _docs(inp: Path, shards: int, rows: int) -> dict[str, str]:
    """JSON Lines shards of documents of 5-60 words; row "d-0-7" is 600 words (longer than
    the test engine's max_model_len of 256 tokens), "d-1-3" is blank."""
    inp.mkdir()
    rng = np.random.default_rng(3)
    words = [
        "job",
        "shard",
        "row",
        "engine",
        "batch",
        "vector",
        "search",
        "index",
        "query",
        "cost",
        "token",
        "cluster",
    ]
    docs = {}
    for s in range(shards):
        with open(inp / f"{s}.jsonl", "w") as fh:
            for i in range(rows):
                n = 600 if (s, i) == (0, 7) else int(rng.integers(5, 60))
                text = " ".join(rng.choice(words, n)) if (s, i) != (1, 3) else "  "
                docs[f"d-{s}-{i}"] = text
                fh.write(json.dumps({"doc": f"d-{s}-{i}", "body": text}) + "\n")
    return docs


def test_embed_job_matches_raw_llm_embed_and_survives_an_engine_kill(
    tmp_path, tiny_model, ray_session
):
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    docs = _docs(tmp_path / "in", shards=2, rows=150)
    out_root = tmp_path / "out"
    spec = parse_spec(
        spec_dict(
            tiny_model,
            str(tmp_path / "in"),
            str(out_root),
            task="embed",
            input={"prompt_column": "body", "id_column": "doc"},
            # one small batch at a time, so that the kill below lands mid-job
            resources={"batch_size": 2, "max_inflight_batches": 1, "rows_per_file": 2},
        )
    )
    kills: list[int] = []
    finished = threading.Event()

    def killer() -> None:
        while not finished.is_set():
            staged = list(out_root.glob("_staging/*/*.parquet")) + list(
                out_root.glob("*/*.parquet")
            )
            pids = _engine_actor_pids(POOL_ACTOR)
            if len(staged) >= 10 and pids:
                os.kill(pids[0], signal.SIGKILL)
                kills.append(pids[0])
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        summary = run(spec, placement="pool")
    finally:
        finished.set()
    assert kills, "the engine was not killed mid-job"

    out = pds.dataset(str(out_root), format="parquet").to_table()
    rows = {r["doc"]: r for r in out.to_pylist()}
    assert len(rows) == out.num_rows == len(docs) == 300  # each document once, after the kill
    assert summary.rows == 300 and summary.error_rows == 1
    assert "'body' is empty" in rows["d-1-3"]["error"] and rows["d-1-3"]["embedding"] is None
    assert rows["d-0-7"]["truncated"] and rows["d-0-7"]["prompt_tokens"] == 256
    assert sum(r["truncated"] for r in rows.values()) == 1
    # row_index still points at each document's line after the prefix sort
    for r in out.to_pylist():
        assert r["doc"] == f"d-{0 if r['shard_id'].startswith('0') else 1}-{r['row_index']}"

    typ = out.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(typ) and typ.value_type == pa.float32()
    dim = typ.list_size
    files = list(out_root.glob("*/*.parquet"))
    assert pq.read_schema(files[0]).metadata[b"batchjobs.embedding.dim"] == str(dim).encode()
    assert summary.output_metadata["batchjobs.embedding.dim"] == str(dim)
    manifest = [json.loads(x) for x in (out_root / "_manifest.jsonl").read_text().splitlines()]
    assert all(m["completion_tokens"] == 0 and m["prompt_tokens"] > 0 for m in manifest)

    ok = sorted(k for k, r in rows.items() if r["error"] is None and not r["truncated"])
    got = np.array([rows[k]["embedding"] for k in ok], dtype=np.float32)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)

    # The same documents through raw vLLM (LLM.embed) in this process.
    from vllm import LLM

    # vLLM sets its start-method variable in this process (spawn, as Ray is up); a Ray started
    # later by another module would pass it to every worker and turn the warm start off.
    environ = dict(os.environ)
    llm = LLM(
        model=str(tiny_model),
        runner="pooling",
        convert="embed",
        max_model_len=256,
        enforce_eager=True,
    )
    try:
        raw = llm.embed([docs[k] for k in ok], use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        os.environ.clear()
        os.environ.update(environ)
    want = np.array([r.outputs.embedding for r in raw], dtype=np.float32)
    assert [len(r.prompt_token_ids) for r in raw] == [rows[k]["prompt_tokens"] for k in ok]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_chat_job_renders_like_the_tokenizer_and_flags_bad_conversations(
    tmp_path, tiny_model, tokenizer, ray_session
):
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    inp = tmp_path / "in"
    inp.mkdir()
    conversations = {
        f"c-{i}": [{"role": "user", "content": f"explain shard {i} of the nightly job"}]
        for i in range(20)
    }
    conversations["c-sys"] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is a replica"},
    ]
    # Parquet list<struct<role, content>>
    pq.write_table(
        pa.table({"id": list(conversations), "messages": list(conversations.values())}),
        inp / "a.parquet",
    )
    with open(inp / "b.jsonl", "w") as fh:
        fh.write(json.dumps({"id": "b-ok", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
        fh.write(json.dumps({"id": "b-role", "messages": [{"role": "wizard", "content": "x"}]}))
        fh.write("\n" + json.dumps({"id": "b-str", "messages": "just a string"}) + "\n")
        fh.write(json.dumps({"id": "b-none", "messages": [{"role": "user"}]}) + "\n")
    spec = parse_spec(
        spec_dict(
            tiny_model,
            str(inp),
            str(tmp_path / "out"),
            task="chat",
            input={"id_column": "id"},
            chat={"system_prompt": "You are terse."},
        )
    )
    summary = run(spec)
    out = pds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    rows = {r["id"]: r for r in out.to_pylist()}
    assert len(rows) == out.num_rows == 25 and summary.error_rows == 3
    assert "message 0 has role 'wizard'" in rows["b-role"]["error"]
    assert "line 2" in rows["b-role"]["error"] and "'messages'" in rows["b-role"]["error"]
    assert "is str, expected a list" in rows["b-str"]["error"]
    assert "message 0 (user) has no content" in rows["b-none"]["error"]
    for key, messages in conversations.items():
        r = rows[key]
        assert r["error"] is None and r["completion_tokens"] >= 1
        with_system = (
            messages
            if messages[0]["role"] == "system"
            else [
                {"role": "system", "content": "You are terse."},
                *messages,
            ]
        )
        ids = tokenizer.apply_chat_template(
            with_system, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert r["prompt_tokens"] == len(ids), key
