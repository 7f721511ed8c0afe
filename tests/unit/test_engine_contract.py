"""The engine contract: each adapter's normaliser turns its engine's own output objects
into the same ``Result``. Objects are built to each engine's documented shapes, so this
runs without vLLM or TensorRT-LLM; the vLLM path also runs for real in tests/integration."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace as NS

import pytest

from batchjobs.engines import trtllm, vllm
from batchjobs.engines.base import FINISH_REASONS, Result


def vllm_output(reason="stop", ids=(5, 6, 7), prompt=(1, 2)):
    # vllm.RequestOutput: request_id str, prompt_token_ids, outputs[CompletionOutput]
    comp = NS(text="abc", token_ids=list(ids), finish_reason=reason, logprobs=None)
    return NS(request_id="r-1", prompt_token_ids=list(prompt), outputs=[comp], finished=True)


def trtllm_output(reason="stop", ids=(5, 6, 7), prompt=(1, 2)):
    # tensorrt_llm RequestOutput: request_id int, outputs[CompletionOutput], timings as
    # timedelta under request_perf_metrics
    comp = NS(
        text="abc",
        token_ids=list(ids),
        finish_reason=reason,
        logprobs=[],
        stop_reason=None,
        request_perf_metrics=NS(timing_metrics=NS(first_token_time=timedelta(seconds=0.2))),
    )
    return NS(
        request_id=7, prompt="p", prompt_token_ids=list(prompt), outputs=[comp], finished=True
    )


ADAPTERS = {
    "vllm": (vllm.normalize, vllm_output, {"stop": "stop", "length": "length", "abort": "abort"}),
    "trtllm": (
        trtllm.normalize,
        trtllm_output,
        {"stop": "stop", "length": "length", "timeout": "abort", "cancelled": "abort"},
    ),
}


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request):
    return ADAPTERS[request.param]


def test_success_is_normalised(adapter):
    normalize, make, _ = adapter
    r = normalize(make(), 0.25)
    assert r == Result(
        text="abc",
        finish_reason="stop",
        prompt_tokens=2,
        completion_tokens=3,
        latency_s=0.25,
        error=None,
    )
    assert type(r.completion_tokens) is int and type(r.prompt_tokens) is int


def test_finish_reasons_map_onto_one_vocabulary(adapter):
    normalize, make, mapping = adapter
    for theirs, ours in mapping.items():
        r = normalize(make(reason=theirs), 0.1)
        assert r.finish_reason == ours and r.finish_reason in FINISH_REASONS and r.error is None


def test_unknown_finish_reason_is_an_error_row(adapter):
    normalize, make, _ = adapter
    r = normalize(make(reason="weird"), 0.1)
    assert r.finish_reason == "error" and "weird" in r.error


def test_no_output_is_an_error_row(adapter):
    normalize, _, _ = adapter
    r = normalize(NS(prompt_token_ids=[1], outputs=[]), 0.1)
    assert r.finish_reason == "error" and r.error and r.completion_tokens == 0


def test_trtllm_single_prompt_list_is_unwrapped():
    assert trtllm.normalize([trtllm_output()], 0.1).completion_tokens == 3
    assert trtllm.normalize([trtllm_output(), trtllm_output()], 0.1).finish_reason == "error"


def test_trtllm_numpy_token_ids_are_counted_as_an_int():
    import numpy as np

    r = trtllm.normalize(trtllm_output(ids=np.array([3, 4], dtype=np.int32)), 0.1)
    assert r.completion_tokens == 2 and type(r.completion_tokens) is int
    assert r.finish_reason == "stop" and r.error is None


# --------------------------------------------------------------------------- embeddings


def vllm_pooled(data, prompt=(1, 2, 3), cached=None):
    # vllm.PoolingRequestOutput: prompt_token_ids, outputs.data (a torch tensor or array)
    return NS(
        request_id="r-1",
        prompt_token_ids=list(prompt),
        outputs=NS(data=data),
        num_cached_tokens=cached,
        finished=True,
    )


def test_vllm_pooled_output_is_normalised():
    import numpy as np

    r = vllm.normalize_pooled(vllm_pooled(np.array([0.6, 0.8], dtype=np.float32), cached=2), 0.5)
    assert (r.finish_reason, r.error, r.prompt_tokens, r.latency_s) == ("stop", None, 3, 0.5)
    assert r.cached_tokens == 2 and r.text is None and r.completion_tokens == 0
    assert np.asarray(r.embedding, dtype=np.float32).tolist() == pytest.approx([0.6, 0.8])


def test_vllm_pooled_tensor_becomes_float32_numbers():
    class Tensor:  # the torch.Tensor methods the adapter calls, without torch
        def __init__(self, values):
            self.values = values

        def float(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            import numpy as np

            return np.asarray(self.values, dtype=np.float32)

    r = vllm.normalize_pooled(vllm_pooled(Tensor([1.0, 0.0, 0.0])), 0.1)
    assert list(r.embedding) == [1.0, 0.0, 0.0] and r.error is None


def test_vllm_pooled_output_without_data_is_an_error_row():
    r = vllm.normalize_pooled(NS(prompt_token_ids=[1], outputs=None), 0.1)
    assert r.finish_reason == "error" and r.error and r.embedding is None


@pytest.mark.parametrize(
    "accepted, expected",
    [
        # vLLM has called L2 normalisation both use_activation and normalize
        ({"task", "dimensions", "use_activation"}, {"task": "embed", "use_activation": False}),
        ({"task", "dimensions", "normalize"}, {"task": "embed", "normalize": False}),
        ({"task"}, {"task": "embed"}),
    ],
)
def test_pooling_kwargs_follow_the_installed_vllm(make_spec, accepted, expected):
    spec = make_spec(task="embed", embed={"normalize": False})
    assert vllm.pooling_kwargs(spec, accepted) == expected


def test_pooling_kwargs_pass_matryoshka_dimensions(make_spec, model_dir):
    (model_dir / "config.json").write_text('{"is_matryoshka": true}')
    spec = make_spec(task="embed", embed={"dimensions": 64})
    assert vllm.pooling_kwargs(spec, {"task", "dimensions", "normalize"}) == {
        "task": "embed",
        "dimensions": 64,
        "normalize": True,
    }


def test_embed_jobs_run_vllm_in_pooling_mode(make_spec):
    assert vllm.engine_args(make_spec(task="embed"))["runner"] == "pooling"
    assert vllm.engine_args(make_spec(task="embed"))["convert"] == "embed"
    assert "runner" not in vllm.engine_args(make_spec(task="generate"))


def test_request_carries_text_or_token_ids_to_vllm():
    from batchjobs.engines.base import Request

    assert vllm._prompt(Request("r", prompt="hi")) == "hi"
    assert vllm._prompt(Request("r", token_ids=(4, 5))) == {"prompt_token_ids": [4, 5]}


def test_trtllm_kwargs_map_the_spec(spec_dict):
    from batchjobs.spec import parse_spec

    spec_dict["engine"].update(
        kind="trtllm", tensor_parallel_size=2, max_model_len=4096, max_num_seqs=128
    )
    spec_dict["sampling"] = {"max_tokens": 9, "stop": ["\n"], "seed": 3}
    spec = parse_spec(spec_dict)
    kw = trtllm.llm_kwargs(spec)
    assert (
        kw["tensor_parallel_size"] == 2
        and kw["max_seq_len"] == 4096
        and kw["max_batch_size"] == 128
    )
    sk = trtllm.sampling_kwargs(spec, {"max_tokens": 4})
    assert (
        sk["max_tokens"] == 4
        and sk["stop"] == ["\n"]
        and sk["seed"] == 3
        and "min_tokens" not in sk
    )


def test_a_rows_lora_adapter_is_looked_up_by_name_or_is_an_error_row():
    from batchjobs.engines.base import Request, lora_for

    loras = {"sql": "sql-request"}
    assert lora_for(loras, Request("r", prompt="p")) == (None, None)  # the base model
    assert lora_for(loras, Request("r", prompt="p", adapter="sql")) == ("sql-request", None)
    lora, unknown = lora_for(loras, Request("r", prompt="p", adapter="chat"))
    assert lora is None and unknown.finish_reason == "error"
    assert unknown.error == "unknown LoRA adapter 'chat'"


def test_rejected_per_row_sampling_is_an_error_row_naming_the_values():
    from batchjobs.engines.base import Request, invalid_params

    row = invalid_params(Request("r", params={"top_p": 7}), ValueError("top_p > 1"))
    assert row.finish_reason == "error"
    assert row.error == "invalid per-row sampling parameters {'top_p': 7}: top_p > 1"
    shape = invalid_params(Request("r", structured={"regex": "["}), ValueError("bad regex"))
    assert shape.error == "invalid per-row sampling parameters {'regex': '['}: bad regex"
