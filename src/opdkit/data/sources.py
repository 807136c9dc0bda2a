"""``data.train_path``: one source or a list of them, each a task's prompts or environments.

A source is a JSONL file (prompts, or environment lines: :mod:`opdkit.envs.data`), ``textworld:DIR`` or
``alfworld:SPLIT``, optionally named ``TASK=SOURCE``. A record's task is the source's name (``TASK=``), else
its line's ``task`` field (an environment line's defaults to its kind), else — with several sources — the
file's stem.
With one source and no names every record keeps the task its line gives (or none): a single-task run.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from opdkit.data.jsonl import DataError

__all__ = ["load_sources", "split_task_name", "tasks_of"]


def split_task_name(spec: str) -> tuple[str | None, str]:
    """``"TASK=SOURCE"`` -> ``(TASK, SOURCE)``; a source without a name -> ``(None, SOURCE)``."""
    name, sep, source = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name.strip()) and source.strip():
        return name.strip(), source.strip()
    return None, spec.strip()


def load_sources(specs: str | list[str], *, prompt_key: str = "prompt", answer_key: str = "answer",
                 env_defaults=None, alfworld_data: str | None = None) -> list:
    """Every record of ``specs`` (see the module docstring), in order."""
    from opdkit.data.prompts import load_prompts
    from opdkit.envs.data import env_source_records, is_env_source

    many = isinstance(specs, list)
    specs = specs if isinstance(specs, list) else [specs]
    if not specs:
        raise DataError("data.train_path: an empty list")
    out = []
    for spec in specs:
        task, source = split_task_name(spec)
        if is_env_source(source):
            out += env_source_records(source, task, env_defaults or {}, alfworld_data=alfworld_data)
            continue
        records = load_prompts(source, prompt_key=prompt_key, answer_key=answer_key, env_defaults=env_defaults)
        for r in records:
            t = task if task is not None else r.task if r.task is not None else Path(source).stem if many else None
            out.append(r if t == r.task else replace(r, task=t, env=None if r.env is None else replace(r.env, task=t)))
    return out


def tasks_of(records) -> list[str | None]:
    """The distinct tasks of ``records``, in order of first appearance."""
    return list(dict.fromkeys(r.task for r in records))
