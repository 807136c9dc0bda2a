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

__all__ = ["DataError", "PromptRecord", "filter_long_prompts", "load_prompts"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: chat messages (``[{"role", "content"}, ...]``), an optional reference answer and task
    name, and where it came from (``"file line N"``, for messages)."""

    messages: tuple[dict, ...]
    answer: str | None = None
    task: str | None = None
    source: str | None = None


def _messages(value, where: str, key: str) -> tuple[dict, ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return tuple({"role": m["role"], "content": m["content"]} for m in value)
    raise DataError(
        f"{where}: field '{key}' must be a string or a non-empty list of {{\"role\", \"content\"}} messages, "
        f"got {type(value).__name__}"
    )


def load_prompts(path: str | Path, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[PromptRecord]:
    """Read a JSONL file of prompts (blank lines are skipped)."""
    records = []
    for lineno, obj in read_jsonl(path):
        where = f"{path} line {lineno}"
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


def filter_long_prompts(
    records: Sequence[PromptRecord], tokenizer, max_tokens: int, *, what: str = "data.max_prompt_tokens", log=None
) -> list[PromptRecord]:
    """The records whose rendered prompt has at most ``max_tokens`` tokens; the others are dropped with a
    warning (through ``log``) that counts them and names the first few. ``DataError`` if none is left.

    A prompt is measured after the chat template, as the student sees it. Text longer than 64 characters
    per allowed token is dropped without tokenizing it (no tokenizer packs more into one token), so a
    runaway multi-megabyte line costs nothing.
    """
    from opdkit.data.chat import render_chat

    kept, dropped = [], []
    for r in records:
        chars = sum(len(m["content"]) for m in r.messages)
        n = None if chars > 64 * max_tokens else len(render_chat(tokenizer, r.messages))
        if n is None or n > max_tokens:
            dropped.append((r.source or "a prompt", n))
        else:
            kept.append(r)
    if dropped and log is not None:
        shown = ", ".join(f"{src} ({'> ' + str(max_tokens) if n is None else n} tokens)" for src, n in dropped[:3])
        more = f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""
        log(f"warning: {len(dropped)} of {len(records)} prompts are longer than {what} = {max_tokens} tokens "
            f"and are skipped: {shown}{more}")
    if not kept:
        raise DataError(f"every prompt is longer than {what} = {max_tokens} tokens (raise it, or shorten the prompts)")
    return kept
