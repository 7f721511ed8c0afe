"""Eval jobs end to end on a real local Ray and the real vLLM CPU engine.

Every job of this module runs the whole pipeline (Ray Data read, engine stage, staged
writes, commits, manifest, ``_eval.json``) through batchjobs' vLLM adapter on one real
engine: the engine is started once, in a Ray actor of its own (``EngineHost``,
shared_engine.py), and each job's replica forwards its requests to it, so the module pays
one engine start instead of one per job. The same engine also answers the raw vLLM calls
the loglikelihood test checks against (``AsyncLLM.generate`` with vLLM's own
``SamplingParams(prompt_logprobs=0)``).
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from conftest import spec_dict
from shared_engine import EngineHost, attach, register, started_host

pytestmark = pytest.mark.integration

HOST = "batchjobs-eval-test-engine"


class EvalHost(EngineHost):
    """The module's engine, which also answers raw vLLM calls."""

    async def raw_prompt_logprobs(self, token_ids: list[int], rid: str) -> list:
        """vLLM's own prompt log-probabilities of ``token_ids``: its SamplingParams and
        RequestOutput, no batchjobs code in between."""
        from vllm import SamplingParams

        final = None
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        async for out in self.engine.engine.generate({"prompt_token_ids": token_ids}, params, rid):
            final = out
        return [
            None if d is None else d[t].logprob for d, t in zip(final.prompt_logprobs, token_ids)
        ]


def hosted_engine(spec):
    """engine_factory: the module's engine; refuses a job whose sampling it would not honour."""
    return attach(HOST, spec, same_sampling=True)


@pytest.fixture(scope="module")
def engine_host(tiny_model, ray_session, tmp_path_factory):
    from batchjobs.spec import parse_spec

    register(__name__)  # workers cannot import tests
    tmp = tmp_path_factory.mktemp("host")
    spec = parse_spec(_spec(tiny_model, str(tmp / "in"), str(tmp / "out")))
    with started_host(HOST, spec, max_concurrency=1000, cls=EvalHost) as host:
        yield host


def _spec(model, inp: str, out: str, **over) -> dict:
    """The module's job settings: the engine's (one engine serves them all), greedy."""
    raw = spec_dict(
        model,
        inp,
        out,
        # float32: vLLM would run the float32 tiny model in bfloat16, whose results move
        # by ~1e-3 with the batch a request lands in; in float32 by ~1e-6
        engine={"enable_prefix_caching": False, "dtype": "float32"},
        sampling={"max_tokens": 6, "temperature": 0.0},
        resources={"batch_size": 4, "max_inflight_batches": 1, "rows_per_file": 4},
    )
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _read(root: Path) -> list[dict]:
    return pds.dataset(str(root), format="parquet").to_table().to_pylist()


# --------------------------------------------------------------------------- generate, then eval


SHARDS, ROWS = 4, 10
CHANGED = {(s, i) for s in range(SHARDS) for i in range(ROWS) if (s * ROWS + i) % 5 == 2}


def test_eval_of_generated_outputs_is_exact_and_a_resumed_job_reports_the_same(
    tmp_path, tiny_model, engine_host
):
    from batchjobs.layout import EVAL_JSON, MANIFEST, RUNS
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    # 1. generate: 4 shards of 10 prompts
    gen_in = tmp_path / "gen_in"
    gen_in.mkdir()
    prompts = {
        (s, i): f"Question {s}-{i}: what comes next after {i * 7 + s}?"
        for s in range(SHARDS)
        for i in range(ROWS)
    }
    for s in range(SHARDS):
        pq.write_table(
            pa.table(
                {
                    "id": [f"{s}-{i}" for i in range(ROWS)],
                    "prompt": [prompts[s, i] for i in range(ROWS)],
                }
            ),
            gen_in / f"{s}.parquet",
        )
    gen = parse_spec(
        _spec(tiny_model, str(gen_in), str(tmp_path / "gen"), input={"id_column": "id"})
    )
    assert run(gen, engine_factory=hosted_engine).error_rows == 0
    texts = {r["id"]: r["text"] for r in _read(tmp_path / "gen")}
    assert len(texts) == SHARDS * ROWS

    # 2. the eval input: the generated texts as references, a known subset changed
    ev_in = tmp_path / "eval_in"
    ev_in.mkdir()
    for s in range(SHARDS):
        ids = [f"{s}-{i}" for i in range(ROWS)]
        refs = [
            texts[k] + " (changed)" if (s, i) in CHANGED else texts[k] for i, k in enumerate(ids)
        ]
        part = ["changed" if (s, i) in CHANGED else "kept" for i in range(ROWS)]
        pq.write_table(
            pa.table(
                {
                    "id": ids,
                    "prompt": [prompts[s, i] for i in range(ROWS)],
                    "answer": refs,
                    "part": part,
                }
            ),
            ev_in / f"{s}.parquet",
        )
    raw = _spec(
        tiny_model,
        str(ev_in),
        str(tmp_path / "eval_a"),
        name="eval-it",
        task="eval",
        input={"id_column": "id", "order": "input"},
        eval={"reference_column": "answer", "group_by": "part", "scorers": ["exact", "normalized"]},
    )
    summary = run(parse_spec(raw), engine_factory=hosted_engine)
    report = json.loads((tmp_path / "eval_a" / EVAL_JSON).read_text())
    n, k = SHARDS * ROWS, len(CHANGED)
    assert (report["rows"], report["error_rows"], report["shards"]) == (n, 0, SHARDS)
    for name in ("exact", "normalized"):
        m = report["metrics"][name]
        assert (m["correct"], m["accuracy"]) == (n - k, (n - k) / n)  # exactly
        assert report["groups"]["kept"]["metrics"][name]["accuracy"] == 1.0
        assert report["groups"]["changed"]["metrics"][name]["accuracy"] == 0.0
    assert summary.metrics["metrics"]["exact"]["accuracy"] == (n - k) / n
    rows = {r["id"]: r for r in _read(tmp_path / "eval_a")}
    assert all(rows[k]["text"] == texts[k] for k in texts)  # the same greedy outputs
    assert {k for k, r in rows.items() if not r["exact_correct"]} == {
        f"{s}-{i}" for s, i in CHANGED
    }
    manifest = [json.loads(x) for x in (tmp_path / "eval_a" / MANIFEST).read_text().splitlines()]
    assert sum(m["metrics"]["exact.correct"] for m in manifest) == n - k
    record = json.loads((tmp_path / "eval_a" / RUNS).read_text().splitlines()[-1])
    assert record["metrics"]["metrics"]["exact"]["correct"] == n - k

    # 3. the same job interrupted after its first committed shard, then run again
    out_b = tmp_path / "eval_b"
    spec_b = parse_spec({**raw, "output": {"path": str(out_b)}})

    def interrupt(progress) -> None:
        if progress.shards_committed >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(spec_b, engine_factory=hosted_engine, on_progress=interrupt, progress_every=0)
    gc.collect()  # Ray Data's iterator of the interrupted run, and the actors it holds
    committed = [json.loads(x) for x in (out_b / MANIFEST).read_text().splitlines()]
    assert 1 <= len(committed) < SHARDS
    assert not (out_b / EVAL_JSON).exists()  # a run that did not finish reports nothing
    again = run(spec_b, engine_factory=hosted_engine)
    assert again.shards_skipped == len(committed)
    assert (out_b / EVAL_JSON).read_bytes() == (tmp_path / "eval_a" / EVAL_JSON).read_bytes()


# --------------------------------------------------------------------------- loglikelihood


MC = [
    ("The capital of France is", ["Paris", "Rome", "a small village near the sea"], 0),
    ("Water boils at", ["100 degrees", "a low temperature"], "A"),
    ("The opposite of hot is ", ["cold", "warm", "lukewarm"], "cold"),  # trailing space
    ("Two plus two equals", ["four", "five", "twenty-two", "fish"], "0"),
    ("Dogs are", ["animals", "vegetables"], 0),
    ("A week has", ["seven days", "ten days"], 0),
    ("Snow is", ["white", "black"], "E"),  # no such option: an error row
]


def test_loglikelihood_logprobs_equal_raw_vllm_prompt_logprobs(
    tmp_path, tiny_model, tokenizer, engine_host
):
    import ray

    from batchjobs.layout import EVAL_JSON
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec
    from batchjobs.tasks.loglikelihood import lm_eval_pair

    inp = tmp_path / "in"
    inp.mkdir()
    with open(inp / "mc.jsonl", "w") as fh:
        for i, (q, opts, gold) in enumerate(MC):
            fh.write(json.dumps({"id": f"m{i}", "q": q, "opts": opts, "gold": gold}) + "\n")
    spec = parse_spec(
        _spec(
            tiny_model,
            str(inp),
            str(tmp_path / "out"),
            task="eval",
            input={"id_column": "id", "prompt_column": "q"},
            eval={
                "reference_column": "gold",
                "choices_column": "opts",
                "scorers": ["loglikelihood"],
            },
        )
    )
    summary = run(spec, engine_factory=hosted_engine)
    rows = {r["id"]: r for r in _read(tmp_path / "out")}
    assert summary.error_rows == 1 and "not one of the 2 options" in rows["m6"]["error"]

    # the same prompt + choice token ids, built here, through vLLM's own API
    asked = {}
    for i, (q, opts, _gold) in enumerate(MC[:-1]):
        for j, choice in enumerate(opts):
            ctx, cont = lm_eval_pair(q, " " + choice)
            ctx_ids = tokenizer(ctx)["input_ids"]
            cont_ids = tokenizer(ctx + cont)["input_ids"][len(ctx_ids) :]
            ref = engine_host.raw_prompt_logprobs.remote(ctx_ids + cont_ids, f"raw-{i}-{j}")
            asked[i, j] = (ref, len(cont_ids))
    raw = dict(zip(asked, ray.get([ref for ref, _ in asked.values()])))
    for i, (_q, opts, _gold) in enumerate(MC[:-1]):
        row = rows[f"m{i}"]
        assert row["error"] is None
        n_cont = [asked[i, j][1] for j in range(len(opts))]
        raw_sums = [math.fsum(raw[i, j][-n_cont[j] :]) for j in range(len(opts))]
        assert row["choice_tokens"] == n_cont
        assert row["choice_logprobs"] == pytest.approx(raw_sums, abs=1e-4)
        best = max(range(len(opts)), key=lambda j: raw_sums[j])
        assert row["answer"] == best
        assert row["correct"] == (best == 0)  # every reference above names the first option
    report = json.loads((tmp_path / "out" / EVAL_JSON).read_text())
    right = sum(rows[f"m{i}"]["correct"] for i in range(len(MC)))
    assert report["metrics"]["loglikelihood"]["correct"] == right
    assert report["metrics"]["loglikelihood"]["rows"] == len(MC)  # the error row counts, wrong
    assert report["metrics"]["loglikelihood_norm"]["rows"] == len(MC)
