"""Brute-force float64 references for the objectives: explicit loops and textbook formulas.

Deliberately naive (a loop over positions, explicit softmax and sums) so that they share no code and
no numerical tricks with ``opdkit.losses``. They are differentiable, so gradients can be compared too.
"""

from __future__ import annotations

import math

import torch


def softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max())
    return e / e.sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p log(p/q) with 0 log 0 = 0."""
    total = torch.zeros((), dtype=p.dtype)
    for i in range(p.shape[0]):
        if p[i] > 0:
            total = total + p[i] * (torch.log(p[i]) - torch.log(q[i]))
    return total


def divergence(p_student: torch.Tensor, q_teacher: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return kl(p_student, q_teacher)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kl(q_teacher, p_student)
    m = beta * q_teacher + (1 - beta) * p_student
    return beta * kl(q_teacher, m) + (1 - beta) * kl(p_student, m)


def support_objective(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    renormalize: bool = True,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    tail_bucket: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position support objective by a loop; ``[..., V]`` logits -> ``[...]``."""
    lead = student_logits.shape[:-1]
    V, K = student_logits.shape[-1], support_ids.shape[-1]
    logits = student_logits.reshape(-1, V)
    ids = support_ids.reshape(-1, K)
    tlp = teacher_logprobs.reshape(-1, K).double()
    m = mask.reshape(-1)
    out = []
    for n in range(logits.shape[0]):
        valid = [k for k in range(K) if tlp[n, k] > -math.inf]
        if not bool(m[n]) or not valid:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        slot_ids = torch.tensor([int(ids[n, k]) for k in valid])
        s = logits[n].double() / temperature
        if renormalize:
            p = softmax(s[slot_ids])
            q = softmax(tlp[n, valid])
        else:
            p = softmax(s)[slot_ids]
            q = torch.exp(tlp[n, valid])
            if tail_bucket:
                p = torch.cat([p, torch.clamp(1 - p.sum(), min=1e-12).reshape(1)])
                q = torch.cat([q, torch.clamp(1 - q.sum(), min=1e-12).reshape(1)])
        out.append(divergence(p, q, kind, beta))
    return torch.stack(out).reshape(lead)


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).double()
    t = teacher_logits.reshape(-1, V).double()
    m = mask.reshape(-1)
    zero = torch.zeros((), dtype=torch.float64)
    out = [kl(softmax(s[n]), softmax(t[n])) if bool(m[n]) else zero for n in range(s.shape[0])]
    return torch.stack(out).reshape(student_logits.shape[:-1])


def advantages(teacher_lp: torch.Tensor, old_lp: torch.Tensor, mask: torch.Tensor, gamma: float, clip=None):
    """``A_t = Σ_{t'≥t} γ^{t'−t} m_{t'} r_{t'}`` by a double loop, on ``[B, T]``."""
    B, T = teacher_lp.shape
    r = (teacher_lp.double() - old_lp.double())
    if clip is not None:
        r = r.clamp(-clip, clip)
    A = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not bool(mask[b, t]):
                continue
            A[b, t] = sum(gamma ** (u - t) * r[b, u] for u in range(t, T) if bool(mask[b, u]))
    return A


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    rows = per_token.reshape(-1, per_token.shape[-1])
    ms = mask.reshape(-1, per_token.shape[-1]).bool()
    if mode == "token-mean":
        vals = [rows[i, j] for i in range(rows.shape[0]) for j in range(rows.shape[1]) if ms[i, j]]
        return torch.stack(vals).sum() / len(vals) if vals else torch.zeros((), dtype=per_token.dtype)
    per_seq = []
    for i in range(rows.shape[0]):
        vals = [rows[i, j] for j in range(rows.shape[1]) if ms[i, j]]
        if vals:
            s = torch.stack(vals).sum()
            per_seq.append(s / len(vals) if mode == "seq-mean-token-mean" else s)
    return torch.stack(per_seq).mean() if per_seq else torch.zeros((), dtype=per_token.dtype)
