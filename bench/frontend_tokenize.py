"""vLLM's AsyncLLM alone, text prompts against prompts tokenized in batches of 32: the front
end's CPU seconds and the generation time (docs/PERFORMANCE.md, "CPU: batch tokenization").

    VLLM_CPU_KVCACHE_SPACE=1 python bench/frontend_tokenize.py text
    VLLM_CPU_KVCACHE_SPACE=1 python bench/frontend_tokenize.py ids

Same prompts as `bench.py run --workload longtail --tail-scale 0.05 --n 2000 --prompt-words
60`; at most 512 requests in the engine at once, as a batchjobs replica on CPU admits. The
CPU seconds are this process's (the front end), not the engine core's or the worker's.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench import make_rows  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(mode: str, model: str) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    rows = make_rows("longtail", 2000, 60, 256, 0.05)
    args = AsyncEngineArgs(
        model=model, max_model_len=512, enforce_eager=True, disable_log_stats=True
    )
    engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
    tok = engine.tokenizer
    gate = asyncio.Semaphore(512)
    c0, t0 = cpu_s(), time.time()

    async def one(i: int, row: dict, prompt) -> int:
        async with gate:
            params = SamplingParams(
                max_tokens=row["max_tokens"],
                temperature=0.0,
                ignore_eos=True,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            n = 0
            async for out in engine.generate(prompt, params, f"r{i}"):
                n = len(out.outputs[0].token_ids)
            return n

    if mode == "ids":  # tokenized inside the timed window, 32 prompts per call
        prompts = []
        for k in range(0, len(rows), 32):
            ids = tok([r["prompt"] for r in rows[k : k + 32]])["input_ids"]
            prompts += [{"prompt_token_ids": x} for x in ids]
    else:
        prompts = [r["prompt"] for r in rows]
    outs = await asyncio.gather(*(one(i, r, p) for i, (r, p) in enumerate(zip(rows, prompts))))
    print(
        f"{mode}: {sum(outs)} output tokens, generation {time.time() - t0:.1f} s, "
        f"front end {cpu_s() - c0:.2f} CPU-s",
        flush=True,
    )
    engine.shutdown()
    # AsyncLLM.__del__ shuts down again; left to interpreter exit it fails on torn-down
    # modules ("'NoneType' object is not callable"), as in batchjobs' VLLMEngine.close.
    engine = None
    gc.collect()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(REPO / "models/tiny-llama"))
    )
