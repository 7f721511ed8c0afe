"""Response bodies in OpenAI's shapes: ``chat.completion``, ``text_completion``, the
embeddings ``list``, and the error object. Each parses with the ``openai`` package's types
(``ChatCompletion``, ``Completion``, ``CreateEmbeddingResponse``); ``id`` and ``created``
are added when the batch output files are assembled (``files``).

Log-probabilities are finite numbers: a token the engine rates impossible gets -9999.0, as
vLLM's server reports it (JSON has no -Infinity).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from batchjobs.engines.base import Result, Sample, TokenLogprob

FLOOR = -9999.0


def usage(prompt: int, completion: int | None = None) -> dict[str, int]:
    if completion is None:  # embeddings
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def samples(result: Result) -> list[Sample]:
    """A result's choices: every sample of n > 1, or its one output."""
    if result.samples:
        return list(result.samples)
    return [
        Sample(
            result.text or "",
            result.finish_reason or "stop",
            result.completion_tokens,
            result.logprobs,
            result.cumulative_logprob,
        )
    ]


def chat_body(result: Result, model: str, logprobs: int | None) -> dict[str, Any]:
    return _generation_body(
        "chat.completion",
        result,
        model,
        lambda s: {
            "message": {"role": "assistant", "content": s.text, "refusal": None},
            "logprobs": None if logprobs is None else {"content": _chat_logprobs(s.logprobs)},
        },
    )


def completion_body(result: Result, model: str, logprobs: int | None) -> dict[str, Any]:
    return _generation_body(
        "text_completion",
        result,
        model,
        lambda s: {
            "text": s.text,
            "logprobs": None if logprobs is None else _completion_logprobs(s.logprobs),
        },
    )


def _generation_body(
    kind: str, result: Result, model: str, choice: Callable[[Sample], dict[str, Any]]
) -> dict[str, Any]:
    """A generation's body: one choice per sample, ``choice`` giving its output and
    log-probabilities between its index and its finish reason."""
    choices = [
        {"index": i, **choice(s), "finish_reason": s.finish_reason}
        for i, s in enumerate(samples(result))
    ]
    return {
        "object": kind,
        "model": model,
        "choices": choices,
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


def embedding_body(
    vectors: Sequence[Sequence[float]], encoding: str, model: str, prompt_tokens: int
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, encoding)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": usage(prompt_tokens),
    }


def encode(vector: Sequence[float], encoding: str) -> list[float] | str:
    """A vector as OpenAI returns it: floats, or base64 of its little-endian float32 bytes."""
    arr = np.asarray(vector, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(arr.tobytes()).decode("ascii")
    return arr.tolist()


def error_body(status: int, code: str, message: str, param: str | None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------ log-probabilities


def finite(logprob: float | None) -> float:
    if logprob is None or math.isnan(logprob):
        return FLOOR
    return max(float(logprob), FLOOR)


def _token(t: TokenLogprob) -> str:
    return t.token if t.token is not None else f"token_id:{t.token_id}"


def _entry(t: TokenLogprob) -> dict[str, Any]:
    tok = _token(t)
    return {"token": tok, "logprob": finite(t.logprob), "bytes": list(tok.encode("utf-8"))}


def _chat_logprobs(tokens: list[TokenLogprob] | None) -> list[dict[str, Any]]:
    return [{**_entry(t), "top_logprobs": [_entry(a) for a in t.top]} for t in tokens or []]


def _completion_logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any]:
    tokens = tokens or []
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(_token(t))
    return {
        "tokens": [_token(t) for t in tokens],
        "token_logprobs": [finite(t.logprob) for t in tokens],
        # The likeliest tokens at each position, and the one chosen (as vLLM's server has it).
        "top_logprobs": [
            {**{_token(a): finite(a.logprob) for a in t.top}, _token(t): finite(t.logprob)}
            for t in tokens
        ],
        "text_offset": offsets,
    }
