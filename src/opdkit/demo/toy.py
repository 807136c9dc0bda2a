"""A seconds-long, pure-torch on-policy distillation run on a Markov (bigram) language model.

The student and the teacher are tables of next-token logits indexed by (position, previous token),
so every quantity is exact and cheap, yet the loop is the real one: the student samples with top-p,
the teacher scores its prefixes, and an objective of ``opdkit.losses`` drives an Adam step. The
score is the sequence-level reverse KL(π‖q), estimated on fresh student samples.

Three arms on the same seed and budget: sampled-token OPD (top-p 1.0, the baseline), the paper's
renormalised teacher-top-K KL (top-p 0.9), and the same support with a tail bucket (not renormalised,
plus one slot for the mass outside the support). The renormalised KL only shapes the student *inside*
the support; it cannot move mass into it, so it helps when the student's mass already sits mostly on
the teacher's top-K (as for an instruct model distilled from a stronger one) and not otherwise. The
tail bucket keeps the support-set signal and also penalises mass outside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from opdkit.losses import (
    aggregate,
    policy_gradient_loss,
    sampled_token_advantages,
    support_kl,
    teacher_topk_support,
)

TOY_OBJECTIVES = ("sampled_token", "support_kl", "support_kl_tail")


@dataclass(frozen=True)
class ToySettings:
    vocab: int = 64
    length: int = 12
    batch: int = 64
    steps: int = 80
    lr: float = 0.05
    top_k: int = 16
    top_p: float = 0.9
    seed: int = 0


class MarkovLM:
    """Next-token logits ``table[t, prev, :]``: ``[T, V+1, V]`` (row V is the start state)."""

    def __init__(self, table_T_P_V: torch.Tensor):
        self.table = table_T_P_V

    def logits(self, tokens_B_T: torch.Tensor) -> torch.Tensor:
        """Logits at every position given the sampled tokens: ``[B, T, V]``."""
        B, T = tokens_B_T.shape
        start = torch.full((B, 1), self.table.shape[1] - 1, dtype=torch.long)
        prev_B_T = torch.cat([start, tokens_B_T[:, :-1]], dim=1)
        return self.table[torch.arange(T).expand(B, T), prev_B_T]

    @torch.no_grad()
    def sample(self, batch: int, top_p: float, generator: torch.Generator) -> torch.Tensor:
        T, _, V = self.table.shape
        prev = torch.full((batch,), self.table.shape[1] - 1, dtype=torch.long)
        out = torch.empty(batch, T, dtype=torch.long)
        for t in range(T):
            probs = torch.softmax(self.table[t, prev], dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the nucleus: smallest prefix with mass >= p
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
            prev = order.gather(-1, choice).squeeze(-1)
            out[:, t] = prev
        return out


@torch.no_grad()
def sequence_reverse_kl(student: MarkovLM, teacher: MarkovLM, generator: torch.Generator, n: int = 2048) -> float:
    """Monte-Carlo ``E_{y~π}[log π(y) − log q(y)]`` on untruncated student samples."""
    y = student.sample(n, 1.0, generator)
    lp_s = torch.log_softmax(student.logits(y), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).sum(-1)
    lp_t = torch.log_softmax(teacher.logits(y), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).sum(-1)
    return float((lp_s - lp_t).mean())


def run_toy(objective: str, cfg: ToySettings = ToySettings()) -> dict[str, float]:
    """Distil a perturbed student into a peaked teacher.

    ``objective`` is ``sampled_token``, ``support_kl`` (renormalised) or ``support_kl_tail``.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    T, V = cfg.length, cfg.vocab
    teacher = MarkovLM(torch.randn(T, V + 1, V, generator=g) * 3.0)
    # A student that already knows roughly where the mass is (as an instruct model does): the
    # renormalised support KL shapes the distribution inside the support but cannot move mass into
    # it, so a student starting uniform over 64 tokens would be the wrong test (see the tail bucket).
    student = MarkovLM(teacher.table * 0.8 + torch.randn(T, V + 1, V, generator=g) * 0.8)
    student.table.requires_grad_(True)
    opt = torch.optim.Adam([student.table], lr=cfg.lr)
    eval_g = torch.Generator().manual_seed(cfg.seed + 1)
    before = sequence_reverse_kl(student, teacher, eval_g)
    start = time.perf_counter()
    mask = torch.ones(cfg.batch, T, dtype=torch.bool)
    top_p = 1.0 if objective == "sampled_token" else cfg.top_p  # the paper's settings for each
    for _ in range(cfg.steps):
        y = student.sample(cfg.batch, top_p, g)
        logits = student.logits(y)
        with torch.no_grad():
            teacher_logits = teacher.logits(y)
        if objective in ("support_kl", "support_kl_tail"):
            ids, lp = teacher_topk_support(teacher_logits, cfg.top_k)
            tail = objective == "support_kl_tail"
            per_token = support_kl(logits, ids, lp, mask, renormalize=not tail, tail_bucket=tail)
        elif objective == "sampled_token":
            lp_student = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            lp_teacher = torch.log_softmax(teacher_logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            adv = sampled_token_advantages(lp_teacher, lp_student.detach(), mask, gamma=0.0)
            per_token = policy_gradient_loss(lp_student, lp_student.detach(), adv, mask)
        else:
            raise ValueError(f"objective: expected one of {', '.join(TOY_OBJECTIVES)}, got {objective!r}")
        loss = aggregate(per_token, mask, "token-mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    after = sequence_reverse_kl(student, teacher, eval_g)
    return {"kl_before": before, "kl_after": after, "seconds": seconds}


def main(steps: int | None = None) -> dict[str, dict[str, float]]:
    cfg = ToySettings() if steps is None else ToySettings(steps=steps)
    print(
        f"Toy on-policy distillation: Markov LM, V={cfg.vocab}, T={cfg.length}, batch {cfg.batch}, "
        f"{cfg.steps} Adam steps (lr {cfg.lr}); score = sequence reverse KL(student || teacher), nats"
    )
    labels = {
        "sampled_token": "sampled-token OPD (top-p 1.0)",
        "support_kl": f"teacher top-{cfg.top_k} KL, renormalised",
        "support_kl_tail": f"teacher top-{cfg.top_k} KL + tail bucket",
    }
    print(f"{'objective':<38}{'KL before':>10}{'KL after':>10}{'seconds':>9}")
    results = {}
    for name in TOY_OBJECTIVES:
        r = results[name] = run_toy(name, cfg)
        print(f"{labels[name]:<38}{r['kl_before']:>10.2f}{r['kl_after']:>10.2f}{r['seconds']:>9.1f}", flush=True)
    return results
