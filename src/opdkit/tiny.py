"""Tiny, real Hugging Face models and tokenizers built offline (for tests, the demo and benchmarks).

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the given texts with the
``tokenizers`` library and wrapped as a ``PreTrainedTokenizerFast`` with a ChatML template; the models
are ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` built from a small config with random weights. Saved
with ``save_pretrained``, they load with ``AutoTokenizer`` / ``AutoModelForCausalLM`` like any model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (digits one by one). transformers 5 rebuilds a tokenizer loaded from a
# qwen2 model directory with exactly this split, so training with it keeps the tokenizer in memory,
# the one loaded from a qwen2 directory and the one loaded from a llama directory identical.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    *,
    special_tokens: Sequence[str] = CHATML_SPECIALS,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    chat_template: str | None = CHATML_TEMPLATE,
    min_frequency: int = 1,
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Special tokens get the first ids, in the order given. Returns a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=[s for s in special_tokens if s not in (eos_token, pad_token)],
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def build_tiny_model(
    tokenizer,
    *,
    arch: Literal["qwen2", "llama", "gemma2"] = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    final_logit_softcapping: float = 2.0,
):
    """A randomly initialised causal LM sized for a CPU; ``vocab_size`` defaults to the tokenizer's.

    A ``vocab_size`` larger than the tokenizer's models the padded embedding rows of real checkpoints
    (Qwen2.5 has 151936 or 152064 rows for 151665 tokens). ``gemma2`` soft-caps its logits at
    ``final_logit_softcapping`` (real Gemma 2 uses 30; the small default makes the cap matter for tiny
    random weights, as it does for a trained model's large logits).
    """
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"arch: expected one of {', '.join(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    extra = {}
    if arch == "gemma2":
        extra = dict(head_dim=hidden_size // num_heads, final_logit_softcapping=final_logit_softcapping,
                     query_pre_attn_scalar=hidden_size // num_heads, sliding_window=max_position_embeddings)
    config = config_cls(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` both (safetensors) into ``out_dir``; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
