"""Prompt files: JSONL with one problem per line, read into :class:`PromptRecord` (errors name file and line).

A line is ``{"prompt": "text" | [{"role": ..., "content": ...}, ...], "answer": ..., "task": ...}``; the
prompt and answer field names are configurable (``data.prompt_key``, ``data.answer_key``). A text prompt
becomes one user message. The same format is a benchmark file for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opdkit.data.jsonl import DataError, read_jsonl
from opdkit.envs.base import EnvSpec
from opdkit.errors import InputError

__all__ = ["DataError", "PromptRecord", "ROLES", "check_prompt_lengths", "filter_long_prompts", "load_prompts"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: chat messages (``[{"role", "content"}, ...]``), an optional reference answer and task
    name, where it came from (``"file line N"``, for messages), and whether it is too long (see
    :func:`check_prompt_lengths`)."""

    messages: tuple[dict, ...]
    answer: str | None = None
    task: str | None = None
    source: str | None = None
    truncated: bool = False  # longer than data.max_prompt_tokens; the sampler keeps its end
    env: EnvSpec | None = None  # an environment episode instead of a prompt (messages empty): opdkit.envs


ROLES = ("system", "user", "assistant", "tool", "developer")


def _messages(value, where: str, key: str) -> tuple[dict, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is an empty prompt")
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a string or a non-empty list of "
                        f"{{\"role\", \"content\"}} messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{key}', message {j}: expected {{\"role\": str, \"content\": str}}, "
                            f"got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{key}', message {j}: unknown role {m['role']!r} "
                            f"(expected one of {', '.join(ROLES)})")
        if not m["content"].strip():
            raise DataError(f"{where}: field '{key}', message {j} ({m['role']}): empty content")
        out.append({"role": m["role"], "content": m["content"]})
    if all(m["role"] == "system" for m in out):
        raise DataError(f"{where}: field '{key}' has only system messages: a prompt needs a user turn (or another)")
    return tuple(out)


def load_prompts(path: str | Path, *, prompt_key: str = "prompt", answer_key: str = "answer",
                 env_defaults=None) -> list[PromptRecord]:
    """Read a JSONL file of prompts (blank lines are skipped). A line with an ``"env"`` field is an
    environment instead (:func:`opdkit.envs.data.env_record`; ``env_defaults``: arguments per kind)."""
    records = []
    for lineno, obj in read_jsonl(path):
        where = f"{path} line {lineno}"
        if "env" in obj:
            from opdkit.envs.data import env_record

            records.append(env_record(obj, where, Path(path).parent, env_defaults or {}))
            continue
        if prompt_key not in obj:
            raise DataError(f"{where}: missing the prompt field '{prompt_key}' (data.prompt_key)")
        answer = obj.get(answer_key)
        task = obj.get("task")
        records.append(
            PromptRecord(
                _messages(obj[prompt_key], where, prompt_key),
                None if answer is None else str(answer),
                None if task is None else str(task),
                where,
            )
        )
    if not records:
        raise DataError(f"data file '{path}': no prompts found")
    return records


def check_prompt_lengths(
    records: Sequence[PromptRecord], tokenizer, max_tokens: int, *, overflow: str = "error", log=None,
    what: str = "data.max_prompt_tokens",
) -> list[PromptRecord]:
    """Apply ``data.max_prompt_tokens`` to the rendered prompts (measured after the chat template, as the
    student sees them) with the ``data.prompt_overflow`` policy:

    - ``error``: a longer prompt is an error naming its file and line;
    - ``skip``: longer prompts are dropped, with a warning (through ``log``) that counts them and names a few;
    - ``truncate_left``: they are kept and marked ``truncated``; the sampler keeps their last ``max_tokens``.

    Text longer than 64 characters per allowed token is over the limit without being tokenized (no tokenizer
    packs more into one token), so a runaway multi-megabyte line costs nothing. ``DataError`` if no prompt is
    left.
    """
    from dataclasses import replace

    from opdkit.data.chat import render_chat

    kept, long = [], []
    for r in records:
        if r.env is not None:  # an episode's prompt is made at reset; env.max_episode_tokens bounds it
            kept.append(r)
            continue
        chars = sum(len(m["content"]) for m in r.messages)
        try:
            n = None if chars > 64 * max_tokens else len(render_chat(tokenizer, r.messages))
        except InputError as exc:
            raise DataError(f"{r.source or 'a prompt'}: {exc}") from None
        if n is None or n > max_tokens:
            long.append((r, n))
            if overflow == "truncate_left":
                kept.append(replace(r, truncated=True))
        else:
            kept.append(r)

    def describe(items):
        shown = ", ".join(f"{r.source or 'a prompt'} ({'> ' + str(max_tokens) if n is None else n} tokens)"
                          for r, n in items[:3])
        return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    if long and overflow == "error":
        raise DataError(
            f"{len(long)} of {len(records)} prompts are longer than {what} = {max_tokens} tokens: {describe(long)}; "
            "raise the limit, or set data.prompt_overflow to skip (drop them) or truncate_left (keep their end)"
        )
    if long and log is not None:
        done = "skipped" if overflow == "skip" else "truncated on the left"
        log(f"warning: {len(long)} of {len(records)} prompts are longer than {what} = {max_tokens} tokens "
            f"and are {done}: {describe(long)}")
    if not kept:
        raise DataError(f"every prompt is longer than {what} = {max_tokens} tokens (raise it, or shorten the prompts)")
    return kept


def filter_long_prompts(records, tokenizer, max_tokens: int, *, what: str = "data.max_prompt_tokens", log=None):
    """The records whose rendered prompt fits ``max_tokens`` (``check_prompt_lengths`` with ``skip``)."""
    return check_prompt_lengths(records, tokenizer, max_tokens, overflow="skip", log=log, what=what)
