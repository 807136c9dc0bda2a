"""Learning-rate schedules: linear warm-up, then constant or cosine decay to zero."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_multiplier", "make_scheduler"]


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier on the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule: expected 'constant' or 'cosine', got {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int):
    """A ``LambdaLR`` over optimizer steps; ``total_steps`` counts optimizer steps, not rollout batches."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps),
    )
