"""``task: generate``: a prompt (text or token ids) in, generated text out."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from batchjobs.engines.base import Result
from batchjobs.tasks import generated
from batchjobs.tasks.base import Task, common_columns

TEXT_FIELDS: dict[str, pa.DataType] = {
    "text": pa.string(),
    "finish_reason": pa.string(),
    "prompt_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "latency_s": pa.float32(),
    "error": pa.string(),
}


def text_columns(results: Sequence[Result]) -> dict[str, pa.Array]:
    common = common_columns(results)
    return {
        "text": pa.array([r.text for r in results], pa.string()),
        "finish_reason": pa.array([r.finish_reason for r in results], pa.string()),
        "prompt_tokens": common["prompt_tokens"],
        "completion_tokens": pa.array([r.completion_tokens for r in results], pa.int32()),
        "latency_s": common["latency_s"],
        "error": common["error"],
    }


class GenerateTask(Task):
    name = "generate"
    call = "generate"

    # The columns follow the job's generation controls (n, logprobs, structured output,
    # LoRA): batchjobs.tasks.generated. Without any they are TEXT_FIELDS.
    def output_fields(self) -> dict[str, pa.DataType]:
        return generated.output_fields(self.spec)

    def to_columns(self, results, extras) -> dict[str, pa.Array]:
        return generated.output_columns(self.spec, results, extras)

    def summarize(self, table: pa.Table) -> dict[str, float]:
        """With LoRA adapters: rows and tokens per adapter (the manifest charges each)."""
        return generated.adapter_sums(table) if self.spec.engine.lora is not None else {}

    def report(self, out, records) -> dict | None:
        """With LoRA adapters: the job's rows, tokens and $ per adapter."""
        if self.spec.engine.lora is None:
            return None
        return {"adapters": generated.adapter_report(records)}
