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
    "DRY_RUN_CONVERSATION",
    "REASONING_TAGS",
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


#: The conversation of the pre-flight dry run: the sample answer with reasoning tags, which a reasoning
#: student writes in its responses and which a tokenizer may split into ordinary sub-tokens.
REASONING_TAGS: tuple[str, ...] = ("<think>", "</think>")
DRY_RUN_CONVERSATION: tuple[dict[str, str], ...] = (
    SAMPLE_CONVERSATION[0],
    {"role": "assistant", "content": "<think>12 + 30 = 42.</think> The answer is 42."},
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


def resolve_special_ids(tokenizer, entries: Sequence[str | int] | None, *, key: str = "objective.special_tokens",
                        vocab_size: int | None = None) -> list[int]:
    """Configured entries -> student token ids (deduplicated, in order).

    Each entry is one token of the student's vocabulary: a string that the tokenizer encodes to exactly one
    token (``'<|im_end|>'``, ``'think'``, ``' are'``), or an int id below ``vocab_size`` (default: the
    tokenizer's length). ``None`` -> :func:`default_special_strings`; ``[]`` -> ``[]`` (no masking). Anything
    else raises :class:`~opdkit.errors.InputError` naming ``key`` and showing how the string tokenizes: a
    string that is several tokens would otherwise mask unrelated sub-tokens everywhere.
    """
    if entries is None:
        entries = default_special_strings(tokenizer)
    elif isinstance(entries, (str, bytes)):
        raise InputError(f"{key}: expected a list of tokens, got the single string {entries!r}")
    unk = getattr(tokenizer, "unk_token_id", None)
    n = vocab_size if vocab_size is not None else len(tokenizer)
    out: list[int] = []
    for s in entries:
        if isinstance(s, int) and not isinstance(s, bool):
            if not 0 <= s < n:
                raise InputError(f"{key}: id {s} is outside the student's vocabulary [0, {n})")
            tid = s
        elif isinstance(s, str):
            ids = _encode(tokenizer, s)
            if len(ids) != 1 or (unk is not None and ids[0] == unk):
                pieces = tokenizer.convert_ids_to_tokens(ids) if ids else []
                raise InputError(
                    f"{key}: {s!r} is not one token of the student's vocabulary: it encodes to {len(ids)} "
                    f"token(s) {pieces!r}{' (the unknown token)' if unk in ids else ''}; give a single token or "
                    "its id (masking every piece would mask unrelated tokens)"
                )
            tid = int(ids[0])
        else:
            raise InputError(f"{key}: expected token strings or ids, got {s!r} ({type(s).__name__})")
        if tid not in out:
            out.append(tid)
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
