"""Distribution-level objectives: the support-set KL (the paper's method) and its relatives.

Notation: ``...`` any leading shape (usually ``B, T``), ``V`` vocabulary, ``K`` support slots.
``π`` the student being trained, ``q`` the teacher, ``S`` the support set of one position.

- ``support_kl`` (METHOD.md objective 3 and the extensions of 4): a divergence between student and
  teacher restricted to ``S``. With ``renormalize=True`` both are renormalised inside ``S``
  (``π̄ = softmax_S(student logits)``, ``q̄ = softmax_S(teacher log-probs)``) and only the K support
  logits of the student receive gradient. With ``renormalize=False`` the full-vocabulary
  probabilities are used on ``S`` (a truncated sum; gradient reaches every logit through the
  normaliser), optionally with a *tail bucket* slot holding ``1 - Σ_S`` of each distribution.
- ``full_reverse_kl`` (objective 2): ``Σ_v π(v) [log π(v) − log q(v)]`` over the whole vocabulary.

Numerics: every function computes in float32 or wider (bf16 inputs give float32 results), uses
``0 · log 0 = 0``, and keeps NaN out of values *and* gradients at masked positions, padded slots
(teacher log-prob ``-inf``) and positions whose support is entirely padded.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from opdkit.errors import InputError
from opdkit.losses._checks import (
    check_float,
    check_ids_in_range,
    check_int,
    check_leading,
    check_mask,
    check_no_nan,
    check_same_device,
    check_teacher_logprobs,
    check_tensor,
    result_dtype,
)

__all__ = ["support_kl", "full_reverse_kl", "support_divergence_from_logits", "Divergence"]

Divergence = Literal["reverse_kl", "forward_kl", "jsd"]
_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")

# Floor for tail-bucket probabilities: 1 - Σ_S rounds to 0 (or below) when S holds nearly all mass,
# and a zero teacher tail facing a non-zero student tail would make the loss infinite.
_TAIL_FLOOR = 1e-12


def _masked_log_softmax(x_K: torch.Tensor, valid_K: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid slots; ``-inf`` at invalid slots; finite garbage for empty rows.

    Rows with no valid slot are replaced by zeros before the logsumexp, so that neither the value
    nor the gradient of an empty row is NaN (those rows are masked out by the caller).
    """
    row_ok = valid_K.any(-1, keepdim=True)
    x = x_K.masked_fill(~valid_K, float("-inf"))
    x = torch.where(row_ok, x, torch.zeros_like(x))
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def _kl_sum(lp_a: torch.Tensor, lp_b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``Σ_valid a · (log a − log b)`` over the last axis, with ``0 · log 0 = 0``.

    The double ``where`` keeps gradients finite: slots that are excluded never see ``-inf``.
    """
    live = valid & (lp_a > float("-inf"))
    la = torch.where(live, lp_a, torch.zeros_like(lp_a))
    lb = torch.where(live, lp_b, torch.zeros_like(lp_b))
    return torch.where(live, la.exp() * (la - lb), torch.zeros_like(la)).sum(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x <= 0``, accurate on both sides of ``log 2``."""
    x = x.clamp(max=-1e-30)
    near = x > -math.log(2.0)
    # Each branch sees only inputs where it is finite, so the unused branch cannot leak a NaN gradient.
    x_near = torch.where(near, x, torch.full_like(x, -1.0))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _with_tail(lp_K: torch.Tensor, valid_K: torch.Tensor) -> torch.Tensor:
    """Append the tail slot ``log(max(1 − Σ_valid p, floor))`` -> ``[..., K+1]``."""
    mass = torch.logsumexp(lp_K.masked_fill(~valid_K, float("-inf")), dim=-1, keepdim=True)
    # Empty rows have mass -inf: the tail is then 1 (log 0), which _log1mexp handles via the clamp.
    mass = torch.where(torch.isfinite(mass), mass, torch.full_like(mass, -1e30))
    tail = _log1mexp(mass).clamp(min=math.log(_TAIL_FLOOR))
    return torch.cat([lp_K, tail], dim=-1)


def _divergence(
    lp_student: torch.Tensor, lp_teacher: torch.Tensor, valid: torch.Tensor, divergence: str, beta: float
) -> torch.Tensor:
    """Divergence between two (sub-)distributions given as log-probs on the same slots."""
    if divergence == "reverse_kl":
        return _kl_sum(lp_student, lp_teacher, valid)
    if divergence == "forward_kl":
        return _kl_sum(lp_teacher, lp_student, valid)
    # Generalized JSD(β) as in GKD: M = β q + (1 − β) π, JSD = β KL(q‖M) + (1 − β) KL(π‖M).
    # The endpoints are defined by their limits' KL forms, as GKD and TRL do: β = 0 is the forward
    # KL(q‖π) and β = 1 the reverse KL(π‖q).
    if beta == 0.0:
        return _kl_sum(lp_teacher, lp_student, valid)
    if beta == 1.0:
        return _kl_sum(lp_student, lp_teacher, valid)
    ls = torch.where(valid, lp_student, torch.zeros_like(lp_student))
    lt = torch.where(valid, lp_teacher, torch.zeros_like(lp_teacher))
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * _kl_sum(lt, lm, valid) + (1.0 - beta) * _kl_sum(ls, lm, valid)


def check_support_options(
    renormalize: bool, divergence: str, beta: float, tail_bucket: bool, temperature: float
) -> None:
    if divergence not in _DIVERGENCES:
        raise InputError(f"divergence: expected one of {', '.join(_DIVERGENCES)}, got {divergence!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise InputError(f"beta: expected a number in [0, 1], got {beta!r}")
    if tail_bucket and renormalize:
        raise InputError(
            "tail_bucket=True needs renormalize=False: after renormalisation inside the support the "
            "tail mass is 0 by construction"
        )
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise InputError(f"temperature: expected a number > 0, got {temperature!r}")


def support_divergence_from_logits(
    student_support_K: torch.Tensor,
    teacher_logprobs_K: torch.Tensor,
    *,
    renormalize: bool,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    tail_bucket: bool = False,
) -> torch.Tensor:
    """Core math of the support-set objectives on gathered values (no checks; internal API).

    Args:
        student_support_K: ``[..., K]`` student values on the support: logits (or any shift of them)
            when ``renormalize=True``; full-vocabulary log-probs when ``renormalize=False``.
        teacher_logprobs_K: ``[..., K]`` teacher full-vocab log-probs; ``-inf`` marks padded slots.

    Returns:
        ``[...]`` per-position divergence (0 where every slot is padded).
    """
    valid_K = teacher_logprobs_K > float("-inf")
    if renormalize:
        lp_s = _masked_log_softmax(student_support_K, valid_K)
        lp_t = _masked_log_softmax(teacher_logprobs_K, valid_K)
    else:
        lp_s, lp_t = student_support_K, teacher_logprobs_K
        if tail_bucket:
            lp_s, lp_t = _with_tail(lp_s, valid_K), _with_tail(lp_t, valid_K)
            valid_K = torch.cat([valid_K, valid_K.any(-1, keepdim=True)], dim=-1)
    out = _divergence(lp_s, lp_t, valid_K, divergence, beta)
    return torch.where(valid_K.any(-1), out, torch.zeros_like(out))


def check_support_inputs(
    ref: tuple[str, torch.Tensor],
    support_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    vocab: int,
    check_inputs: bool,
) -> torch.Tensor:
    """Validate the support-set arguments shared by the dense and the fused path; return bool mask.

    ``ref`` is ``(name, tensor[..., X])``: the tensor whose leading shape the others must share.
    """
    ref_name, ref_tensor = ref
    leading = ref_tensor.shape[:-1]
    support_ids = check_int("support_ids", support_ids, min_dim=1)
    teacher_logprobs = check_float("teacher_logprobs", teacher_logprobs, min_dim=1)
    check_tensor("mask", mask)
    check_same_device(**{ref_name: ref_tensor}, support_ids=support_ids, teacher_logprobs=teacher_logprobs, mask=mask)
    check_leading("support_ids", support_ids, leading, ref_name)
    if teacher_logprobs.shape != support_ids.shape:
        raise InputError(
            f"teacher_logprobs: expected the shape of support_ids {list(support_ids.shape)}, "
            f"got {list(teacher_logprobs.shape)}"
        )
    mask_b = check_mask("mask", mask, leading, check_values=check_inputs)
    if check_inputs:
        check_teacher_logprobs("teacher_logprobs", teacher_logprobs)
        check_ids_in_range("support_ids", support_ids, vocab, valid=teacher_logprobs > float("-inf"))
    return mask_b


def support_kl(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    renormalize: bool = True,
    divergence: Divergence = "reverse_kl",
    beta: float = 0.5,
    tail_bucket: bool = False,
    temperature: float = 1.0,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Per-token support-set divergence from full student logits (METHOD.md objectives 3 and 4).

    With the defaults this is the paper's objective:
    ``L_t = KL(π̄_θ ‖ q̄) = Σ_{v∈S_t} π̄_θ(v) [log π̄_θ(v) − log q̄(v)]`` with both distributions
    renormalised inside the support ``S_t``.

    Args:
        student_logits: ``[..., V]`` logits of the student being trained (divided by ``temperature``).
        support_ids: ``[..., K]`` int ids of the support set (any source; see ``opdkit.losses.support``).
        teacher_logprobs: ``[..., K]`` the teacher's full-vocab log-probs at ``support_ids``;
            ``-inf`` marks a padded slot, which contributes nothing (its id is not read).
        mask: ``[...]`` bool or 0/1 loss mask; the result is 0 where it is 0.
        renormalize: renormalise both distributions inside the support (the paper's method). False is
            the ablation: full-vocab probabilities on the support, a truncated sum that can be negative.
        divergence: ``"reverse_kl"`` KL(π‖q) (default), ``"forward_kl"`` KL(q‖π), or ``"jsd"``, the
            generalized JSD(β) of GKD (β = 0: forward KL, β = 1: reverse KL).
        beta: the JSD interpolation weight in [0, 1].
        tail_bucket: with ``renormalize=False``, add one slot holding ``1 − Σ_S`` of each distribution,
            so that student mass outside the support is penalised.
        temperature: student logits are divided by it (teacher log-probs must already be tempered).
        check_inputs: validate values (NaN, ids in range, 0/1 mask); costs one pass and a host sync.

    Returns:
        ``[...]`` per-token loss in float32 (float64 for float64 inputs); 0 where masked.

    Raises:
        InputError: wrong shapes, dtypes or devices; NaN inputs; support ids outside ``[0, V)``.
    """
    student_logits = check_float("student_logits", student_logits, min_dim=1)
    check_support_options(renormalize, divergence, beta, tail_bucket, temperature)
    mask_b = check_support_inputs(
        ("student_logits", student_logits), support_ids, teacher_logprobs, mask, student_logits.shape[-1], check_inputs
    )
    if check_inputs:
        check_no_nan("student_logits", student_logits, allow_neg_inf=False)

    dtype = result_dtype(student_logits, teacher_logprobs)
    valid_K = teacher_logprobs > float("-inf")
    ids_K = torch.where(valid_K, support_ids, torch.zeros_like(support_ids)).long()
    logits = student_logits.to(dtype) / temperature
    if renormalize:
        student_K = logits.gather(-1, ids_K)
    else:
        student_K = torch.log_softmax(logits, dim=-1).gather(-1, ids_K)
    per_token = support_divergence_from_logits(
        student_K,
        teacher_logprobs.to(dtype),
        renormalize=renormalize,
        divergence=divergence,
        beta=beta,
        tail_bucket=tail_bucket,
    )
    return torch.where(mask_b, per_token, torch.zeros_like(per_token))


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Per-token full-vocabulary reverse KL ``Σ_v π(v) [log π(v) − log q(v)]`` (METHOD.md objective 2).

    Args:
        student_logits: ``[..., V]`` student logits.
        teacher_logits: ``[..., V]`` teacher logits over the same vocabulary (``-inf`` allowed: the
            teacher gives those ids probability 0; the KL is then infinite if the student does not).
        mask: ``[...]`` bool or 0/1 loss mask.
        temperature: both logits are divided by it.

    Returns:
        ``[...]`` per-token KL in float32 (float64 for float64 inputs); 0 where masked.

    Gradients: with respect to the student logits in closed form (first derivatives only: a double backward
    raises); when ``teacher_logits`` requires grad, by autograd for both (second derivatives too).
    """
    student_logits = check_float("student_logits", student_logits, min_dim=1)
    teacher_logits = check_float("teacher_logits", teacher_logits, min_dim=1)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise InputError(f"temperature: expected a number > 0, got {temperature!r}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise InputError(
            f"teacher_logits: expected the shape of student_logits {list(student_logits.shape)}, got "
            f"{list(teacher_logits.shape)} (a different vocabulary size? slice padded embedding rows first)"
        )
    check_tensor("mask", mask)
    check_same_device(student_logits=student_logits, mask=mask)
    mask_b = check_mask("mask", mask, student_logits.shape[:-1], check_values=check_inputs)
    if check_inputs:
        check_no_nan("student_logits", student_logits, allow_neg_inf=False)
        check_no_nan("teacher_logits", teacher_logits, allow_neg_inf=True)
    dtype = result_dtype(student_logits, teacher_logits)
    z = student_logits.to(dtype) / temperature
    lp_t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    V = z.shape[-1]
    per_token = None
    if not lp_t.requires_grad:  # the closed-form gradient is the student's only (a teacher is frozen)
        per_token = _ReverseKLFromLogits.apply(z.reshape(-1, V), lp_t.reshape(-1, V)).reshape(z.shape[:-1])
    if per_token is None or not bool(torch.isfinite(per_token).all()):
        # A teacher that is differentiated, -inf student logits (0 · -inf), or a teacher zero under student
        # mass: autograd through the guarded formula. Masked rows compare the student with itself, so an
        # infinite KL there cannot send a NaN gradient (inf · 0) back through the mask.
        lp_s = torch.log_softmax(z, dim=-1)
        lp_t = torch.where(mask_b[..., None], lp_t, lp_s.detach())
        per_token = _kl_sum(lp_s, lp_t, torch.ones_like(lp_s, dtype=torch.bool))
    return torch.where(mask_b, per_token, torch.zeros_like(per_token))


class _ReverseKLFromLogits(torch.autograd.Function):
    """Per row ``KL = Σ_v p (log p − log q)`` with ``p = softmax(z)``, ``log q`` given (normalised), and the
    closed-form gradient ``∂KL/∂z = p ⊙ (log p − log q − KL)`` (``log q`` gets none).

    First derivatives only (a double backward raises). Autograd through log-softmax, exp, product and sum
    makes about three times the passes over ``[N, V]``;
    at a 150k vocabulary those passes, not the head's matmul, are the cost of ``full_reverse_kl``.
    """

    @staticmethod
    def forward(ctx, z_N_V, lq_N_V):
        lp = torch.log_softmax(z_N_V, dim=-1)
        p = lp.exp()
        diff = lp.sub_(lq_N_V)  # log p − log q, in lp's buffer
        kl_N = torch.linalg.vecdot(p, diff)
        ctx.save_for_backward(p, diff, kl_N)
        return kl_N

    @staticmethod
    @once_differentiable  # second derivatives would need the graph of p and diff: refuse rather than be wrong
    def backward(ctx, g_N):
        p, diff, kl_N = ctx.saved_tensors
        grad = diff - kl_N[:, None]
        return grad.mul_(p).mul_(g_N[:, None]), None
