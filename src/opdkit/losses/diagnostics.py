"""Diagnostics of METHOD.md, computed without gradient; each is a 0-dim tensor (no host sync here).

Notation: ``...`` leading shape, ``K`` support slots, ``V`` vocabulary. All means are over the
unmasked positions; an empty mask gives 0.

They expose the paper's three failure modes in a run: reward imbalance (``negative_reward_frac``,
``reward_skew``), an unreliable teacher on the student's prefixes (teacher vs student mass on the
support, ``k1``), and tokens the support cannot explain (``sampled_outside_support_frac``).
"""

from __future__ import annotations

import torch

from opdkit.errors import InputError
from opdkit.losses._checks import check_float, check_int, check_mask, check_tensor

__all__ = [
    "masked_mean",
    "negative_reward_fraction",
    "reward_skew",
    "support_mass",
    "outside_support_fraction",
    "entropy",
    "opd_diagnostics",
]


def _mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    check_tensor("mask", mask)
    return check_mask("mask", mask, shape)


@torch.no_grad()
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x[...]`` over ``mask[...]`` (0 for an empty mask), in float32 or wider."""
    x = check_float("x", x)
    m = _mask(mask, x.shape)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    vals = torch.where(m, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    return vals.sum() / m.sum().clamp(min=1).to(dtype)


@torch.no_grad()
def negative_reward_fraction(
    teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Fraction of unmasked sampled tokens whose reward ``log q(y_t) − log π_old(y_t)`` is negative.

    Args: ``teacher_logprobs[...]``, ``old_logprobs[...]`` log-probs of the sampled tokens; ``mask[...]``.
    """
    r = check_float("teacher_logprobs", teacher_logprobs) - check_float("old_logprobs", old_logprobs)
    return masked_mean((r < 0).float(), mask)


@torch.no_grad()
def reward_skew(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sample skewness of the sampled-token rewards over unmasked positions (0 if fewer than 2 or constant)."""
    r = check_float("teacher_logprobs", teacher_logprobs).double() - check_float("old_logprobs", old_logprobs).double()
    m = _mask(mask, r.shape)
    finite = m & torch.isfinite(r)
    n = finite.sum()
    x = torch.where(finite, r, torch.zeros_like(r))
    mean = x.sum() / n.clamp(min=1)
    d = torch.where(finite, r - mean, torch.zeros_like(r))
    var = (d**2).sum() / n.clamp(min=1)
    skew = (d**3).sum() / n.clamp(min=1) / var.clamp(min=1e-300) ** 1.5
    return torch.where((n > 1) & (var > 0), skew, torch.zeros_like(skew)).float()


@torch.no_grad()
def support_mass(logprobs_K: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean full-vocabulary probability mass on the support: mean of ``Σ_k exp(logprobs_K)``.

    Args:
        logprobs_K: ``[..., K]`` full-vocab log-probs (teacher's or student's) on the support;
            ``-inf`` slots (padded) add nothing.
        mask: ``[...]``.
    """
    lp = check_float("logprobs_K", logprobs_K, min_dim=1)
    mass = torch.logsumexp(lp.float() if lp.dtype != torch.float64 else lp, dim=-1).exp()
    return masked_mean(mass, mask)


@torch.no_grad()
def outside_support_fraction(
    sampled_ids: torch.Tensor, support_ids: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Fraction of unmasked positions whose sampled token is not in the (unpadded) support.

    Args: ``sampled_ids[...]``, ``support_ids[..., K]``, ``teacher_logprobs[..., K]`` (``-inf`` = padded),
    ``mask[...]``.
    """
    sampled_ids = check_int("sampled_ids", sampled_ids)
    support_ids = check_int("support_ids", support_ids, min_dim=1)
    if support_ids.shape[:-1] != sampled_ids.shape or teacher_logprobs.shape != support_ids.shape:
        raise InputError(
            f"support_ids/teacher_logprobs: expected shape {list(sampled_ids.shape)} + [K], got "
            f"{list(support_ids.shape)} and {list(teacher_logprobs.shape)}"
        )
    inside = ((support_ids == sampled_ids.unsqueeze(-1)) & (teacher_logprobs > float("-inf"))).any(-1)
    return masked_mean((~inside).float(), mask)


@torch.no_grad()
def entropy(logits: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Mean entropy (nats) of ``softmax(logits[..., V] / temperature)`` over unmasked positions."""
    logits = check_float("logits", logits, min_dim=1)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    p = lp.exp()
    ent = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)
    return masked_mean(ent, mask)


@torch.no_grad()
def opd_diagnostics(
    mask: torch.Tensor,
    *,
    sampled_ids: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    teacher_sampled_logprobs: torch.Tensor | None = None,
    support_ids: torch.Tensor | None = None,
    teacher_support_logprobs: torch.Tensor | None = None,
    student_support_logprobs: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    per_token_loss: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Every diagnostic whose inputs are given, keyed by the names the run metrics use.

    Keys: ``negative_reward_frac``, ``reward_skew``, ``k1`` (mean ``log π_old − log q`` on the
    sampled token, a reverse-KL estimate), ``teacher_support_mass``, ``student_support_mass``
    (full-vocab student log-probs on the support, ``[..., K]``), ``sampled_outside_support_frac``,
    ``entropy`` (needs ``student_logits[..., V]``), ``loss_per_token`` (mean of ``per_token_loss``).
    """
    out: dict[str, torch.Tensor] = {}
    if teacher_sampled_logprobs is not None and old_logprobs is not None:
        out["negative_reward_frac"] = negative_reward_fraction(teacher_sampled_logprobs, old_logprobs, mask)
        out["reward_skew"] = reward_skew(teacher_sampled_logprobs, old_logprobs, mask)
        k1 = old_logprobs.double() - teacher_sampled_logprobs.double()
        out["k1"] = masked_mean(torch.where(torch.isfinite(k1), k1, torch.zeros_like(k1)), mask).float()
    if teacher_support_logprobs is not None:
        out["teacher_support_mass"] = support_mass(teacher_support_logprobs, mask)
    if student_support_logprobs is not None:
        out["student_support_mass"] = support_mass(student_support_logprobs, mask)
    if sampled_ids is not None and support_ids is not None and teacher_support_logprobs is not None:
        out["sampled_outside_support_frac"] = outside_support_fraction(
            sampled_ids, support_ids, teacher_support_logprobs, mask
        )
    if student_logits is not None:
        out["entropy"] = entropy(student_logits, mask, temperature=temperature)
    if per_token_loss is not None:
        out["loss_per_token"] = masked_mean(per_token_loss.detach(), mask)
    return out
