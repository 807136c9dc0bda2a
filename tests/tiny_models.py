"""Training text for the tiny test tokenizers (the session fixtures are in conftest.py)."""

from __future__ import annotations

import random


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Short arithmetic Q/A texts in ChatML, enough to train a few-hundred-token BPE."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(
            f"<|im_start|>user\nWhat is {a} {op} {b}?<|im_end|>\n<|im_start|>assistant\n"
            f"<think>{a} {op} {b} = {val}</think> The answer is \\boxed{{{val}}}.<|im_end|>\n"
        )
    return out
