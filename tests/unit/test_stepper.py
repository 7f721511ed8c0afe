"""The synchronous vLLM front end (``engine.env: {BATCHJOBS_VLLM_FRONT_END: sync}``): one
thread steps vLLM's ``LLMEngine`` for coroutines on the actor's loop. A stand-in engine
with ``LLMEngine``'s calls; the real one runs in tests/integration/test_feeding.py."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace as NS

import pytest

from batchjobs.engines.base import EngineDead, Request
from batchjobs.engines.vllm import _Stepper


class FakeLLMEngine:
    """Finishes each request one step after it was added, prompt text reversed; refuses an
    empty prompt as vLLM's input processor does; can be made to die in ``step``."""

    def __init__(self, die_after_steps: int | None = None):
        self.waiting: list[tuple[str, str]] = []
        self.steps = 0
        self.die_after_steps = die_after_steps
        self.threads: set[str] = set()  # which threads touched the engine

    def add_request(self, request_id, prompt, params):
        self.threads.add(threading.current_thread().name)
        if not prompt:
            raise ValueError("The decoder prompt cannot be empty")
        self.waiting.append((request_id, prompt))

    def step(self):
        self.threads.add(threading.current_thread().name)
        self.steps += 1
        if self.die_after_steps is not None and self.steps > self.die_after_steps:
            raise RuntimeError("engine core died")
        done, self.waiting = self.waiting, []
        return [
            NS(
                request_id=rid,
                finished=True,
                prompt_token_ids=[1] * len(prompt),
                num_cached_tokens=0,
                outputs=[NS(text=prompt[::-1], token_ids=[7, 8], finish_reason="length")],
            )
            for rid, prompt in done
        ]


async def run_requests(engine, prompts):
    stepper = _Stepper(engine, asyncio.get_running_loop(), (KeyError,))
    try:
        return await asyncio.gather(
            *(
                stepper.generate(Request(f"r{i}", p, None), None, 0.0)
                for i, p in enumerate(prompts)
            ),
            return_exceptions=True,
        ), stepper
    finally:
        stepper.stop()


def test_every_request_gets_its_own_result_and_only_the_stepper_touches_the_engine():
    engine = FakeLLMEngine()
    results, stepper = asyncio.run(run_requests(engine, ["ab", "cde", "f"]))
    assert [r.text for r in results] == ["ba", "edc", "f"]
    assert [r.prompt_tokens for r in results] == [2, 3, 1]
    assert all(r.finish_reason == "length" and r.completion_tokens == 2 for r in results)
    assert engine.threads == {"vllm-stepper"}
    assert not stepper.pending and not stepper.thread.is_alive()


def test_a_request_the_engine_refuses_is_a_row_error_and_the_others_go_on():
    results, _ = asyncio.run(run_requests(FakeLLMEngine(), ["ab", "", "c"]))
    assert results[0].text == "ba" and results[2].text == "c"
    assert results[1].finish_reason == "error"
    assert "rejected by engine: ValueError: The decoder prompt cannot be empty" in results[1].error


def test_a_dead_engine_fails_every_waiting_request_and_every_later_one():
    engine = FakeLLMEngine(die_after_steps=0)

    async def go():
        stepper = _Stepper(engine, asyncio.get_running_loop(), (KeyError,))
        first = await asyncio.gather(
            *(stepper.generate(Request(f"r{i}", "ab", None), None, 0.0) for i in range(3)),
            return_exceptions=True,
        )
        stepper.thread.join(timeout=5)
        with pytest.raises(EngineDead, match="engine core died"):
            await stepper.generate(Request("late", "ab", None), None, 0.0)
        return first

    first = asyncio.run(go())
    assert all(isinstance(r, EngineDead) for r in first)
