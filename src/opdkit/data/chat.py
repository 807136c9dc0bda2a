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
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{key}: cannot read the template file '{setting}' ({exc})") from None
        if not text.strip():
            raise InputError(f"{key}: the template file '{setting}' is empty")
        try:
            import jinja2

            jinja2.Environment().parse(text)
        except jinja2.TemplateSyntaxError as exc:
            raise InputError(f"{key}: '{setting}' line {exc.lineno}: not a valid Jinja template "
                             f"({exc.message})") from None
        tokenizer.chat_template = text
    return tokenizer


def render_chat_text(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The chat template rendered on ``messages`` as text (``InputError`` if the tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "<tokenizer>"
        raise InputError(
            f"tokenizer '{name}': has no chat template, so chat prompts cannot be rendered (add one to the "
            "tokenizer: a chat_template in tokenizer_config.json or a chat_template.jinja file)"
        )
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2's TemplateError and the errors a template raises on purpose
        if type(exc).__module__.startswith("jinja2") or "Template" in type(exc).__name__:
            name = getattr(tokenizer, "name_or_path", "") or "<tokenizer>"
            raise InputError(f"the chat template of '{name}' failed on a conversation with roles "
                             f"{[m.get('role') for m in messages]}: {exc}") from None
        raise


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template (special tokens come from the template)."""
    text = render_chat_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    try:
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    except (TypeError, UnicodeEncodeError) as exc:  # e.g. a lone surrogate the tokenizer cannot encode
        raise InputError(f"a prompt cannot be tokenized ({type(exc).__name__}: {exc}): is it valid text?") from None


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
