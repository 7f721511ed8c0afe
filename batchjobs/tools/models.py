"""Build small local models (no hub access needed): a tiny real Llama for the CPU demo and
tests, and config-only Llama shapes for GPU benchmarks with ``load_format: dummy``.

Needs ``transformers`` and ``tokenizers`` (and ``torch`` for real weights); they are
imported only when a model is built.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab. head_dim 64: vLLM's CPU attention
    # rejects 16.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(out))


def build_model(
    out: str | Path, shape: str = "tiny", max_position_embeddings: int = 4096, seed: int = 0
) -> Path:
    """Write tokenizer + config (+ random weights for ``tiny``) to ``out``; return it."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    build_tokenizer(out, dims["vocab_size"])
    from transformers import LlamaConfig

    config = LlamaConfig(
        **dims,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="bfloat16" if shape != "tiny" else "float32",
    )
    if shape == "tiny":
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(str(out))
    else:
        config.save_pretrained(str(out))  # weights come from load_format: dummy
    (out / "batchjobs-model.json").write_text(json.dumps({"shape": shape, "seed": seed}) + "\n")
    return out
