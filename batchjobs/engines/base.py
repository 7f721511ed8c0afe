"""The engine contract every adapter implements.

An engine turns one ``Request`` into one ``Result``, asynchronously, so that an actor can
keep many requests in flight and the engine's continuous batching stays full. A request
carries a prompt as text or as token ids (the task decides which); ``generate`` runs it
through sampling, ``embed`` through the engine's pooling mode. Everything engine-specific
(request id types, finish-reason vocabularies, timing types, output shapes) is normalised
by the adapter; the pipeline never sees an engine's own objects. Which calls a kind
implements is declared in the registry (``batchjobs.engines.ENGINES``), so a job whose
task needs a call its engine lacks is refused before anything starts.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The finish reasons a Result may carry, whatever the engine calls them.
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: str | None = None  # text the engine tokenizes, or
    token_ids: Sequence[int] | None = None  # the prompt already tokenized (chat, embed)
    # Per-row sampling overrides (names as in the spec's sampling section), or None.
    params: dict[str, Any] | None = None
    # Also return the log-probability of every prompt token (Result.prompt_logprobs); the
    # number is how many top alternatives the engine considers per position (0: none).
    prompt_logprobs: int | None = None
    # This row's structured-output constraint ({kind: value}, batchjobs.structured),
    # replacing the job's sampling.structured; None: the job's.
    structured: dict[str, Any] | None = None
    # The LoRA adapter (a name in engine.lora.adapters) that serves this row; None: the
    # base model.
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token of an output (or a prompt) with its log-probability and, in ``top``, the
    likeliest tokens at its position (likeliest first; it may be among them)."""

    token_id: int
    logprob: float
    token: str | None = None
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class Sample:
    """One of several samples of a request (``sampling.n`` > 1)."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None


@dataclass
class Result:
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    # Prompt tokens the engine took from its prefix cache instead of computing them.
    cached_tokens: int = 0
    # The pooled vector of an embed request (float32 array-like), else None.
    embedding: Sequence[float] | None = None
    # With Request.prompt_logprobs: each prompt token's log-probability given the tokens
    # before it (None for the first token), else None.
    prompt_logprobs: list[float | None] | None = None
    # The same with the likeliest alternatives per position (sampling.prompt_logprobs).
    prompt_token_logprobs: list[TokenLogprob | None] | None = None
    # With sampling.logprobs: the generated tokens with their alternatives, and the sum of
    # their log-probabilities as the engine reports it.
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None
    # With sampling.n > 1: every sample (text, finish_reason, logprobs above are the first
    # one's; completion_tokens counts all of them).
    samples: list[Sample] | None = None
    # The LoRA adapter that served the request, as the engine reports it (None: the base).
    adapter: str | None = None

    @classmethod
    def failed(cls, error: str, latency_s: float = 0.0, prompt_tokens: int = 0) -> Result:
        return cls(
            finish_reason="error", error=error, latency_s=latency_s, prompt_tokens=prompt_tokens
        )

    @classmethod
    def finished(
        cls,
        text: str,
        completion_tokens: int,
        engine_reason: object,
        mapping: dict[str, str],
        prompt_tokens: int,
        latency_s: float,
        cached_tokens: int = 0,
    ) -> Result:
        """A completed request; a finish reason the mapping does not know is an error row."""
        reason = mapping.get(str(engine_reason), "error") if engine_reason is not None else "error"
        return cls(
            text=text,
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency_s,
            error=None if reason != "error" else f"finish reason {engine_reason!r}",
            cached_tokens=cached_tokens,
        )


def invalid_params(request: Request, exc: Exception) -> Result:
    """The error row of a request whose per-row sampling parameters the engine rejected."""
    what = request.params or request.structured
    return Result.failed(f"invalid per-row sampling parameters {what}: {exc}")


def lora_for(loras: dict[str, Any], request: Request) -> tuple[Any, Result | None]:
    """The engine's LoRA request for ``request.adapter`` out of ``loras`` (by adapter name;
    None: the base model), and the error row of an adapter the engine does not serve."""
    if request.adapter is None:
        return None, None
    lora = loras.get(request.adapter)
    if lora is None:
        return None, Result.failed(f"unknown LoRA adapter {request.adapter!r}")
    return lora, None


class Engine(abc.ABC):
    """One started engine. Construct it to start it; ``close`` to release its devices."""

    kind: str = "?"

    @abc.abstractmethod
    async def generate(self, request: Request) -> Result:
        """Run one request to completion. A request the engine rejects gives ``Result.failed``;
        an engine that can no longer serve anything raises ``EngineDead``."""

    async def embed(self, request: Request) -> Result:
        """Pool one request into ``Result.embedding`` (engines that declare ``embed``)."""
        raise NotImplementedError(f"engine {self.kind} does not embed")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine's processes and devices. Safe to call twice."""

    def max_concurrency(self) -> int | None:
        """How many requests the engine runs at once (vLLM's ``max_num_seqs``), or None if
        it has no such limit. The actor keeps twice this many in the engine by default, so
        the engine's scheduler always has the next request waiting when one finishes."""
        return None

    def progress(self) -> int | None:
        """A count that grows whenever the engine does work (vLLM: its steps), or None if
        the engine does not tell. With requests in the engine and neither this count nor
        the finished requests moving for ``resources.stall_timeout_s``, the replica treats
        the engine as hung (``batchjobs.watchdog``)."""
        return None

    def max_model_len(self) -> int | None:
        """The longest prompt (plus output) the engine accepts, as it resolved it, or None."""
        return None


class EngineDead(Exception):
    """The engine cannot serve further requests; the actor must exit so Ray restarts it."""
