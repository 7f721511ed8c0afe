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
- generation controls (``ENGINES["trtllm"].features``): structured output as its
  ``guided_decoding`` (xgrammar; ``choice`` becomes a regex of the choices), ``logprobs``,
  ``n`` and a ``lora_request`` per row; prompt log-probabilities and whitespace-free JSON are
  refused at validate time.
- memory: ``engine.gpu_memory_utilization`` is passed as
  ``KvCacheConfig(free_gpu_memory_fraction=...)``, a share of the memory that is *free after
  the weights are loaded*, not of the whole GPU as in vLLM. The same number therefore
  reserves more memory under TensorRT-LLM; lower it if other processes share the GPU.
"""

from __future__ import annotations

import time
from typing import Any

from batchjobs.engines import base
from batchjobs.engines.base import Engine, Request, Result, Sample, TokenLogprob
from batchjobs.spec import OUTPUT_SHAPING, JobSpec
from batchjobs.structured import trtllm_fields

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
    if spec.sampling.structured is not None or spec.input.schema_column:
        kw["guided_decoding_backend"] = "xgrammar"
    if e.lora is not None:
        from batchjobs.controls import lora_limits

        max_loras, rank = lora_limits(spec)
        kw["lora_config"] = {
            "lora_dir": list(e.lora.adapters.values()),
            "max_lora_rank": rank,
            "max_loras": max_loras,
            "max_cpu_loras": e.lora.max_cpu_loras or max_loras,
        }
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.update(e.args)
    return kw


def sampling_kwargs(spec: JobSpec, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``SamplingParams`` keywords (the structured-output constraint apart: ``constraint``)."""
    s = {
        **spec.sampling.model_dump(exclude={"args", *OUTPUT_SHAPING}),
        **spec.sampling.args,
        **(overrides or {}),
    }
    kw = {k: v for k, v in s.items() if v is not None and v != []}
    if kw.get("min_tokens") == 0:
        kw.pop("min_tokens")
    if spec.sampling.n > 1:
        kw["n"] = spec.sampling.n
    if spec.sampling.logprobs is not None:
        kw["logprobs"] = spec.sampling.logprobs
    return kw


def samples(output: Any, top_n: int | None) -> list[Sample]:
    """Every completion of a TensorRT-LLM ``RequestOutput`` as a ``Sample``, with its
    logprobs where the job asked for them (``top_n``: alternatives per position). They are,
    per position, a mapping of token id to ``Logprob`` (as vLLM's) or a bare float."""
    out = []
    for comp in getattr(output, "outputs", None) or []:
        ids = list(comp.token_ids or ())
        logprobs = None
        if top_n is not None and comp.logprobs:
            logprobs = []
            for tok, entry in zip(ids, comp.logprobs):
                if isinstance(entry, dict):
                    ranked = sorted(entry.items(), key=lambda kv: getattr(kv[1], "rank", 0) or 0)
                    chosen = entry.get(tok)
                    value = getattr(chosen, "logprob", chosen)
                    top = tuple(
                        TokenLogprob(int(t), float(getattr(lp, "logprob", lp)))
                        for t, lp in ranked[:top_n]
                    )
                else:
                    value, top = entry, ()
                logprobs.append(
                    TokenLogprob(
                        int(tok), float("nan") if value is None else float(value), None, top
                    )
                )
        cumulative = getattr(comp, "cumulative_logprob", None)
        out.append(
            Sample(
                comp.text,
                _FINISH.get(str(getattr(comp, "finish_reason", None)), "error"),
                len(ids),
                logprobs,
                None if cumulative is None else float(cumulative),
            )
        )
    return out


class TRTLLMEngine(Engine):
    kind = "trtllm"

    def __init__(self, spec: JobSpec):
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        self.spec = spec
        self._sampling = SamplingParams
        kw = llm_kwargs(spec)
        if "lora_config" in kw:
            from tensorrt_llm.executor.request import LoRARequest

            try:  # its home until 1.3; later releases moved it
                from tensorrt_llm.lora_manager import LoraConfig
            except ImportError:  # pragma: no cover
                from tensorrt_llm._torch.peft.lora.config import LoraConfig

            kw["lora_config"] = LoraConfig(**kw["lora_config"])
            self._loras = {
                name: LoRARequest(name, i, path)
                for i, (name, path) in enumerate(spec.engine.lora.adapters.items(), start=1)
            }
        else:
            self._loras = {}
        from tensorrt_llm.llmapi import GuidedDecodingParams

        self._guided = GuidedDecodingParams
        job = spec.sampling.structured and spec.sampling.structured.constraint()
        self._job_guided = GuidedDecodingParams(**trtllm_fields(job)) if job else None
        if spec.engine.gpu_memory_utilization is not None:
            kw["kv_cache_config"] = KvCacheConfig(
                free_gpu_memory_fraction=spec.engine.gpu_memory_utilization
            )
        if spec.engine.enable_prefix_caching is not None:
            kv = kw.setdefault("kv_cache_config", KvCacheConfig())
            kv.enable_block_reuse = spec.engine.enable_prefix_caching
        self.params = SamplingParams(**sampling_kwargs(spec), guided_decoding=self._job_guided)
        self.llm = LLM(**kw)

    async def generate(self, request: Request) -> Result:
        t0 = time.perf_counter()
        params = self.params
        if request.params or request.structured:
            try:
                guided = self._job_guided
                if request.structured:
                    guided = self._guided(**trtllm_fields(request.structured))
                params = self._sampling(
                    **sampling_kwargs(self.spec, request.params), guided_decoding=guided
                )
            except Exception as exc:  # noqa: BLE001
                return base.invalid_params(request, exc)
        lora, unknown = base.lora_for(self._loras, request)
        if unknown is not None:
            return unknown
        try:
            # The LLM API takes a prompt as text or as a list of token ids.
            prompt = list(request.token_ids) if request.token_ids is not None else request.prompt
            output = await self.llm.generate_async(prompt, params, lora_request=lora)
        except Exception as exc:  # noqa: BLE001 - a rejected request is a row error
            return Result.failed(
                f"rejected by engine: {type(exc).__name__}: {exc}", time.perf_counter() - t0
            )
        result = normalize(output, time.perf_counter() - t0)
        result.adapter = request.adapter if lora is not None else None
        if result.error is None:
            one = output[0] if isinstance(output, (list, tuple)) else output
            found = samples(one, self.spec.sampling.logprobs)
            if found:
                result.logprobs = found[0].logprobs
                result.cumulative_logprob = found[0].cumulative_logprob
                if len(found) > 1:
                    result.samples = found
                    result.completion_tokens = sum(s.completion_tokens for s in found)
        return result

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
