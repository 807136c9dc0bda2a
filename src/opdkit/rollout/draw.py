"""One generation step's draw, fused: statistics, truncation and the seeded sample in a few passes over V.

Given the raw logits of a step ``[B, V]`` this computes, for every row,

- the tempered, untruncated student distribution ``softmax(x / τ)``: its log-prob at the drawn token (π_old),
  its entropy and log-normaliser — what a teacher-forced student pass computes
  (``opdkit.student.student_pass``);
- the truncated distribution that is sampled: the blocked token (pad) removed, then transformers'
  ``TopKLogitsWarper`` set (ties at the k-th value kept) and the top-p nucleus
  (:func:`opdkit.rollout.nucleus.nucleus`, the exact float64 rule, no sort of a large V), and the log-prob of the
  drawn token under it;
- the draw itself, by inversion: with ``u`` the trajectory's uniform for this step
  (:func:`opdkit.rollout.seeding.step_uniforms`), the first kept token *in id order* at which the cumulative
  kept probability (float64) exceeds ``u`` times the kept total. A row's token therefore depends only on its
  own logits, seed and step, never on the batch.

Why fused: at V = 151,936 the cost of sampling one token on a small model is passes over the ``B x V`` row,
not the forward. A chain of logits processors (record, block, temperature, top-k, top-p with its sort,
record, per-token noise) made some 40 of them per token; this makes about eight (scale, max, exp, sum, a
dot for the entropy, the top-64 selection; with a wide nucleus a histogram pass and a cumulative sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdkit.rollout.nucleus import candidates_from_mask, nucleus, top_p_keep
from opdkit.rollout.seeding import step_uniforms

__all__ = ["Draw", "draw_step", "invert"]


@dataclass(frozen=True)
class Draw:
    """One step of every row: the drawn token and what the trainer keeps about it (all ``[B]``)."""

    token_B: torch.Tensor  # long
    old_logprob_B: torch.Tensor  # log π(token) under the tempered, untruncated student
    sampling_logprob_B: torch.Tensor  # log of the truncated distribution that was sampled, at token
    entropy_B: torch.Tensor | None  # of the tempered, untruncated student (None unless asked)
    logsumexp_B: torch.Tensor  # log-normaliser of the tempered logits


def invert(weights_R_K: torch.Tensor, u_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_R, total_R)``: the first position whose cumulative weight exceeds ``u · total``, and the
    total (float64). Zero weights are never chosen (the cumulative sum does not grow there).

    Short rows (candidate lists) accumulate in float64. Rows over the whole vocabulary use torch's float32
    ``cumsum``, which adds in float64 and rounds each partial sum to float32 (relative error ≤ 6e-8 of the
    total, so no token's probability moves by more than that); it saves two passes over ``B x V``.
    """
    K = weights_R_K.shape[1]
    cum_R_K = weights_R_K.cumsum(-1) if K > 4096 else weights_R_K.double().cumsum(-1)
    total_R = cum_R_K[:, -1]
    target_R = (u_R * total_R.double()).to(cum_R_K.dtype)
    pos_R = torch.searchsorted(cum_R_K, target_R[:, None], right=True)[:, 0]
    over = pos_R >= K  # u · total rounded up to the total (probability ~2^-24 at worst)
    if bool(over.any()):
        last = torch.arange(K, device=pos_R.device)[None, :].expand(int(over.sum()), -1)
        pos_R[over] = torch.where(weights_R_K[over] > 0, last, -1).amax(-1)
    return pos_R, total_R.double()


def _entropy_rows(y_R_V: torch.Tensor, lse_R: torch.Tensor) -> torch.Tensor:
    """The student pass' own formula (used where the fast one is not finite, e.g. -inf logits)."""
    lp = y_R_V - lse_R[:, None]
    return -(lp.exp() * lp).nan_to_num().sum(-1)


def _top_k_candidates(y_B_V: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``TopKLogitsWarper``'s set: every token at least as large as the k-th largest (ties included)."""
    vals, ids = torch.topk(y_B_V, k, dim=-1)
    thr_B = vals[:, -1:]
    if bool(((y_B_V >= thr_B).sum(-1) == k).all()):
        return ids, vals > float("-inf")
    return candidates_from_mask(y_B_V >= thr_B)  # a tie at the k-th value: the warper keeps all of them


def _draw_candidates(e_R_V, ids_R_K, valid_R_K, u_R):
    """Inversion over candidate lists, in id order: ``(token_R, kept total_R)``."""
    ids_R_K = torch.where(valid_R_K, ids_R_K, e_R_V.shape[1])
    ids_R_K, _ = ids_R_K.sort(-1)  # id order; invalid slots (id V) last
    ok = ids_R_K < e_R_V.shape[1]
    w = torch.where(ok, e_R_V.gather(1, ids_R_K.clamp(max=e_R_V.shape[1] - 1)), 0.0)
    pos, total = invert(w, u_R)
    return ids_R_K.gather(1, pos[:, None])[:, 0], total


def draw_step(scores_B_V: torch.Tensor, *, seeds_B, step: int, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, block_id: int | None = None, stats: bool = True) -> Draw:
    """Draw one token per row from ``scores_B_V`` (raw logits) as described in the module docstring.

    ``seeds_B`` (ints, or an int64 tensor) and ``step`` select the uniform
    (:func:`opdkit.rollout.seeding.step_uniforms`); ``block_id`` is a token never drawn (the pad token);
    ``stats`` also computes the entropy.
    """
    B, V = scores_B_V.shape
    y = scores_B_V.float() / temperature  # TemperatureLogitsWarper's arithmetic (x / 1.0 is x); our own copy
    # --- the tempered, untruncated distribution: max, exp, sum (and one dot for the entropy)
    m_B = y.amax(-1)
    d = y - m_B[:, None]
    e = d.exp()  # unnormalised probabilities, relative to the row's max
    s_B = e.sum(-1)
    lse_B = m_B + s_B.log()
    entropy_B = None
    if stats:
        # H = log s - Σ e·d / s  (p = e / s, log p = d - log s); vecdot makes no [B, V] temporary
        entropy_B = s_B.log() - torch.linalg.vecdot(e, d) / s_B
        bad = ~torch.isfinite(entropy_B)
        if bool(bad.any()):  # -inf logits make 0 · -inf: the student pass' formula, which drops those terms
            entropy_B[bad] = _entropy_rows(y[bad], lse_B[bad])
    del d
    # --- the truncated distribution that is sampled, and the draw (the blocked token is never drawn, so
    # blocking it in place leaves y at the drawn token as it was)
    if block_id is not None:
        e[:, block_id] = 0.0
        y[:, block_id] = float("-inf")
    u_B = step_uniforms(seeds_B, step, device=y.device)
    token_B = torch.empty(B, dtype=torch.long, device=y.device)
    total_B = torch.empty(B, dtype=torch.float64, device=y.device)
    if 0 < top_k < V:
        ids, valid = _top_k_candidates(y, top_k)
        if top_p < 1.0:  # then the nucleus inside the top-k set, as the warper chain applies them
            vals = torch.where(valid, y.gather(1, ids), float("-inf"))
            valid &= top_p_keep(vals, top_p, match_rounding=False)
        token_B, total_B = _draw_candidates(e, ids, valid, u_B)
    elif top_p < 1.0:
        s_t_B = e.sum(-1) if block_id is not None else s_B
        nu = nucleus(y, top_p, probs=(e, s_t_B, m_B), match_rounding=False)
        if nu.narrow_rows.numel():
            r = nu.narrow_rows
            token_B[r], total_B[r] = _draw_candidates(e[r], nu.ids_R_K, nu.valid_R_K, u_B[r])
        if nu.wide_rows.numel():
            r = nu.wide_rows
            e_r = e if r.numel() == B else e[r]  # wide rows hold their kept set as a mask over V
            token_B[r], total_B[r] = invert(torch.where(nu.keep_W_V, e_r, 0.0), u_B[r])
    else:
        token_B, total_B = invert(e, u_B)
    y_tok_B = y.gather(1, token_B[:, None])[:, 0]
    samp_B = ((y_tok_B - m_B).double() - total_B.log()).float()
    return Draw(token_B=token_B, old_logprob_B=y_tok_B - lse_B, sampling_logprob_B=samp_B,
                entropy_B=entropy_B, logsumexp_B=lse_B)
