"""make-model's local models: the tokenizer's chat template and the config-only shapes."""

from __future__ import annotations

import json

import pytest

from batchjobs.tools.models import SHAPES, build_model, build_tokenizer

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the model of the city?"},
    {"role": "assistant", "content": "data."},
    {"role": "user", "content": "and?"},
]


def _ids(encoded) -> list[int]:
    """apply_chat_template's token ids, whether this transformers returns a list or a dict."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_chat_template_renders_chatml_with_a_generation_prompt(tiny_tokenizer_dir, offline):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nthe model of the city?<|im_end|>\n"
        "<|im_start|>assistant\ndata.<|im_end|>\n"
        "<|im_start|>user\nand?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    closed = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=False, tokenize=False)
    assert closed.endswith("the model of the city?<|im_end|>\n")


def test_chat_markers_are_single_tokens_the_model_can_embed(tiny_tokenizer_dir, offline):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ids = _ids(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert start != tok.unk_token_id and end != tok.unk_token_id
    assert ids.count(start) == 5 and ids.count(end) == 4
    assert tok.decode(ids) == tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    assert max(ids) < len(tok) <= SHAPES["tiny"]["vocab_size"]
    # where every transformers version reads it
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template


@pytest.mark.parametrize("vocab_size", sorted({s["vocab_size"] for s in SHAPES.values()}))
def test_every_shape_has_an_embedding_row_for_every_token(tmp_path, vocab_size, offline):
    build_tokenizer(tmp_path, vocab_size)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) <= vocab_size
    assert tok.chat_template


def test_qwen3_shape_writes_a_loadable_config_without_weights(tmp_path, offline):
    out = build_model(tmp_path / "qwen3", "qwen3-0.6b")
    config = transformers.AutoConfig.from_pretrained(str(out))
    assert config.model_type == "qwen3"
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
        config.max_position_embeddings,
    ) == (1024, 28, 16, 8, 128, 3072, 151669, 32768)
    rope = getattr(config, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(config, "rope_theta", None)) == 1000000.0
    assert config.tie_word_embeddings is True
    assert config.rms_norm_eps == 1e-6
    assert "bfloat16" in str(getattr(config, "dtype", None) or config.torch_dtype)
    assert not list(out.glob("*.safetensors"))  # vLLM's load_format: dummy makes the weights
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) <= config.vocab_size
    assert tok.apply_chat_template(MESSAGES[1:2], add_generation_prompt=True, tokenize=False)


def test_unknown_shape_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        build_model(tmp_path, "gpt-9")
