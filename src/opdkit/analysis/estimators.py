"""The gradient estimators on the toy problem: specs, per-sample gradients, Monte Carlo and exact moments.

Shapes: ``N`` sampled responses of ``T`` positions over ``V`` tokens; ``P`` prefix rows of the toy
problem's tables (``opdkit.analysis.toy``), so a gradient is a ``[P, V]`` table (``D = P·V``
coordinates); ``S = V^T`` enumerated responses.

Estimators, one sampled trajectory ``y ~ π_θ`` each, all computed with the library objective code
(``opdkit.losses``) and autograd, as a trainer would:

- ``sampled_token`` (objective 1) with discount γ: the gradient of ``Σ_t L_t`` with
  ``L_t = −A^γ_t ρ_t`` from ``sampled_token_advantages`` and ``policy_gradient_loss`` at ``ρ = 1``,
  i.e. ``−Σ_t A^γ_t ∇ log π(y_t|c_t)``. Its sign follows the loss, so it estimates ``+∇J``; γ = 1 is
  unbiased for ``∇J``, γ < 1 drops the coupling to future rewards and is biased.
- ``support_kl`` (objective 3) with the teacher's top-K support, renormalised or not: the gradient of
  ``Σ_t KL_S(π̄(·|c_t) ‖ q̄(·|c_t))`` along the sampled trajectory (``support_kl`` + autograd). It is the
  gradient of a *different* objective; its "bias" is measured against ``∇J`` all the same.

Per-sample gradients come out of one autograd pass: the student's logit rows are gathered per position
into a leaf ``[N, T, V]``; its gradient holds, at ``[i, t]``, the block of sample ``i``'s gradient at
row ``c_{i,t}``. A sample's T positions have prefixes of different lengths, hence distinct rows, so the
squared norm of a sample's gradient is the sum of its T blocks' squared norms: no ``[N, P·V]`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from opdkit.analysis.toy import Enumeration, ToyProblem, bigram_row_visits, exact_kl_gradient, row_reverse_kl
from opdkit.errors import InputError
from opdkit.losses import (
    aggregate,
    policy_gradient_loss,
    sampled_token_advantages,
    support_kl,
    teacher_topk_support,
    topp_correction_weights,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CI_LEVEL",
    "EstimatorSpec",
    "EstimatorStats",
    "default_specs",
    "estimate",
    "bigram_exact_mean",
    "exact_moments",
    "per_sample_gradients",
]

BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95
# Samples per autograd pass at most (memory: about 10 float64 tensors of [chunk, T, V]).
_CHUNK = 1 << 15


# ---------------------------------------------------------------------------------------- the estimators
@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator setting: ``sampled_token`` with ``gamma``, or ``support_kl`` with ``K``, ``renormalize``."""

    estimator: Literal["sampled_token", "support_kl"]
    gamma: float | None = None
    K: int | None = None
    renormalize: bool | None = None
    # sampled_token under top-p rollouts: None (the paper: no correction), "token" or "sequence" importance
    # weights (opdkit.losses.topp_correction_weights)
    correction: str | None = None

    def __post_init__(self) -> None:
        if self.correction not in (None, "token", "sequence"):
            raise InputError(f"correction: expected None, 'token' or 'sequence', got {self.correction!r}")
        if self.estimator == "sampled_token":
            if self.gamma is None or self.K is not None or self.renormalize is not None:
                raise InputError("sampled_token: set gamma only")
        elif self.estimator == "support_kl":
            if self.gamma is not None or self.K is None or self.renormalize is None or self.correction is not None:
                raise InputError("support_kl: set K and renormalize only")
        else:
            raise InputError(f"estimator: expected 'sampled_token' or 'support_kl', got {self.estimator!r}")

    @property
    def name(self) -> str:
        """The ``estimator`` column of the results: ``sampled_token``, ``sampled_token_token_is``,
        ``sampled_token_sequence_is`` or ``support_kl``."""
        return self.estimator if self.correction is None else f"{self.estimator}_{self.correction}_is"

    @property
    def label(self) -> str:
        if self.estimator == "sampled_token":
            extra = "" if self.correction is None else f", {self.correction} IS"
            return f"sampled_token(gamma={self.gamma:g}{extra})"
        return f"support_kl(K={self.K}, {'renorm' if self.renormalize else 'raw'})"


def default_specs(V: int, gammas: Sequence[float], Ks: Sequence[int], *, corrections: bool = False
                  ) -> list[EstimatorSpec]:
    """Sampled-token for each γ (``corrections``: also with token and sequence importance weights), then
    support-KL for each K ≤ V (V always included), renormalised or not."""
    specs = [EstimatorSpec("sampled_token", gamma=float(g)) for g in gammas]
    if corrections:
        specs += [EstimatorSpec("sampled_token", gamma=float(g), correction=c) for c in ("token", "sequence")
                  for g in gammas]
    ks = sorted({int(k) for k in Ks if 1 <= int(k) <= V} | {V})
    for k in ks:
        for renorm in (True, False):
            specs.append(EstimatorSpec("support_kl", K=k, renormalize=renorm))
    return specs


def per_sample_gradients(
    problem: ToyProblem, seqs_N_T: torch.Tensor, spec: EstimatorSpec, *, rows_N_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's gradient of its loss ``Σ_t L_t``, as ``(rows[N, T], grad[N, T, V])``.

    ``grad[i, t]`` is position t's part of sample i's gradient w.r.t. the student's logit row
    ``rows[i, t]``; a row visited at several positions (bigram problems) gets the sum of their parts, and
    rows never visited get zero. Computed by the library objective and autograd. ``rows_N_T``
    (``problem.rows`` of the sequences) may be passed to save recomputing it.
    """
    N, T = seqs_N_T.shape
    rows = problem.rows(seqs_N_T) if rows_N_T is None else rows_N_T
    logits_N_T_V = problem.student_logits_P_V[rows].detach().clone().requires_grad_(True)
    teacher_N_T_V = problem.teacher_logits_P_V[rows]
    mask = torch.ones(N, T, dtype=torch.bool)
    if spec.estimator == "sampled_token":
        lp = torch.log_softmax(logits_N_T_V, dim=-1).gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1)
        lq = torch.log_softmax(teacher_N_T_V, dim=-1).gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1)
        adv = sampled_token_advantages(lq, lp.detach(), mask, gamma=spec.gamma)
        per_token = policy_gradient_loss(lp, lp.detach(), adv, mask)
        if spec.correction is not None:
            sampling_lp = problem.rollout_probs()[rows].gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1).log()
            per_token = per_token * topp_correction_weights(lp.detach(), sampling_lp, mask, mode=spec.correction)
    else:
        support_ids, teacher_lp = teacher_topk_support(teacher_N_T_V, spec.K)
        per_token = support_kl(logits_N_T_V, support_ids, teacher_lp, mask, renormalize=spec.renormalize)
    # One trajectory's estimate is the token *sum*; denominator=1 makes the total the sum over samples,
    # so the gradient w.r.t. each sample's own leaf rows is that sample's gradient, unscaled.
    total = aggregate(per_token, mask, "seq-mean-token-sum", denominator=1.0)
    (grad,) = torch.autograd.grad(total, logits_N_T_V)
    return rows, grad


# ------------------------------------------------------------------------------------------- the moments
@dataclass(frozen=True)
class EstimatorStats:
    """Monte Carlo figures of one estimator setting (``D = P·V`` gradient coordinates)."""

    mean_P_V: torch.Tensor  # mean of the N one-sample estimates
    stderr_P_V: torch.Tensor  # per-coordinate standard error of that mean
    group_variances: torch.Tensor  # [n_estimates] unbiased per-group traces of the covariance
    variance: float  # mean of group_variances: trace of the per-sample covariance
    variance_ci: tuple[float, float]  # 95% percentile bootstrap over groups
    n_samples: int


def _samples_per_chunk(problem: ToyProblem, multiple: int) -> int:
    """Samples per autograd pass (at most ``_CHUNK``, about ``64 · _CHUNK`` logits), a multiple of ``multiple``."""
    per = min(_CHUNK, max(1, (_CHUNK * 64) // (problem.T * problem.V)))
    return max(multiple, per - per % multiple)


def _dense_per_sample(problem: ToyProblem, rows_n_T: torch.Tensor, grad_n_T_V: torch.Tensor) -> torch.Tensor:
    """``[n, P·V]`` per-sample gradients, summing the parts of rows visited more than once (bigram)."""
    n, T, V = grad_n_T_V.shape
    P = problem.student_logits_P_V.shape[0]
    dense = torch.zeros(n * P, V, dtype=grad_n_T_V.dtype)
    index = (torch.arange(n).unsqueeze(1) * P + rows_n_T).reshape(-1)
    dense.index_add_(0, index, grad_n_T_V.reshape(-1, V))
    return dense.reshape(n, P * V)


_VARIANCE_RESOLUTION = 1e-12  # a group variance below this share of its mean squared norm is rounding: 0


def estimate(
    problem: ToyProblem,
    spec: EstimatorSpec,
    seqs_N_T: torch.Tensor,
    samples_per_estimate: int,
    *,
    bootstrap_seed: int = 0,
    rows_N_T: torch.Tensor | None = None,
) -> EstimatorStats:
    """Monte Carlo mean, per-coordinate standard error and per-sample variance of one estimator.

    ``seqs_N_T`` (from ``sample_sequences``) is split into consecutive groups of ``samples_per_estimate``;
    ``rows_N_T`` is its ``problem.rows`` (computed if not given).
    """
    N = seqs_N_T.shape[0]
    M = int(samples_per_estimate)
    if M < 2 or N % M or N // M < 2:
        raise InputError(f"need at least 2 groups of >= 2 samples: N={N}, samples_per_estimate={M}")
    n_groups = N // M
    P, V = problem.student_logits_P_V.shape
    sum_P_V = torch.zeros(P, V, dtype=torch.float64)
    sumsq_P_V = torch.zeros(P, V, dtype=torch.float64)
    group_var = torch.empty(n_groups, dtype=torch.float64)
    all_rows = problem.rows(seqs_N_T) if rows_N_T is None else rows_N_T
    groups_per_chunk = _samples_per_chunk(problem, M) // M
    for g0 in range(0, n_groups, groups_per_chunk):
        g1 = min(n_groups, g0 + groups_per_chunk)
        chunk = slice(g0 * M, g1 * M)
        rows, grad = per_sample_gradients(problem, seqs_N_T[chunk], spec, rows_N_T=all_rows[chunk])
        if problem.shared_rows:
            dense_n_D = _dense_per_sample(problem, rows, grad)
            sum_P_V += dense_n_D.sum(0).reshape(P, V)
            sumsq_P_V += dense_n_D.square().sum(0).reshape(P, V)
            sq_norms_G_M = dense_n_D.square().sum(-1).reshape(g1 - g0, M)
            gsum_sq = dense_n_D.reshape(g1 - g0, M, P * V).sum(1).square().sum(-1)
        else:
            flat_rows, flat_grad = rows.reshape(-1), grad.reshape(-1, V)
            sum_P_V.index_add_(0, flat_rows, flat_grad)
            # Within one sample the T rows are distinct, so squares of blocks are squares of coordinates.
            sumsq_P_V.index_add_(0, flat_rows, flat_grad.square())
            sq_norms_G_M = grad.square().sum((1, 2)).reshape(g1 - g0, M)
            group_of = torch.arange(g1 - g0).repeat_interleave(M * problem.T)
            gsum = torch.zeros((g1 - g0) * P, V, dtype=torch.float64)
            gsum.index_add_(0, group_of * P + flat_rows, flat_grad)
            gsum_sq = gsum.reshape(g1 - g0, P * V).square().sum(-1)
        # a sum of squared deviations computed as a difference: it cancels to rounding noise (±1e-16 of the
        # mean squared norm) when the rollouts are deterministic; below what float64 resolves it is 0
        gv = (sq_norms_G_M.sum(-1) - gsum_sq / M) / (M - 1)
        resolved = gv > _VARIANCE_RESOLUTION * sq_norms_G_M.mean(-1)
        group_var[g0:g1] = torch.where(resolved, gv, torch.zeros_like(gv))
    mean = sum_P_V / N
    coord_var = ((sumsq_P_V - N * mean.square()) / (N - 1)).clamp(min=0.0)
    variance = float(group_var.mean())
    return EstimatorStats(
        mean_P_V=mean,
        stderr_P_V=(coord_var / N).sqrt(),
        group_variances=group_var,
        variance=variance,
        variance_ci=_bootstrap_ci(group_var, bootstrap_seed),
        n_samples=N,
    )


def _bootstrap_ci(values: torch.Tensor, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval (``CI_LEVEL``) of the mean of iid ``values``."""
    g = torch.Generator().manual_seed(int(seed))
    n = values.shape[0]
    idx = torch.randint(n, (BOOTSTRAP_RESAMPLES, n), generator=g)
    means = values[idx].mean(-1)
    alpha = (1.0 - CI_LEVEL) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=means.dtype))
    return float(lo), float(hi)


def exact_moments(
    problem: ToyProblem, spec: EstimatorSpec, *, enumeration: Enumeration | None = None
) -> tuple[torch.Tensor, float]:
    """``(E g [P, V], E‖g − E g‖²)`` of the one-trajectory estimator, exactly, by enumeration.

    ``enumeration`` (``Enumeration.of(problem)``) may be passed to save recomputing it.
    """
    en = Enumeration.of(problem) if enumeration is None else enumeration
    P, V = problem.student_logits_P_V.shape
    mean = torch.zeros(P, V, dtype=torch.float64)
    second = torch.zeros((), dtype=torch.float64)
    step = _samples_per_chunk(problem, 1)
    for s0 in range(0, en.seqs_S_T.shape[0], step):
        part = slice(s0, s0 + step)
        rows, grad = per_sample_gradients(problem, en.seqs_S_T[part], spec, rows_N_T=en.rows_S_T[part])
        w = en.prob_S[part]
        if problem.shared_rows:
            dense_n_D = _dense_per_sample(problem, rows, grad)
            mean += (w[:, None] * dense_n_D).sum(0).reshape(P, V)
            second += (w * dense_n_D.square().sum(-1)).sum()
        else:
            mean.index_add_(0, rows.reshape(-1), (w[:, None, None] * grad).reshape(-1, V))
            second += (w * grad.square().sum((1, 2))).sum()
    return mean, float(second - mean.square().sum())


def bigram_exact_mean(problem: ToyProblem, spec: EstimatorSpec) -> torch.Tensor | None:
    """``E g`` exactly at any T on a bigram problem, where the chain's marginals give it; else ``None``.

    γ = 1 is unbiased: its mean is ``∇J``. γ = 0 and the support-set KL only use the context's own
    position, so their mean is ``Σ_r visits(r) ∇_{θ_r} L(r)`` with ``L(r)`` the per-context loss
    (the reverse KL of row r, or the support-set KL from the library's ``support_kl``) and ``visits``
    the expected number of positions with context r (``bigram_row_visits``). Other γ couple positions
    and are left to Monte Carlo.
    """
    if problem.structure != "bigram" or problem.top_p < 1.0 or spec.correction is not None:
        return None  # the marginals below are the untruncated student's
    if spec.estimator == "sampled_token" and spec.gamma == 1.0:
        return exact_kl_gradient(problem)
    if spec.estimator == "sampled_token" and spec.gamma != 0.0:
        return None
    visits_P = bigram_row_visits(problem).detach()
    theta_P_V = problem.student_logits_P_V.detach().clone().requires_grad_(True)
    if spec.estimator == "sampled_token":
        per_row_P = row_reverse_kl(theta_P_V, problem.teacher_logits_P_V)
    else:
        support_ids, teacher_lp = teacher_topk_support(problem.teacher_logits_P_V.unsqueeze(0), spec.K)
        mask = torch.ones(1, theta_P_V.shape[0], dtype=torch.bool)
        per_row_P = support_kl(theta_P_V.unsqueeze(0), support_ids, teacher_lp, mask, renormalize=spec.renormalize)[0]
    (grad,) = torch.autograd.grad((visits_P * per_row_P).sum(), theta_P_V)
    return grad
