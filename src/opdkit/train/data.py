"""Prompt data: JSONL files with one problem per line; errors name the file and the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opdkit.errors import OpdkitError

__all__ = ["DataError", "PromptRecord", "load_prompts"]


class DataError(OpdkitError, ValueError):
    """A data file is missing or has a malformed line."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: chat messages (``[{"role", "content"}, ...]``) and an optional reference answer."""

    messages: tuple[dict, ...]
    answer: str | None = None
    task: str | None = None


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
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{path}': no such file")
    records = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if prompt_key not in obj:
                raise DataError(f"{where}: missing the prompt field '{prompt_key}' (data.prompt_key)")
            answer = obj.get(answer_key)
            records.append(
                PromptRecord(
                    _messages(obj[prompt_key], where, prompt_key),
                    None if answer is None else str(answer),
                    obj.get("task"),
                )
            )
    if not records:
        raise DataError(f"data file '{path}': no prompts found")
    return records
