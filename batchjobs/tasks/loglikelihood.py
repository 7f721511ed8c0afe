"""Loglikelihood multiple choice (eval's ``loglikelihood`` scorer): a row becomes one
engine request per choice, the prompt's tokens followed by the choice's, asking the engine
for the log-probabilities of its prompt tokens (no generation); the choice's tokens are
summed.

One request per choice, because a prompt's log-probabilities are those of one sequence.
vLLM does not read its prefix cache for such requests (the cached positions would have no
log-probabilities), so each choice's request computes the prompt again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from batchjobs import scorers as sc
from batchjobs.engines.base import Request, Result
from batchjobs.tasks.base import RowError, common_columns

LL_FIELDS: dict[str, pa.DataType] = {
    "choice_logprobs": pa.list_(pa.float64()),
    "choice_tokens": pa.list_(pa.int32()),
    "answer": pa.int32(),
    "answer_norm": pa.int32(),
    "prompt_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "latency_s": pa.float32(),
    "error": pa.string(),
}


@dataclass(frozen=True)
class ChoicesRequest(Request):
    """A loglikelihood row: one engine request per choice (``parts``), each the prompt's
    tokens followed by the choice's ``cont_lens[i]`` tokens."""

    parts: tuple[Request, ...] = ()
    cont_lens: tuple[int, ...] = ()


@dataclass
class ChoicesResult(Result):
    """The results of a row's choice requests as one: summed counts, the slowest latency,
    the first error, and each choice's summed log-probability."""

    choice_logprobs: list[float] | None = None
    choice_tokens: list[int] = field(default_factory=list)


def merge_choices(results: Sequence[Result], cont_lens: Sequence[int]) -> ChoicesResult:
    error = next((f"choice {i}: {r.error}" for i, r in enumerate(results) if r.error), None)
    logprobs: list[float] = []
    for i, (r, n) in enumerate(zip(results, cont_lens)):
        if error:
            break
        tail = (r.prompt_logprobs or [])[-n:]
        if len(tail) != n or any(x is None for x in tail):
            error = f"choice {i}: the engine returned no prompt log-probabilities"
            break
        logprobs.append(math.fsum(tail))
    return ChoicesResult(
        finish_reason="error" if error else "stop",
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        latency_s=max((r.latency_s for r in results), default=0.0),
        cached_tokens=sum(r.cached_tokens for r in results),
        error=error,
        choice_logprobs=None if error else logprobs,
        choice_tokens=list(cont_lens),
    )


def choice_requests(request_id: str, context: list[int], conts: list[list[int]]) -> ChoicesRequest:
    """A row's request: one part per choice, asking for prompt log-probabilities and a
    single generated token (the engine must generate one)."""
    parts = tuple(
        Request(
            f"{request_id}/{i}",
            token_ids=[*context, *cont],
            params={"max_tokens": 1, "min_tokens": 0},
            prompt_logprobs=0,
        )
        for i, cont in enumerate(conts)
    )
    return ChoicesRequest(
        request_id, token_ids=context, parts=parts, cont_lens=tuple(len(c) for c in conts)
    )


def choice_tokens(
    tokenizer, lock, values: dict[str, Any], delimiter: str, render=None
) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each choice's token ids after it.

    A text prompt is encoded as lm-eval-harness encodes a (context, continuation) pair:
    whitespace at the end of the prompt moves to the front of the continuation, the
    prompt is encoded alone and together with each continuation, and the continuation's
    tokens are those past the prompt's. A conversation is rendered with the chat
    template (``render``), and each choice encoded alone after it."""
    choices = values["choices"]
    if render is not None:
        try:
            context = render(values["messages"])
        except Exception as exc:  # noqa: BLE001 - any template failure is this row's error
            raise RowError(f"chat template failed: {type(exc).__name__}: {exc}") from None
        with lock:
            conts = tokenizer([delimiter + c for c in choices], add_special_tokens=False)[
                "input_ids"
            ]
    else:
        prompt = values["prompt"]
        pairs = [lm_eval_pair(prompt, delimiter + c) for c in choices]
        with lock:
            enc = tokenizer(
                [pairs[0][0]] + [ctx + cont for ctx, cont in pairs], add_special_tokens=True
            )["input_ids"]
        context = list(enc[0])
        conts = [list(whole[len(context) :]) for whole in enc[1:]]
    for i, cont in enumerate(conts):
        if not cont:
            raise RowError(f"choice {i} ({choices[i]!r}) has no tokens after the prompt")
    return list(context), [list(c) for c in conts]


def ll_columns(results, extras) -> dict[str, pa.Array]:
    """The loglikelihood columns of a batch (``LL_FIELDS``)."""
    picks = [
        sc.loglikelihood_pick(r.choice_logprobs, e["choices"])
        if getattr(r, "choice_logprobs", None) is not None
        else (None, None)
        for r, e in zip(results, extras)
    ]
    common = common_columns(results)
    return {
        "choice_logprobs": pa.array(
            [getattr(r, "choice_logprobs", None) for r in results], pa.list_(pa.float64())
        ),
        "choice_tokens": pa.array(
            [getattr(r, "choice_tokens", None) or None for r in results], pa.list_(pa.int32())
        ),
        "answer": pa.array([p[0] for p in picks], pa.int32()),
        "answer_norm": pa.array([p[1] for p in picks], pa.int32()),
        "prompt_tokens": common["prompt_tokens"],
        "completion_tokens": pa.array([r.completion_tokens for r in results], pa.int32()),
        "latency_s": common["latency_s"],
        "error": common["error"],
    }


def lm_eval_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval-harness's split of a (context, continuation) pair before encoding: trailing
    whitespace of the context moves to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    return context, continuation
