"""Build small local models (no hub access needed): a tiny real Llama for the CPU demo and
tests, and config-only shapes of real models for GPU benchmarks with ``load_format: dummy``.

Every model gets its own BPE tokenizer with a ChatML chat template, so chat jobs run on
it offline. Needs ``transformers`` and ``tokenizers`` (and ``torch`` for real weights);
they are imported only when a model is built.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any


def _llama(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int
) -> dict[str, Any]:
    """A Llama shape: model_type and architectures, then its dimensions."""
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
    )


# Each shape is a transformers config: model_type picks the class, the rest are its keys.
# Shapes without weights set the published models' dimensions and dtype.
SHAPES: dict[str, dict[str, Any]] = {
    # _llama(hidden, intermediate, layers, attention heads, key/value heads, vocabulary)
    # head_dim 64: vLLM's CPU attention rejects 16.
    "tiny": _llama(128, 256, 2, 2, 2, 512),
    "llama-7b": _llama(4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": _llama(4096, 14336, 32, 32, 8, 32000),
    "llama3-70b": _llama(8192, 28672, 80, 64, 8, 32000),
    # Qwen3-0.6B and Qwen3-Embedding-0.6B (the same network; vLLM embeds with it in pooling
    # mode). vocab_size is the embedding model's.
    "qwen3-0.6b": dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151669,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}

# ChatML: every turn is <|im_start|>role\ncontent<|im_end|>\n; the generation prompt opens
# the assistant's turn. Roles are not checked here: the job validates messages first.
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "not",
    "but",
    "first",
    "one",
    "their",
    "its",
    "new",
    "after",
    "who",
    "they",
    "two",
    "have",
    "more",
    "other",
    "all",
    "into",
    "model",
    "token",
    "batch",
    "engine",
    "shard",
    "score",
    "review",
    "price",
    "order",
    "city",
    "river",
    "music",
    "science",
    "data",
    "question",
    "answer",
    "summary",
    "document",
    "night",
    "job",
    "cost",
    "run",
    "write",
    "read",
    "explain",
    "list",
    "number",
    "story",
]


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English text for training the tokenizer."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(lines)
    ]


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens (special tokens included,
    so the model's embedding covers every id) with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", CHAT_START, CHAT_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[CHAT_START, CHAT_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    # In tokenizer_config.json, where every transformers version looks (newer ones would
    # write chat_template.jinja instead).
    fast.save_pretrained(str(out), save_jinja_files=False)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("chat_template") != CHAT_TEMPLATE:
        config["chat_template"] = CHAT_TEMPLATE
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").unlink(missing_ok=True)


def build_model(
    out: str | Path, shape: str = "tiny", max_position_embeddings: int = 4096, seed: int = 0
) -> Path:
    """Write tokenizer + config (+ random weights for ``tiny``) to ``out``; return it.

    ``max_position_embeddings`` applies to shapes that do not set their own.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = dict(SHAPES[shape])
    build_tokenizer(out, keys["vocab_size"])
    from transformers import AutoConfig

    keys.setdefault("max_position_embeddings", max_position_embeddings)
    keys.setdefault("tie_word_embeddings", False)
    config = AutoConfig.for_model(
        keys.pop("model_type"),
        **keys,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16" if shape != "tiny" else "float32",
    )
    if shape == "tiny":
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    else:
        config.save_pretrained(str(out))  # weights come from load_format: dummy
    (out / "batchjobs-model.json").write_text(json.dumps({"shape": shape, "seed": seed}) + "\n")
    return out
