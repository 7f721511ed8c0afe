"""``task: generate``: a prompt (text or token ids) in, generated text out."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from batchjobs.engines.base import Result
from batchjobs.tasks import generated
from batchjobs.tasks.base import Prepared, Task, common_columns

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
    tokenizer = None  # the model's tokenizer, where setup loaded one
    max_len: int | None = None  # the engine's max_model_len, where it states one
    chars_per_token = 1

    async def setup(self, engine) -> None:
        """Where the engine states its ``max_model_len``, load the model's tokenizer, so that
        a prompt too long for the engine is an error row naming its file and line before
        the engine sees it (the engine then gets its token ids, not the text again)."""
        from batchjobs.rowcheck import engine_limit, max_chars_per_token
        from batchjobs.tasks.chat import load_tokenizer

        self.max_len = engine_limit(engine)
        if self.max_len and self.needs_tokenizer():
            self.tokenizer = load_tokenizer(self.spec)
            self.chars_per_token = max_chars_per_token(self.tokenizer)

    def needs_tokenizer(self) -> bool:
        """Text prompts, tokenized as the engine would: not with pre-tokenized input, nor
        where the engine uses a tokenizer of its own kind (``engine.args.tokenizer_mode``)."""
        mode = self.spec.engine.args.get("tokenizer_mode", "auto")
        return not self.spec.input.token_ids_column and mode in ("auto", "hf", "slow")

    def pretokenize(self, values: list[dict | None]) -> list[str | None]:
        from batchjobs.rowcheck import too_many_chars

        problems: list[str | None] = [None] * len(values)
        if self.tokenizer is None:
            return problems
        column = self.spec.input.prompt_column
        todo = []
        for i, v in enumerate(values):
            prompt = v.get("prompt") if v else None
            if not isinstance(prompt, str):
                continue
            problems[i] = too_many_chars(len(prompt), self.max_len, self.chars_per_token, column)
            if problems[i] is None:
                todo.append(i)
        if todo:
            for i, ids in zip(todo, self._encode([values[i]["prompt"] for i in todo])):
                if isinstance(ids, str):
                    problems[i] = ids
                else:
                    values[i]["token_ids"] = ids
        return problems

    def _encode(self, texts: list[str]) -> list[list[int] | str]:
        """The token ids of each text (one call of the tokenizer for the batch), or why a
        text could not be tokenized."""
        from batchjobs.rowcheck import exception_text

        try:
            with self.lock:
                return [
                    list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]
                ]
        except Exception:  # noqa: BLE001 - find the text that fails, keep the rest
            pass
        out: list[list[int] | str] = []
        for t in texts:
            try:
                with self.lock:
                    out.append(list(self.tokenizer(t, add_special_tokens=True)["input_ids"]))
            except Exception as exc:  # noqa: BLE001
                out.append(f"the prompt could not be tokenized ({exception_text(exc)})")
        return out

    def prepare(self, request_id: str, values, params):
        from batchjobs.engines.base import Request

        if "prompt" in values and "token_ids" in values:  # tokenized here: send both
            request = Request(
                request_id, prompt=values["prompt"], token_ids=values["token_ids"], params=params
            )
            return Prepared(request)
        return super().prepare(request_id, values, params)

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
