"""Special-token masking: configured strings -> student token ids, and the default list.

The loss mask is zeroed where the *sampled* token is one of these ids (``first`` or ``all`` occurrences,
applied by :func:`opdkit.losses.special_token_mask`). The list is given as strings and turned into ids with
the student tokenizer: every id of each string's encoding (``add_special_tokens=False``). ``None`` means the
default list, the student's EOS and the special/added tokens its chat template emits on a sample
conversation (e.g. ``<|im_start|>``, ``<|im_end|>``); an empty list means no masking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from opdkit.errors import InputError

__all__ = [
    "SAMPLE_CONVERSATION",
    "render_template",
    "special_id_set",
    "template_special_tokens",
    "default_special_strings",
    "resolve_special_ids",
    "apply_special_token_mask",
]

#: The conversation used to render chat templates (pre-flight check and the default mask list). The
#: answer has no ``<think>`` tags on purpose: a template that injects them shows them as template tokens.
SAMPLE_CONVERSATION: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42. The answer is 42."},
)


def render_template(tokenizer, conversation: Sequence[dict] | None = None, *, add_generation_prompt: bool = False):
    """The tokenizer's chat template rendered on ``conversation`` as text, or ``None`` if it has no template."""
    from opdkit.data.chat import render_chat_text

    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = conversation if conversation is not None else SAMPLE_CONVERSATION
    return render_chat_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def special_id_set(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens and added tokens (``<|im_start|>``-like pieces)."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def template_special_tokens(tokenizer, conversation: Sequence[dict] | None = None) -> list[str]:
    """Special/added tokens that the chat template emits on ``conversation``, in order of first appearance."""
    text = render_template(tokenizer, conversation)
    if text is None:
        return []
    specials = special_id_set(tokenizer)
    out: list[str] = []
    for tid in _encode(tokenizer, text):
        if tid in specials:
            s = tokenizer.convert_ids_to_tokens(tid)
            if s not in out:
                out.append(s)
    return out


def default_special_strings(tokenizer, conversation: Sequence[dict] | None = None) -> list[str]:
    """The default mask list: the student's EOS, then its chat-template special tokens (deduplicated)."""
    out: list[str] = []
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        out.append(str(eos))
    for s in template_special_tokens(tokenizer, conversation):
        if s not in out:
            out.append(s)
    return out


def resolve_special_ids(tokenizer, strings: Sequence[str] | None) -> list[int]:
    """Configured strings -> student token ids (every id of each string's encoding; deduplicated, in order).

    ``None`` -> :func:`default_special_strings`; ``[]`` -> ``[]`` (no masking). A string that encodes to
    nothing, or only to the unknown token, raises :class:`~opdkit.errors.InputError` naming it.
    """
    if strings is None:
        strings = default_special_strings(tokenizer)
    elif isinstance(strings, str):
        raise InputError(f"special_tokens: expected a list of strings, got the single string {strings!r}")
    unk = getattr(tokenizer, "unk_token_id", None)
    out: list[int] = []
    for s in strings:
        if not isinstance(s, str):
            raise InputError(f"special_tokens: expected strings, got {s!r} ({type(s).__name__})")
        ids = _encode(tokenizer, s)
        if not ids:
            raise InputError(f"special_tokens: {s!r} encodes to no tokens with the student tokenizer")
        if unk is not None and unk in ids:
            raise InputError(
                f"special_tokens: {s!r} is not in the student vocabulary (it encodes to the unknown token "
                f"{tokenizer.unk_token!r})"
            )
        for i in ids:
            if int(i) not in out:
                out.append(int(i))
    return out


def apply_special_token_mask(
    response_mask_B_T,
    sampled_ids_B_T,
    special_ids: Sequence[int],
    mode: Literal["first", "all"] = "first",
):
    """``response_mask`` with the listed special ids zeroed (thin wrapper of ``losses.special_token_mask``)."""
    from opdkit.losses import special_token_mask

    return special_token_mask(sampled_ids_B_T, special_ids, response_mask_B_T, mode=mode)
