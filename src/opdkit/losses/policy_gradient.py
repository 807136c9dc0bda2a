"""Sampled-token OPD (METHOD.md objective 1): the baseline the paper shows is unstable.

Notation: ``...`` leading shape (usually ``B``), ``T`` response positions (the last axis).

Reward on the one sampled token ``y_t``: ``r_t = log q(y_t|c_t) − log π_old(y_t|c_t)`` (optionally
clipped to ``[−c, c]``). Discounted advantage over the unmasked positions of the same sequence:
``A_t = Σ_{t'≥t} γ^{t'−t} m_{t'} r_{t'}`` (``t, t'`` are positions on the last axis, so a masked
position still advances the discount). ``γ = 0`` is token-level OPD, ``γ = 1`` the sequence-level
estimator. The loss is the policy-gradient surrogate ``−A_t ρ_t`` or its PPO-clipped form, with
``ρ_t = exp(log π_θ(y_t) − log π_old(y_t))``; advantages are always detached.
"""

from __future__ import annotations

import torch

from opdkit.errors import InputError
from opdkit.losses._checks import (
    check_float,
    check_mask,
    check_no_nan,
    check_same_device,
    check_tensor,
    result_dtype,
)

__all__ = ["sampled_token_rewards", "sampled_token_advantages", "policy_gradient_loss", "topp_correction_weights"]


def _check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    a = check_float(a_name, a, min_dim=1)
    b = check_float(b_name, b, min_dim=1)
    check_tensor("mask", mask)
    check_same_device(**{a_name: a, b_name: b}, mask=mask)
    if a.shape != b.shape:
        raise InputError(f"{b_name}: expected the shape of {a_name} {list(a.shape)}, got {list(b.shape)}")
    return check_mask("mask", mask, a.shape)


def sampled_token_rewards(
    teacher_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
) -> torch.Tensor:
    """Per-token reward ``r_t = log q(y_t) − log π_old(y_t)``, clipped to ``[−clip, clip]`` if given.

    Args:
        teacher_logprobs: ``[..., T]`` the teacher's log-prob of each sampled token.
        old_logprobs: ``[..., T]`` the rollout student's (untruncated) log-prob of each sampled token.
        mask: ``[..., T]`` loss mask; rewards are 0 where it is 0.
        clip: optional bound ``c > 0``.

    Returns:
        ``[..., T]`` rewards (detached, float32 or wider).

    Raises:
        InputError: NaN anywhere, or a ``-inf`` teacher log-prob at an unmasked position with no clip
            (the teacher gives the sampled token probability 0: mask it, or set a clip).
    """
    mask_b = _check_pair("teacher_logprobs", teacher_logprobs, "old_logprobs", old_logprobs, mask)
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise InputError(f"clip: expected None or a number > 0, got {clip!r}")
    check_no_nan("teacher_logprobs", teacher_logprobs)
    check_no_nan("old_logprobs", old_logprobs)
    dtype = result_dtype(teacher_logprobs, old_logprobs)
    t = teacher_logprobs.detach().to(dtype)
    o = old_logprobs.detach().to(dtype)
    if clip is None:
        if bool(((t == float("-inf")) & mask_b).any()):
            raise InputError(
                "teacher_logprobs: -inf at an unmasked position (the teacher gives the sampled token "
                "probability 0); mask such tokens or set a reward clip"
            )
        if bool(((o == float("-inf")) & mask_b).any()):
            raise InputError("old_logprobs: -inf at an unmasked position (a token the student cannot sample)")
    t = torch.where(mask_b, t, torch.zeros_like(t))
    o = torch.where(mask_b, o, torch.zeros_like(o))
    r = t - o
    if clip is not None:
        r = r.clamp(-float(clip), float(clip))
    return torch.where(mask_b, r, torch.zeros_like(r))


def sampled_token_advantages(
    teacher_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 0.0,
    clip: float | None = None,
) -> torch.Tensor:
    """Discounted advantages ``A_t = Σ_{t'≥t} γ^{t'−t} r_{t'}`` over unmasked positions.

    Args:
        teacher_logprobs: ``[..., T]`` teacher log-prob of each sampled token.
        old_logprobs: ``[..., T]`` rollout student log-prob of each sampled token.
        mask: ``[..., T]`` loss mask (only unmasked rewards are summed; masked advantages are 0).
        gamma: discount in [0, 1]; 0 = token-level OPD, 1 = sequence-level estimator.
        clip: optional reward clip ``c > 0``.

    Returns:
        ``[..., T]`` detached advantages (float32 or wider).
    """
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0.0 <= gamma <= 1.0):
        raise InputError(f"gamma: expected a number in [0, 1], got {gamma!r}")
    r_T = sampled_token_rewards(teacher_logprobs, old_logprobs, mask, clip=clip)
    if gamma == 0.0:
        adv_T = r_T
    elif gamma == 1.0:
        adv_T = r_T.flip(-1).cumsum(-1).flip(-1)
    else:
        # The recursion A_t = r_t + γ A_{t+1}; a closed form with γ^{-t} overflows for long responses.
        adv_T = torch.empty_like(r_T)
        running = torch.zeros_like(r_T[..., 0])
        for t in range(r_T.shape[-1] - 1, -1, -1):
            running = r_T[..., t] + gamma * running
            adv_T[..., t] = running
    mask_b = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(mask_b, adv_T, torch.zeros_like(adv_T))


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = None,
) -> torch.Tensor:
    """Per-token policy-gradient surrogate for sampled-token OPD.

    ``L_t = −A_t ρ_t`` (REINFORCE; at the first update on a batch ``ρ = 1`` and ``∇L = −A ∇log π``),
    or with ``clip_eps = ε`` the PPO form ``−min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)``.

    Args:
        logprobs: ``[..., T]`` log π_θ of the sampled tokens (carries the gradient).
        old_logprobs: ``[..., T]`` log π_old of the same tokens (detached here).
        advantages: ``[..., T]`` advantages (detached here).
        mask: ``[..., T]`` loss mask; the loss and its gradient are 0 where it is 0.
        clip_eps: PPO clip range ε > 0, or None for the unclipped surrogate.

    Returns:
        ``[..., T]`` per-token loss.
    """
    mask_b = _check_pair("logprobs", logprobs, "old_logprobs", old_logprobs, mask)
    advantages = check_float("advantages", advantages, min_dim=1)
    check_same_device(logprobs=logprobs, advantages=advantages)
    if advantages.shape != logprobs.shape:
        raise InputError(
            f"advantages: expected the shape of logprobs {list(logprobs.shape)}, got {list(advantages.shape)}"
        )
    if clip_eps is not None and not (isinstance(clip_eps, (int, float)) and clip_eps > 0):
        raise InputError(f"clip_eps: expected None or a number > 0, got {clip_eps!r}")
    check_no_nan("logprobs", logprobs)
    check_no_nan("old_logprobs", old_logprobs)
    check_no_nan("advantages", advantages, allow_neg_inf=False)
    dtype = result_dtype(logprobs, old_logprobs, advantages)
    diff = logprobs.to(dtype) - old_logprobs.detach().to(dtype)
    # Masked positions may hold anything (padding): keep them out of exp() so no inf/NaN leaks.
    diff = torch.where(mask_b, diff, torch.zeros_like(diff))
    ratio = diff.exp()
    adv = torch.where(mask_b, advantages.detach().to(dtype), torch.zeros_like(diff))
    loss = -adv * ratio
    if clip_eps is not None:
        clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        loss = torch.maximum(loss, clipped)
    return torch.where(mask_b, loss, torch.zeros_like(loss))


def topp_correction_weights(
    old_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token",
    clip: float = 1.0,
    sampled_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance weights for rollouts drawn from the top-p truncated student (METHOD.md, "Top-p rollout
    mismatch"): the objectives treat the tokens as samples of π while they came from ``π_p = π / Z_t`` on the
    nucleus, so ``π(y_t) / π_p(y_t) = Z_t`` (the nucleus mass at that position, ≤ 1).

    Args:
        old_logprobs: ``[..., T]`` log π_old of the sampled tokens (untruncated).
        sampling_logprobs: ``[..., T]`` their log-prob under the truncated distribution they were drawn from.
        mask: ``[..., T]`` loss mask; weights are 0 where it is 0.
        mode: ``"token"``: ``w_t = Z_t`` (multiplies the token's loss ``−A_t ρ_t``; for γ = 0 that is its
            reward: the current token's sampling corrected);
            ``"sequence"``: every token of a sequence gets ``min(Π_t Z_t, clip)`` (the whole trajectory's
            importance weight; ``Π Z ≤ 1``, so ``clip`` acts only below 1).
        clip: the sequence weight's upper bound, > 0.
        sampled_mask: ``[..., T]`` the tokens drawn from the truncated policy (default ``mask``): the sequence
            weight's product runs over them, also over those the loss masks out (a masked end-of-turn token was
            still sampled from ``π_p``).

    Returns:
        ``[..., T]`` detached weights (float32 or wider). ``Z_t`` above 1 by rounding is taken as 1.
    """
    mask_b = _check_pair("old_logprobs", old_logprobs, "sampling_logprobs", sampling_logprobs, mask)
    if mode not in ("token", "sequence"):
        raise InputError(f"mode: expected 'token' or 'sequence', got {mode!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
        raise InputError(f"clip: expected a number > 0, got {clip!r}")
    check_no_nan("old_logprobs", old_logprobs)
    check_no_nan("sampling_logprobs", sampling_logprobs)
    if sampled_mask is None:
        drawn_b = mask_b
    else:
        if sampled_mask.shape != mask.shape:
            raise InputError(f"sampled_mask: expected the shape of mask {tuple(mask.shape)}, got "
                             f"{tuple(sampled_mask.shape)}")
        drawn_b = sampled_mask.bool()
    dtype = result_dtype(old_logprobs, sampling_logprobs)
    log_z = old_logprobs.detach().to(dtype) - sampling_logprobs.detach().to(dtype)
    log_z = torch.where(drawn_b | mask_b, log_z.clamp(max=0.0), torch.zeros_like(log_z))
    if mode == "token":
        w = log_z.exp()
    else:
        seq = torch.where(drawn_b, log_z, torch.zeros_like(log_z)).sum(-1, keepdim=True)
        w = seq.exp().clamp(max=float(clip)).expand_as(log_z)
    return torch.where(mask_b, w, torch.zeros_like(w))
