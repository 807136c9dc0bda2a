"""Random problem generators for the loss tests (seeded, float64 by default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Problem:
    student_logits: torch.Tensor  # [B, T, V], requires grad
    teacher_logits: torch.Tensor  # [B, T, V]
    support_ids: torch.Tensor  # [B, T, K]
    teacher_logprobs: torch.Tensor  # [B, T, K] full-vocab teacher log-probs, -inf on padded slots
    mask: torch.Tensor  # [B, T] bool


def make_problem(
    seed: int,
    B: int = 2,
    T: int = 3,
    V: int = 11,
    K: int = 4,
    *,
    pad_frac: float = 0.0,
    mask_frac: float = 0.2,
    dtype: torch.dtype = torch.float64,
    scale: float = 2.0,
    random_support: bool = True,
) -> Problem:
    """A random problem; the support is K distinct ids per position (random, or the teacher's top-K).

    Padded slots get teacher log-prob -inf and a garbage id (-1 or V + 7) that must never be read.
    """
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    if random_support:
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    else:
        ids = teacher.topk(K, dim=-1).indices
    lp = torch.log_softmax(teacher, dim=-1).gather(-1, ids)
    pad = torch.rand(B, T, K, generator=g) < pad_frac
    garbage = torch.where(torch.rand(B, T, K, generator=g) < 0.5, -1, V + 7)
    ids = torch.where(pad, garbage, ids)
    lp = lp.masked_fill(pad, float("-inf"))
    mask = torch.rand(B, T, generator=g) >= mask_frac
    return Problem(student, teacher.to(dtype), ids, lp.to(dtype), mask)
