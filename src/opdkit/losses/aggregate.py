"""Reduce a per-token loss to the scalar an optimizer steps on.

Notation: ``...`` leading shape (each leading index is one sequence), ``T`` positions (last axis).

Modes (as in verl):
- ``token-mean``: ``Σ m L / Σ m`` over every unmasked token of the batch (the paper's choice).
- ``seq-mean-token-mean``: mean over sequences of each sequence's token mean.
- ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
Sequences with no unmasked token are left out of the sequence means; a batch with no unmasked token
gives exactly 0 with zero gradient, never 0/0 = NaN.
"""

from __future__ import annotations

from typing import Literal

import torch

from opdkit.errors import InputError
from opdkit.losses._checks import check_float, check_mask, check_same_device, check_tensor

__all__ = ["aggregate", "AGGREGATION_MODES", "AggregationMode"]

AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATION_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: AggregationMode = "token-mean",
    *,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate ``per_token[..., T]`` under ``mask[..., T]`` into a scalar.

    Args:
        per_token: ``[..., T]`` per-token loss (at least 1-D; the last axis is the sequence).
        mask: ``[..., T]`` bool or 0/1 mask.
        mode: one of ``AGGREGATION_MODES``.
        denominator: optional fixed divisor replacing the count this call would use (number of
            unmasked tokens for ``token-mean``, of non-empty sequences for the ``seq-mean`` modes).
            Gradient accumulation passes the count of the whole mini-batch here so that the sum of
            the micro-batch losses equals the loss of the mini-batch.

    Returns:
        A 0-dim tensor.
    """
    per_token = check_float("per_token", per_token, min_dim=1)
    check_tensor("mask", mask)
    check_same_device(per_token=per_token, mask=mask)
    mask_b = check_mask("mask", mask, per_token.shape)
    if mode not in AGGREGATION_MODES:
        raise InputError(f"mode: expected one of {', '.join(AGGREGATION_MODES)}, got {mode!r}")
    if denominator is not None and not isinstance(denominator, torch.Tensor) and not float(denominator) > 0:
        raise InputError(f"denominator: expected a number > 0, got {denominator!r}")

    m = mask_b.to(per_token.dtype)
    # where() rather than multiply: a masked NaN/inf must not leak (0 * inf = NaN).
    masked = torch.where(mask_b, per_token, torch.zeros_like(per_token))
    if mode == "token-mean":
        return _divide(masked.sum(), m.sum(), denominator)

    tokens_S = m.sum(-1).reshape(-1)
    sums_S = masked.sum(-1).reshape(-1)
    nonempty_S = tokens_S > 0
    if mode == "seq-mean-token-mean":
        per_seq_S = sums_S / tokens_S.clamp(min=1.0)
    else:
        per_seq_S = sums_S
    total = torch.where(nonempty_S, per_seq_S, torch.zeros_like(per_seq_S)).sum()
    return _divide(total, nonempty_S.to(per_token.dtype).sum(), denominator)


def _divide(total: torch.Tensor, count: torch.Tensor, denominator: float | torch.Tensor | None) -> torch.Tensor:
    """``total / denominator`` if given, else ``total / max(count, 1)`` (an empty batch gives 0)."""
    if denominator is not None:
        return total / torch.as_tensor(denominator, dtype=total.dtype, device=total.device)
    return total / count.clamp(min=1.0)
