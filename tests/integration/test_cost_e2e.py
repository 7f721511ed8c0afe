"""Cost truth on the real vLLM CPU engine: a shard's cost follows its rows' work, not the
moment it ran (cost.py). Identical shards cost the same per token whether they ran while
the engine was full or in the job's draining tail; a shard that asks for twice the output
tokens costs about twice as much; the parts add up to the replica's time."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import spec_dict

pytestmark = pytest.mark.integration

# A long-tailed output mix: most rows short, a few long (decode tokens per row).
BUDGETS = [8, 8, 8, 8, 12, 12, 16, 16, 24, 32, 48, 96] * 2
DOUBLE = "4"  # the shard whose rows ask for twice the output tokens


def test_identical_shards_cost_the_same_and_twice_the_work_costs_twice(
    tmp_path, tiny_model, ray_session
):
    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(9):
        factor = 2 if str(k) == DOUBLE else 1
        pq.write_table(
            pa.table(
                {
                    # a different first word per shard: no shard reads another's prompts
                    # from the prefix cache
                    "prompt": _words(k),
                    "budget": [b * factor for b in BUDGETS],
                }
            ),
            inp / f"{k}.parquet",
        )
    spec = parse_spec(
        spec_dict(
            tiny_model,
            str(inp),
            str(tmp_path / "out"),
            input={"sampling_columns": {"max_tokens": "budget"}, "order": "input"},
            sampling={"max_tokens": 4, "ignore_eos": True},
            # a few requests at a time, in input order: the shards run one after another
            # and the last one drains alone
            resources={"max_inflight_requests": 8, "batch_size": 4, "max_inflight_batches": 4},
            cost={"usd_per_gpu_hour": 3.6},
        )
    )
    summary = run(spec, placement="pool")
    manifest = [
        json.loads(x) for x in (tmp_path / "out" / "_manifest.jsonl").read_text().splitlines()
    ]
    by_file = {m["source"].rsplit("/", 1)[-1].split(".")[0]: m for m in manifest}
    same = [by_file[str(k)] for k in range(9) if str(k) != DOUBLE]
    assert all(m["completion_tokens"] == sum(BUDGETS) for m in same)

    # every identical shard's $ per 1M tokens within 10 % of theirs together
    job = sum(m["cost_usd"] for m in same) / sum(
        m["prompt_tokens"] + m["completion_tokens"] for m in same
    )
    ratios = [m["cost_usd"] / (m["prompt_tokens"] + m["completion_tokens"]) / job for m in same]
    double = by_file[DOUBLE]["cost_usd"] / (sum(m["cost_usd"] for m in same) / len(same))
    print("ratios", [round(r, 3) for r in ratios], "double", round(double, 3), summary.cost_weights)
    assert all(abs(r - 1) <= 0.10 for r in ratios), ratios
    # twice the output tokens: about twice the cost (prompts, a few tokens a row against 24
    # generated on average, are the rest of the work)
    assert 1.6 <= double <= 2.05, double

    # the parts add up: rows' work + start-up + idle + under-fill = the replica's time
    (rep,) = summary.replicas.values()
    held = rep["startup_s"] + rep["idle_s"] + rep["busy_s"]
    assert summary.gpu_s == pytest.approx(held, rel=1e-6)
    assert sum(m["gpu_s"] for m in manifest) + summary.overhead_s == pytest.approx(held, rel=1e-6)
    assert rep["underfill_s"] >= -1e-9  # float rounding where the charges fill the busy time
    assert all(m["cost_weights"] == summary.cost_weights for m in manifest)


def _words(k: int) -> list[str]:
    first = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
    return [f"{first[k]} {j}" for j in range(len(BUDGETS))]
