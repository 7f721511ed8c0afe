"""TensorRT-LLM adapter over its high-level ``LLM`` API (PyTorch backend, ``generate_async``).

NOT YET RUN ON A REAL ENGINE: TensorRT-LLM (multi-GB wheels, torch 2.9 pin) cannot be
installed on the machines this was written on. ``normalize`` is tested against objects
built to the documented ``RequestOutput`` shape; the engine wiring is untested.

Differences from vLLM that this adapter hides:
- request ids are ints (vLLM: str); we never expose them.
- finish reasons are stop/length/timeout/cancelled (vLLM: stop/length/abort): timeout and
  cancelled become "abort".
- timings live in ``request_perf_metrics`` as ``timedelta`` (vLLM: float seconds); we
  measure latency ourselves, as for vLLM.
- memory: ``engine.gpu_memory_utilization`` is passed as
  ``KvCacheConfig(free_gpu_memory_fraction=...)``, a share of the memory that is *free after
  the weights are loaded*, not of the whole GPU as in vLLM. The same number therefore
  reserves more memory under TensorRT-LLM; lower it if other processes share the GPU.
"""

from __future__ import annotations

import time
from typing import Any

from batchjobs.engines.base import Engine, Request, Result
from batchjobs.spec import JobSpec

_FINISH = {"stop": "stop", "length": "length", "timeout": "abort", "cancelled": "abort"}


def normalize(output: Any, latency_s: float) -> Result:
    """A TensorRT-LLM ``RequestOutput`` (or a one-element list of them) as a ``Result``."""
    if isinstance(output, (list, tuple)):
        if len(output) != 1:
            return Result.failed(
                f"expected one output for one prompt, got {len(output)}", latency_s
            )
        output = output[0]
    completions = getattr(output, "outputs", None) or []
    prompt_tokens = len(getattr(output, "prompt_token_ids", None) or ())
    if not completions:
        return Result.failed("engine returned no completion", latency_s, prompt_tokens)
    comp = completions[0]
    return Result.finished(
        comp.text,
        len(comp.token_ids or ()),
        getattr(comp, "finish_reason", None),
        _FINISH,
        prompt_tokens,
        latency_s,
    )


def llm_kwargs(spec: JobSpec) -> dict[str, Any]:
    """The spec's engine section as ``tensorrt_llm.LLM`` keywords (KvCacheConfig built later)."""
    e = spec.engine
    kw: dict[str, Any] = {
        "model": e.model,
        "tokenizer": e.tokenizer,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "dtype": e.dtype,
        "max_seq_len": e.max_model_len,
        "max_batch_size": e.max_num_seqs,
        "trust_remote_code": e.trust_remote_code,
    }
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.update(e.args)
    return kw


def sampling_kwargs(spec: JobSpec, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = {**spec.sampling.model_dump(exclude={"args"}), **spec.sampling.args, **(overrides or {})}
    kw = {k: v for k, v in s.items() if v is not None and v != []}
    if kw.get("min_tokens") == 0:
        kw.pop("min_tokens")
    return kw


class TRTLLMEngine(Engine):
    kind = "trtllm"

    def __init__(self, spec: JobSpec):
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        self.spec = spec
        self._sampling = SamplingParams
        kw = llm_kwargs(spec)
        if spec.engine.gpu_memory_utilization is not None:
            kw["kv_cache_config"] = KvCacheConfig(
                free_gpu_memory_fraction=spec.engine.gpu_memory_utilization
            )
        if spec.engine.enable_prefix_caching is not None:
            kv = kw.setdefault("kv_cache_config", KvCacheConfig())
            kv.enable_block_reuse = spec.engine.enable_prefix_caching
        self.params = SamplingParams(**sampling_kwargs(spec))
        self.llm = LLM(**kw)

    async def generate(self, request: Request) -> Result:
        t0 = time.perf_counter()
        params = self.params
        if request.params:
            try:
                params = self._sampling(**sampling_kwargs(self.spec, request.params))
            except Exception as exc:  # noqa: BLE001
                return Result.failed(f"invalid per-row sampling parameters {request.params}: {exc}")
        try:
            # The LLM API takes a prompt as text or as a list of token ids.
            prompt = list(request.token_ids) if request.token_ids is not None else request.prompt
            output = await self.llm.generate_async(prompt, params)
        except Exception as exc:  # noqa: BLE001 - a rejected request is a row error
            return Result.failed(
                f"rejected by engine: {type(exc).__name__}: {exc}", time.perf_counter() - t0
            )
        return normalize(output, time.perf_counter() - t0)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()

    def max_concurrency(self) -> int | None:
        # The LLM API's resolved max_batch_size (the spec's engine.max_num_seqs, if set).
        resolved = getattr(getattr(self.llm, "args", None), "max_batch_size", None)
        return resolved or self.spec.engine.max_num_seqs

    def max_model_len(self) -> int | None:
        resolved = getattr(getattr(self.llm, "args", None), "max_seq_len", None)
        return resolved or self.spec.engine.max_model_len
