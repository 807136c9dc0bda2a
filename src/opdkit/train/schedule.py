"""The learning-rate schedule: transformers' own (linear warm-up, then constant or cosine to zero)."""

from __future__ import annotations

import torch

__all__ = ["make_scheduler"]

_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine"}


def make_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int):
    """A ``LambdaLR`` over *optimizer* steps (``optim.warmup_steps`` and ``optim.total_steps`` count rollout
    batches: the caller multiplies them by ``optim.mini_batches``)."""
    from transformers import get_scheduler

    if schedule not in _NAMES:
        raise ValueError(f"schedule: expected 'constant' or 'cosine', got {schedule!r}")
    return get_scheduler(_NAMES[schedule], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
