"""Write a small random LoRA adapter for a local model, in PEFT's on-disk format
(``adapter_config.json`` + ``adapter_model.safetensors``), so LoRA jobs run offline.

The weights are random, scaled so that the adapter visibly changes a tiny model's output
(PEFT initialises B to zero, which would change nothing). Needs ``torch`` and
``safetensors``; imported only when an adapter is built.
"""

from __future__ import annotations

import json
from pathlib import Path

from batchjobs.controls import VLLM_RANKS

# The attention projections of a Llama-style model that the adapter changes.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection of a Llama-style config."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
    }


def build_lora(
    out: str | Path, base_model: str | Path, rank: int = 8, seed: int = 1, scale: float = 1.0
) -> Path:
    """Write a rank-``rank`` adapter on every attention projection of ``base_model`` (a
    local Llama-style model directory) to ``out``; return ``out``."""
    import torch
    from safetensors.torch import save_file

    if rank not in VLLM_RANKS:
        raise ValueError(f"rank {rank} is not one vLLM serves (choose one of {VLLM_RANKS})")
    base = Path(base_model)
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{base} is not a model directory (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in ("llama", "qwen2", "qwen3", "mistral"):
        raise ValueError(
            f"{base}: model_type {config.get('model_type')!r}; only Llama-style models are "
            "supported"
        )
    shapes = _shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (n_out, n_in) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            a = torch.randn(rank, n_in, generator=gen) / n_in**0.5
            b = torch.randn(n_out, rank, generator=gen) * scale / rank**0.5
            tensors[f"{key}.lora_A.weight"] = a.contiguous()
            tensors[f"{key}.lora_B.weight"] = b.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out
