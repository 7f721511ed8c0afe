"""`bench/embed_bench.py`: documents of the asked token lengths, the `task: embed` spec it
runs, what it reads back from a batchjobs output root, and the ratios it prints."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

BENCH = Path(__file__).resolve().parents[2] / "bench" / "embed_bench.py"


@pytest.fixture(scope="module")
def eb():
    spec = importlib.util.spec_from_file_location("embed_bench_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def word_tokens(word: str, first: bool) -> int:
    """A stand-in tokenizer's count: one token per four letters, one more for a long word at
    the start of a text (so short words cost one token, as " the" does in a BPE vocabulary)."""
    return -(-len(word) // 4) + (1 if first and len(word) > 4 else 0)


def test_documents_hit_their_token_targets(eb):
    rows, counts = eb.make_docs(word_tokens, 2, 500, 64, 512, seed=3)

    assert len(rows) == len(counts) == 500
    assert len({r["doc_id"] for r in rows}) == 500
    assert all(64 <= n <= 512 for n in counts)
    assert min(counts) < 70 and max(counts) > 500  # spread over the range
    for row, n in zip(rows, counts):
        words = row["text"].split(" ")
        assert set(words) <= set(eb.VOCAB)
        planned = 2 + word_tokens(words[0], True)
        planned += sum(word_tokens(w, False) for w in words[1:])
        assert planned == n
    again, _ = eb.make_docs(word_tokens, 2, 500, 64, 512, seed=3)
    other, _ = eb.make_docs(word_tokens, 2, 500, 64, 512, seed=4)
    assert again == rows and other != rows


def args(**kw) -> argparse.Namespace:
    base = dict(
        model="/models/qwen3",
        dtype="bfloat16",
        max_model_len=512,
        load_format="dummy",
        engine_args="{}",
        spec_engine="{}",
        resources="{}",
        batch_size=256,
    )
    return argparse.Namespace(**{**base, **kw})


def test_the_embed_spec_is_a_valid_job(eb, tmp_path, model_dir):
    from batchjobs.spec import load_spec

    rows, _ = eb.make_docs(word_tokens, 0, 40, 64, 128)
    data = tmp_path / "docs"
    eb.write_shards(rows, data, 4)
    assert len(list(data.glob("*.parquet"))) == 4
    assert eb.read_docs(data)[0] == [r["doc_id"] for r in rows]

    spec = eb.embed_spec(args(model=str(model_dir)), data, tmp_path / "out")
    path = tmp_path / "embed.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = load_spec(path)

    assert job.task == "embed"
    assert (job.input.prompt_column, job.input.id_column) == ("text", "doc_id")
    assert job.engine.args == {"load_format": "dummy"}
    assert (job.engine.dtype, job.engine.max_model_len) == ("bfloat16", 512)
    assert (job.embed.normalize, job.embed.truncate) == (True, "end")
    assert (job.resources.replicas, job.resources.batch_size) == (1, 256)


def write_output_root(root: Path, dim: int = 4) -> None:
    """Two committed shards as batchjobs writes them, with one error row, and files that
    readers skip (``_``-names)."""
    vec = pa.list_(pa.float32(), dim)
    for shard, ids in (("s0", ["d0", "d1"]), ("s1", ["d2", "d3", "d4"])):
        (root / shard).mkdir(parents=True)
        n = len(ids)
        table = pa.table(
            {
                "doc_id": ids,
                "embedding": pa.array(
                    [[float(i)] * dim for i in range(n)]
                    if shard == "s0"
                    else [[1.0] * dim, None, [2.0] * dim],
                    type=vec,
                ),
                "prompt_tokens": pa.array([10] * n, pa.int64()),
                "error": pa.array(
                    [None] * n if shard == "s0" else [None, "too long", None], pa.string()
                ),
            }
        )
        pq.write_table(table, root / shard / "part-0.parquet")
    (root / "_manifest.jsonl").write_text("{}\n")


def test_a_batchjobs_output_root_read_back(eb, tmp_path):
    root = tmp_path / "out"
    write_output_root(root)
    summary = tmp_path / "summary.json"
    replicas = {"r0": {"ready_at": 1000.0}, "r1": {"ready_at": 1004.0}}
    summary.write_text(json.dumps({"teardown_s": 3.0, "wall_s": 50.0, "replicas": replicas}))
    os.utime(summary, (1100.0, 1100.0))

    r = eb.batchjobs_result(root, summary, t0=990.0)

    assert (r["docs"], r["distinct_ids"], r["error_rows"]) == (5, 5, 1)
    assert r["prompt_tokens"] == 50
    assert r["dim"] == 4 and "fixed_size_list" in r["embedding_type"]
    assert r["ready_at"] == 1004.0  # every replica ready
    assert r["end_at"] == pytest.approx(1097.0)  # the summary's time less the teardown
    assert sorted(r["sample"]) == ["d0", "d1", "d2", "d3", "d4"]
    assert r["sample"]["d1"] == [1.0] * 4


def run(eb, mode: str, wall: float, start: float, docs: int = 100, total: int = 0) -> dict:
    """A finished mode's row as run_mode leaves it (30 tokens a document)."""
    r = {"mode": mode, "wall_s": wall, "startup_s": start, "docs": docs, "prompt_tokens": 30 * docs}
    if total:
        r["docs_total"] = total
    return {**r, **eb.rates(r)}


def test_ratios_to_raw_end_to_end_and_without_start_up(eb):
    raw, bj = run(eb, "raw", 100.0, 40.0), run(eb, "batchjobs", 120.0, 50.0)

    q = eb.ratios(raw, bj)

    assert q["e2e"] == pytest.approx(100 / 120)
    assert q["ex_start"] == pytest.approx(60 / 70)
    assert eb.ratios(raw, raw) == {"e2e": 1.0, "ex_start": 1.0}


def test_a_mode_stopped_at_its_deadline_is_projected_to_every_document(eb):
    raw = run(eb, "raw", 100.0, 40.0)
    st = run(eb, "st", 70.0, 10.0, docs=25, total=100)  # a quarter of the documents in 60 s

    assert st["share_done"] == 0.25
    assert st["wall_all_s"] == pytest.approx(10 + 240)
    q = eb.ratios(raw, st)
    assert q["e2e"] == pytest.approx(100 / 250)
    assert q["ex_start"] == pytest.approx((25 / 60) / (100 / 60))


def test_vectors_check_tells_matching_documents_from_swapped_ones(eb):
    a = {"d0": [1.0, 0.0, 0.0], "d1": [0.0, 1.0, 0.0], "d2": [0.0, 0.0, 1.0]}
    same = eb.cosine_check(a, {k: [2 * x for x in v] for k, v in a.items()})
    swapped = eb.cosine_check(a, {"d0": a["d1"], "d1": a["d0"], "d2": a["d2"]})

    assert same["docs"] == 3 and same["min_cos_same_doc"] == pytest.approx(1.0)
    assert same["mean_cos_other_doc"] == pytest.approx(0.0)
    assert swapped["min_cos_same_doc"] == pytest.approx(0.0)
    assert eb.cosine_check(a, {}) is None


def test_table_marks_a_failed_mode_and_a_partial_one(eb, capsys):
    results = [
        run(eb, "raw", 100.0, 40.0),
        {"mode": "batchjobs", "rc": 4},
        run(eb, "st", 70.0, 10.0, docs=25, total=100),
    ]

    q = eb.print_table(results)

    out = capsys.readouterr().out
    assert "batchjobs  FAILED rc=4" in out
    assert "25% of docs" in out
    assert set(q) == {"raw", "st"}
