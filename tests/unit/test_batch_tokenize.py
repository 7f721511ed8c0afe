"""Batch tokenization: the engine actor tokenizes each batch's prompts in one call and hands
vLLM token ids, which must be exactly the ids vLLM would have made from each text alone.
The real engine runs this path in tests/integration/test_e2e.py (prompt token counts, a
too-long prompt refused); here the pieces run without vLLM."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace as NS

import pyarrow as pa
import pytest

from batchjobs.actor import EngineActor
from batchjobs.engines import vllm
from batchjobs.engines.base import Engine, Result
from batchjobs.readers import INPUT_ERROR, PARAMS, PROMPT, ROW_ID, ROW_INDEX, SHARD_ID, SHARD_ROWS


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from batchjobs.models import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d, 512)
    return AutoTokenizer.from_pretrained(str(d))


def bare_engine(tokenizer, max_len=32, inner=None) -> vllm.VLLMEngine:
    """A VLLMEngine without vLLM: the attributes its __init__ sets, with stand-ins."""
    e = object.__new__(vllm.VLLMEngine)
    e._tokenizer, e._tokenizer_lock, e._max_len = tokenizer, threading.Lock(), max_len
    e._base_kwargs = {"max_tokens": 4}
    e._sampling_params = lambda **kw: NS(**kw)
    e.params = e._sampling_params(**e._base_kwargs)
    e._dead_errors = (RuntimeError,)
    e.engine = inner
    return e


PROMPTS = ["the price of data", "a story about the river at night", "x", "  two  spaces "]


def test_batch_ids_are_the_ids_of_each_prompt_alone(hf_tokenizer):
    e = bare_engine(hf_tokenizer)
    alone = [hf_tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    assert e.encode_batch(PROMPTS) == alone
    assert all(isinstance(t, int) for ids in e.encode_batch(PROMPTS) for t in ids)
    assert e.encode_batch([]) is None


def test_a_too_long_prompt_keeps_one_token_more_than_the_model_takes(hf_tokenizer):
    # vLLM's renderer does the same: enough for the engine to refuse it, no more work
    e = bare_engine(hf_tokenizer, max_len=8)
    (ids,) = e.encode_batch(["the data " * 50])
    assert len(ids) == 9


def test_a_failing_tokenizer_hands_tokenizing_back_to_vllm(hf_tokenizer):
    calls = []

    def broken(texts, **kw):
        calls.append(texts)
        raise RuntimeError("Already borrowed")

    e = bare_engine(broken)
    assert e.encode_batch(PROMPTS) is None
    assert e.encode_batch(PROMPTS) is None and len(calls) == 1  # not tried again


def test_only_a_hugging_face_tokenizer_under_vllms_defaults_is_used(hf_tokenizer):
    assert vllm._batch_tokenizer(NS(tokenizer=hf_tokenizer), {}) is hf_tokenizer
    # a tokenizer of another kind (mistral's), none at all, or tokenization options the
    # spec sets for vLLM to apply: vLLM tokenizes each request as before
    assert vllm._batch_tokenizer(NS(tokenizer=object()), {}) is None
    assert vllm._batch_tokenizer(NS(tokenizer=None), {}) is None
    assert vllm._batch_tokenizer(NS(), {}) is None
    assert vllm._batch_tokenizer(NS(tokenizer=hf_tokenizer), {"truncate_prompt_tokens": 5}) is None


class _Inner:
    """vLLM's AsyncLLM.generate as the adapter uses it: records what it was given."""

    def __init__(self):
        self.prompts = []

    async def generate(self, prompt, params, request_id):
        self.prompts.append(prompt)
        comp = NS(text="ok", token_ids=[7], finish_reason="length")
        yield NS(prompt_token_ids=[1, 2, 3], outputs=[comp], num_cached_tokens=0)


def test_vllm_gets_token_ids_when_the_actor_has_them(hf_tokenizer):
    from batchjobs.engines.base import Request

    inner = _Inner()
    e = bare_engine(hf_tokenizer, inner=inner)
    r = asyncio.run(e.generate(Request("a", "the text", None, [5, 6])))
    assert r.error is None and r.completion_tokens == 1
    asyncio.run(e.generate(Request("b", "the text", None, None)))
    # a row that sets a tokenization option of its own keeps its text for vLLM to apply it
    asyncio.run(e.generate(Request("c", "the text", {"truncate_prompt_tokens": 2}, [5, 6])))
    assert inner.prompts == [{"prompt_token_ids": [5, 6]}, "the text", "the text"]


class _Recording(Engine):
    def __init__(self, encode):
        self.encode, self.requests, self.encoded = encode, [], []

    def encode_batch(self, prompts):
        self.encoded.append(list(prompts))
        return [[len(p)] for p in prompts] if self.encode else None

    async def generate(self, request):
        self.requests.append(request)
        return Result(text="", finish_reason="stop")

    def close(self):
        pass


def _batch(prompts, errors):
    n = len(prompts)
    return pa.table(
        {
            SHARD_ID: pa.array(["s"] * n, pa.string()),
            ROW_INDEX: pa.array(range(n), pa.int64()),
            SHARD_ROWS: pa.array([n] * n, pa.int64()),
            ROW_ID: pa.array([f"s:{i}" for i in range(n)], pa.string()),
            PROMPT: pa.array(prompts, pa.string()),
            INPUT_ERROR: pa.array(errors, pa.string()),
            PARAMS: pa.array([None, json.dumps({"max_tokens": 2}), None], pa.string()),
        }
    )


@pytest.mark.parametrize("encode", [True, False])
def test_the_actor_tokenizes_each_batch_once_and_skips_bad_rows(spec_dict, encode):
    engine = _Recording(encode)
    actor = EngineActor(spec_dict, engine_factory=lambda spec: engine)
    try:
        out = actor(_batch(["aa", None, "bbbb"], [None, "line 2: no prompt", None]))
    finally:
        actor.close()
    assert out.column("error").to_pylist() == [None, "line 2: no prompt", None]
    assert engine.encoded == [["aa", "bbbb"]]  # one call per batch, bad rows left out
    got = {r.prompt: r.prompt_token_ids for r in engine.requests}
    assert got == ({"aa": [2], "bbbb": [4]} if encode else {"aa": None, "bbbb": None})
