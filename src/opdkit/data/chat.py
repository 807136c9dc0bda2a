"""The one chat renderer and the one left-padding routine.

Every prompt a model sees goes through :func:`render_chat` (the tokenizer's chat template with the
assistant generation prompt, tokenized without adding special tokens a second time), so the sampler,
the teacher's own-template scoring, the demo's fine-tuning and the pre-flight check all feed the same
ids for the same conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from opdkit.errors import InputError

__all__ = ["PLAIN_TEMPLATE", "apply_chat_template_setting", "left_pad", "render_chat", "render_chat_text"]

#: ``model.chat_template: none``: the BOS token (if any), then the messages' text joined by blank lines, for
#: base models that have no chat format.
PLAIN_TEMPLATE = (  # newlines as Jinja string literals: transformers renders with trim_blocks
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n' }}{% endif %}"
)


def apply_chat_template_setting(tokenizer, setting: str, *, key: str = "model.chat_template", where: str = ""):
    """Give ``tokenizer`` the chat template ``setting`` asks for (``model``, ``none`` or a file path); returns it.

    ``model`` keeps the tokenizer's own and refuses a tokenizer without one, saying what to set instead.
    """
    from pathlib import Path

    if setting == "model":
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"{key}: the tokenizer{' of ' + where if where else ''} has no chat template; for a base model set "
                f"{key}=none (prompts are the messages' text), or {key}=PATH to a Jinja template file"
            )
    elif setting == "none":
        tokenizer.chat_template = PLAIN_TEMPLATE
    else:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise InputError(f"{key}: '{setting}' is neither 'model', 'none' nor a template file that exists")
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{key}: cannot read the template file '{setting}' ({exc})") from None
    return tokenizer


def render_chat_text(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The chat template rendered on ``messages`` as text (``InputError`` if the tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "<tokenizer>"
        raise InputError(
            f"tokenizer '{name}': has no chat template, so chat prompts cannot be rendered (add one to the "
            "tokenizer: a chat_template in tokenizer_config.json or a chat_template.jinja file)"
        )
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template (special tokens come from the template)."""
    text = render_chat_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_B_P, mask_B_P)``: ``rows`` left-padded with ``pad_id`` to the longest (mask 1 on real tokens)."""
    if not rows:
        raise InputError("rows: expected at least one sequence to pad")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, P - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[b, P - len(r) :] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
