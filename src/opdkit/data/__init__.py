"""Prompt data: the one JSONL reader (file:line errors), prompt records, and the one chat renderer."""

from opdkit.data.chat import left_pad, render_chat, render_chat_text
from opdkit.data.jsonl import DataError, read_jsonl
from opdkit.data.prompts import ROLES, PromptRecord, check_prompt_lengths, filter_long_prompts, load_prompts

__all__ = [
    "DataError",
    "PromptRecord",
    "ROLES",
    "check_prompt_lengths",
    "filter_long_prompts",
    "left_pad",
    "load_prompts",
    "read_jsonl",
    "render_chat",
    "render_chat_text",
]
