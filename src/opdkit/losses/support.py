"""Local support sets and special-token masks.

Notation: ``...`` any leading shape (usually ``B, T``), ``V`` vocabulary, ``K`` support size.
A support set is a pair ``(support_ids[..., K], teacher_logprobs[..., K])`` where the teacher
log-probs are *full-vocabulary* normalised. A slot whose teacher log-prob is ``-inf`` is a padded
slot: it is not part of the support and contributes nothing to any objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from opdkit.errors import InputError
from opdkit.losses._checks import (
    as_id_tensor,
    check_float,
    check_ids_in_range,
    check_int,
    check_leading,
    check_mask,
    check_no_nan,
    check_same_device,
)

__all__ = [
    "teacher_topk_support",
    "student_topk_support",
    "gather_logprobs",
    "add_sampled_token",
    "drop_support_ids",
    "nucleus_support",
    "NUCLEUS_MASS_TOL",
    "special_token_mask",
]

NUCLEUS_MASS_TOL = 1e-6  # nucleus_support: a mass within this of top_p has reached it (float rounding)


def _check_k(k: int, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise InputError(f"k: expected 1 <= k <= V = {vocab}, got {k}")
    return k


def _check_support(support_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A support set's ids ``[..., K]`` and teacher log-probs ``[..., K]``, checked (types, same shape)."""
    support_ids = check_int("support_ids", support_ids, min_dim=1)
    teacher_logprobs = check_float("teacher_logprobs", teacher_logprobs, min_dim=1)
    if teacher_logprobs.shape != support_ids.shape:
        raise InputError(
            f"teacher_logprobs: expected the shape of support_ids {list(support_ids.shape)}, "
            f"got {list(teacher_logprobs.shape)}"
        )
    return support_ids, teacher_logprobs


def _check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise InputError(f"temperature: expected a number > 0, got {temperature!r}")
    return float(temperature)


def teacher_topk_support(
    teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K support set.

    Args:
        teacher_logits: ``[..., V]`` teacher logits.
        k: support size, ``1 <= k <= V``.
        temperature: logits are divided by it before the softmax.

    Returns:
        ``(support_ids[..., K] int64, teacher_logprobs[..., K])``: ids of the K largest logits (in
        decreasing order) and their full-vocabulary log-probs, in float32 or wider. Ids where the
        teacher's logit is ``-inf`` get log-prob ``-inf`` and so count as padded slots.
    """
    teacher_logits = check_float("teacher_logits", teacher_logits, min_dim=1)
    k = _check_k(k, teacher_logits.shape[-1])
    temperature = _check_temperature(temperature)
    check_no_nan("teacher_logits", teacher_logits)
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    logprobs_V = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    values_K, ids_K = torch.topk(logprobs_V, k, dim=-1)
    return ids_K, values_K


def gather_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Full-vocabulary log-probs of ``logits[..., V]`` at ``ids[..., K]`` -> ``[..., K]`` (float32+)."""
    logits = check_float("logits", logits, min_dim=1)
    ids = check_int("ids", ids, min_dim=1)
    check_same_device(logits=logits, ids=ids)
    check_leading("ids", ids, logits.shape[:-1], "logits")
    check_ids_in_range("ids", ids, logits.shape[-1])
    temperature = _check_temperature(temperature)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1).gather(-1, ids.long())


def student_topk_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``student_topk`` support source: the old student's top-K ids, scored by the teacher.

    Args:
        student_logits: ``[..., V]`` logits of the student that produced the rollout (frozen).
        teacher_logits: ``[..., V]`` teacher logits at the same positions.
        k: support size.

    Returns:
        ``(support_ids[..., K], teacher_logprobs[..., K])`` with the teacher's full-vocab log-probs.
    """
    student_logits = check_float("student_logits", student_logits, min_dim=1)
    teacher_logits = check_float("teacher_logits", teacher_logits, min_dim=1)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise InputError(
            f"teacher_logits: expected the shape of student_logits {list(student_logits.shape)}, "
            f"got {list(teacher_logits.shape)}"
        )
    k = _check_k(k, student_logits.shape[-1])
    ids_K = torch.topk(student_logits.detach(), k, dim=-1).indices
    return ids_K, gather_logprobs(teacher_logits, ids_K, temperature=temperature)


def add_sampled_token(
    support_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_teacher_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``teacher_topk_plus_sampled`` source: ``S ∪ {y_t}`` in K+1 slots.

    Args:
        support_ids: ``[..., K]`` teacher top-K ids.
        teacher_logprobs: ``[..., K]`` their full-vocab teacher log-probs.
        sampled_ids: ``[...]`` the sampled token ``y_t``.
        sampled_teacher_logprobs: ``[...]`` the teacher's full-vocab log-prob of ``y_t``.

    Returns:
        ``(ids[..., K+1], logprobs[..., K+1])``. The extra slot holds ``y_t`` when it is not already in
        the support; otherwise it is a padded slot (log-prob ``-inf``, weight 0).
    """
    support_ids, teacher_logprobs = _check_support(support_ids, teacher_logprobs)
    sampled_ids = check_int("sampled_ids", sampled_ids)
    sampled_teacher_logprobs = check_float("sampled_teacher_logprobs", sampled_teacher_logprobs)
    check_same_device(
        support_ids=support_ids,
        teacher_logprobs=teacher_logprobs,
        sampled_ids=sampled_ids,
        sampled_teacher_logprobs=sampled_teacher_logprobs,
    )
    check_leading("sampled_ids", sampled_ids, support_ids.shape[:-1], "support_ids", trailing=0)
    check_leading(
        "sampled_teacher_logprobs", sampled_teacher_logprobs, support_ids.shape[:-1], "support_ids", trailing=0
    )
    present = (support_ids == sampled_ids.unsqueeze(-1)).any(-1)
    extra_lp = torch.where(
        present,
        torch.full_like(sampled_teacher_logprobs, float("-inf"), dtype=teacher_logprobs.dtype),
        sampled_teacher_logprobs.to(teacher_logprobs.dtype),
    )
    ids = torch.cat([support_ids, sampled_ids.to(support_ids.dtype).unsqueeze(-1)], dim=-1)
    logprobs = torch.cat([teacher_logprobs, extra_lp.unsqueeze(-1)], dim=-1)
    return ids, logprobs


def nucleus_support(
    support_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    top_p: float,
    *,
    min_k: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus support sets (METHOD.md objective 5): per position, the fewest of the teacher's most likely
    ids whose probability reaches ``top_p``, at least ``min_k`` and at most the K given.

    Args:
        support_ids: ``[..., K]`` the teacher's top-K ids (``K = K_max``; any order).
        teacher_logprobs: ``[..., K]`` their full-vocabulary teacher log-probs (``-inf``: a padded slot).
        top_p: the mass to reach, in (0, 1]. When the K ids hold less, all K are kept (the cap).
        min_k: the fewest ids kept (not counting padded slots), ``1 <= min_k``.

    Returns:
        ``(support_ids[..., K], teacher_logprobs[..., K])``: the same ids, with the slots outside the nucleus
        turned into padded slots (log-prob ``-inf``). A slot is kept when the mass of the ids ranked before
        it (by the teacher's probability; ties by slot order) is below ``top_p`` by more than
        ``NUCLEUS_MASS_TOL`` (1e-6: a mass within it of ``top_p`` has reached it; without the tolerance
        0.6 + 0.3 < 0.9 in floating point would keep a third id), or its rank is below ``min_k``.
    """
    support_ids, teacher_logprobs = _check_support(support_ids, teacher_logprobs)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if isinstance(min_k, bool) or not isinstance(min_k, int) or min_k < 1:
        raise InputError(f"min_k: expected an int >= 1, got {min_k!r}")
    check_no_nan("teacher_logprobs", teacher_logprobs)
    if top_p >= 1.0:  # every slot: a float32 running mass can reach 1 before the last ids (rounding)
        return support_ids, teacher_logprobs
    lp = teacher_logprobs.to(torch.float64)
    # stable sort: equal probabilities keep their slot order, so the kept set is deterministic
    order = torch.sort(lp, dim=-1, descending=True, stable=True).indices
    sorted_p = lp.gather(-1, order).exp()
    before = sorted_p.cumsum(-1) - sorted_p  # the mass ranked before each slot
    rank = torch.arange(lp.shape[-1], device=lp.device)
    keep_sorted = (before < float(top_p) - NUCLEUS_MASS_TOL) | (rank < min_k)
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return support_ids, teacher_logprobs.masked_fill(~keep, float("-inf"))


def drop_support_ids(
    support_ids: torch.Tensor, teacher_logprobs: torch.Tensor, drop_ids: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Turn the support slots that hold any of ``drop_ids`` into padded slots.

    Returns a new ``teacher_logprobs[..., K]`` with ``-inf`` where ``support_ids`` is in ``drop_ids``
    (used to keep special tokens out of the support set).
    """
    support_ids, teacher_logprobs = _check_support(support_ids, teacher_logprobs)
    drop = as_id_tensor("drop_ids", drop_ids, support_ids.device)
    hit = torch.isin(support_ids, drop)
    return teacher_logprobs.masked_fill(hit, float("-inf"))


def special_token_mask(
    sampled_ids: torch.Tensor,
    special_ids: Sequence[int] | torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: Literal["first", "all"] = "first",
) -> torch.Tensor:
    """Zero the loss mask where the sampled token is a listed special token.

    Args:
        sampled_ids: ``[..., T]`` sampled token ids (the last axis is the response).
        special_ids: ids to mask (a sequence of ints or a 1-D tensor); may be empty.
        mask: ``[..., T]`` loss mask (bool or 0/1); only positions where it is set count as occurrences.
        mode: ``"first"`` masks only the first occurrence of each listed id in each response (the
            authors' choice); ``"all"`` masks every occurrence.

    Returns:
        ``mask`` (same dtype) with the matching positions set to 0.
    """
    sampled_ids = check_int("sampled_ids", sampled_ids, min_dim=1)
    mask_t = check_mask("mask", mask, sampled_ids.shape)
    check_same_device(sampled_ids=sampled_ids, mask=mask)
    if mode not in ("first", "all"):
        raise InputError(f"mode: expected 'first' or 'all', got {mode!r}")
    special = as_id_tensor("special_ids", special_ids, sampled_ids.device).unique()
    if special.numel() == 0:
        return mask.clone()
    hit_T_S = (sampled_ids.unsqueeze(-1) == special) & mask_t.unsqueeze(-1)
    if mode == "first":
        hit_T_S = hit_T_S & (hit_T_S.long().cumsum(dim=-2) == 1)
    drop_T = hit_T_S.any(-1)
    return mask.masked_fill(drop_T, 0 if mask.dtype != torch.bool else False)
