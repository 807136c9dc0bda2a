"""Loading local Hugging Face models and tokenizers: real tiny models, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from opdkit.hf import ModelLoadError, load_causal_lm, load_tokenizer


def test_tiny_models_load_as_causal_lms(tiny_model_dirs):
    for arch, path in tiny_model_dirs.items():
        model = load_causal_lm(path)
        tok = load_tokenizer(path, require_chat_template=True)
        assert type(model).__name__.lower().startswith(arch)
        assert model.config.vocab_size == len(tok)
        ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
        out = model(torch.tensor([ids]))
        assert out.logits.shape == (1, len(ids), len(tok))


def test_bf16_load(tiny_model_dirs):
    assert load_causal_lm(tiny_model_dirs["qwen2"], dtype="bfloat16").dtype == torch.bfloat16


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_tokenizer(tmp_path / "nope")


def test_not_a_causal_lm_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not a causal LM"):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(tmp_path.parent)


def test_tokenizer_without_chat_template_is_refused_when_required(tmp_path, tiny_tokenizer):
    from opdkit.tiny import train_tokenizer
    from tests.tiny_models import corpus

    tok = train_tokenizer(corpus(50), vocab_size=300, chat_template=None)
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path) is not None
    with pytest.raises(ModelLoadError, match="chat template"):
        load_tokenizer(tmp_path, require_chat_template=True)


def test_bad_dtype_is_named(tiny_model_dirs):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_causal_lm(tiny_model_dirs["qwen2"], dtype="fp8")


def test_tokenizer_in_memory_and_loaded_from_either_architecture_agree(tiny_model_dirs, tiny_tokenizer):
    """transformers 5 rebuilds a qwen2 directory's tokenizer as Qwen2Tokenizer; ids must not change."""
    text = "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<think>19</think> \\boxed{19}"
    want = tiny_tokenizer(text)["input_ids"]
    for path in tiny_model_dirs.values():
        assert load_tokenizer(path)(text)["input_ids"] == want
