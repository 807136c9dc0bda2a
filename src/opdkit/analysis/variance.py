"""Bias and variance of OPD gradient estimators on a toy problem whose exact gradient is known.

The problem (METHOD.md, "The bias–variance analysis"): an autoregressive *tabular* student over ``V``
tokens and horizon ``T`` with one logit row per prefix (``P = Σ_{t<T} V^t`` rows), and a fixed tabular
teacher of the same shape. The objective is the sequence-level reverse KL
``J(θ) = KL(π_θ ‖ q) = Σ_y π_θ(y) [log π_θ(y) − log q(y)]`` over all ``V^T`` responses; its exact
gradient ``∇J`` is computed by enumerating every sequence (autograd through the enumeration).

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

Statistics (per estimator setting, ``n_estimates`` independent groups of ``samples_per_estimate``
trajectories; the same trajectories serve every setting of one T, i.e. common random numbers):

- ``bias_rel = ‖ḡ − ∇J‖ / ‖∇J‖`` with ``ḡ`` the mean over all ``N`` samples (Monte Carlo; its noise
  floor is about ``sqrt(variance / N) / ‖∇J‖``, reported in the Markdown table).
- ``variance``: the trace of the covariance of the one-trajectory estimator, ``E‖g − E g‖²``, as the
  mean over groups of each group's unbiased estimate ``(Σ_i ‖g_i‖² − M ‖ḡ_j‖²) / (M − 1)``.
- ``variance_ci_low/high``: a 95% percentile bootstrap interval of that mean, resampling the groups
  (2000 resamples, seeded). The groups are iid, so no normality of the gradients is assumed.
- The exact mean and variance of every estimator are also computed by enumeration (``exact_moments``)
  and shown in the Markdown table next to the Monte Carlo figures, as a check.

Problem presets (``PROBLEM_PRESETS``, ``--problem``): ``default`` is ``make_problem``'s defaults (student
``N(0, 1)``, teacher ``3 · (0.5 z + 0.87 z')``) at V = 4, T = 2 4 6 8. ``imbalanced`` is a student that is
far from a sharper teacher: student ``2 z``, teacher ``4 · (−0.5 z + 0.87 z')`` (the teacher leans away
from the student's preferred token), at V = 2, T = 4 8 12 16 (longer horizons, still enumerable). Its
sampled-token rewards are mostly negative (about 70% of tokens) with a per-token KL of several nats, and
variance(γ = 1) / variance(γ = 0) reaches about 100–150 at T = 16 (docs/bias_variance.md).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from opdkit.errors import InputError
from opdkit.losses import (
    aggregate,
    policy_gradient_loss,
    sampled_token_advantages,
    support_kl,
    teacher_topk_support,
)

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_PROBLEM",
    "DEFAULT_GAMMAS",
    "DEFAULT_KS",
    "DEFAULT_TS",
    "EstimatorSpec",
    "EstimatorStats",
    "PROBLEM_PRESETS",
    "ProblemPreset",
    "ToyProblem",
    "add_variance_arguments",
    "default_specs",
    "enumerate_sequences",
    "estimate",
    "exact_kl_gradient",
    "exact_moments",
    "main_variance",
    "make_problem",
    "per_sample_gradients",
    "prefix_rows",
    "run_variance_experiment",
    "sample_sequences",
    "sequence_reverse_kl",
    "variance_from_args",
]

CSV_COLUMNS = (
    "estimator",
    "T",
    "gamma",
    "K",
    "renormalize",
    "bias_rel",
    "variance",
    "variance_ci_low",
    "variance_ci_high",
)
DEFAULT_TS: tuple[int, ...] = (2, 4, 6, 8)
DEFAULT_GAMMAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)  # V is always added; K > V is skipped
DEFAULT_VOCAB = 4
DEFAULT_N_ESTIMATES = 100
DEFAULT_SAMPLES_PER_ESTIMATE = 500
DEFAULT_SEED = 0
BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95
DEFAULT_PROBLEM = "default"
# Sequences enumerated at most (exact gradient and exact moments): V^T rows of [T, V] float64.
MAX_ENUMERATED = 1 << 20
# Samples per autograd pass (memory: about 10 float64 tensors of [chunk, T, V]).
_CHUNK = 1 << 15


# ------------------------------------------------------------------------------------------ the problem
@dataclass(frozen=True)
class ToyProblem:
    """A tabular student and teacher over ``V`` tokens and horizon ``T``.

    Row ``offset_t + code(y_<t)`` of a ``[P, V]`` table holds the logits at prefix ``y_<t``, where
    ``offset_t = Σ_{k<t} V^k`` and ``code`` reads the prefix as a base-V number.
    """

    V: int
    T: int
    student_logits_P_V: torch.Tensor  # float64
    teacher_logits_P_V: torch.Tensor  # float64

    def __post_init__(self) -> None:
        P = num_prefixes(self.V, self.T)
        for name in ("student_logits_P_V", "teacher_logits_P_V"):
            x = getattr(self, name)
            if tuple(x.shape) != (P, self.V):
                raise InputError(
                    f"{name}: expected shape [{P}, {self.V}] for V={self.V}, T={self.T}, got {list(x.shape)}"
                )


def num_prefixes(V: int, T: int) -> int:
    return sum(V**t for t in range(T))


def make_problem(
    V: int,
    T: int,
    seed: int,
    *,
    student_scale: float = 1.0,
    teacher_scale: float = 3.0,
    correlation: float = 0.5,
) -> ToyProblem:
    """Random student ``s · z`` and a sharper, partly aligned teacher ``t · (ρ z + sqrt(1 − ρ²) z')``.

    ``z, z'`` are iid standard normal ``[P, V]`` tables. With ``teacher_scale > student_scale`` the teacher
    is peaked where the student is flat, so the sampled-token rewards ``log q − log π`` are large and
    mostly negative (the paper's imbalance), and they depend on the prefix (future rewards matter).
    """
    if V < 2 or T < 1:
        raise InputError(f"expected V >= 2 and T >= 1, got V={V}, T={T}")
    if not -1.0 <= correlation <= 1.0:
        raise InputError(f"correlation: expected a number in [-1, 1], got {correlation!r}")
    g = torch.Generator().manual_seed(int(seed))
    P = num_prefixes(V, T)
    z = torch.randn(P, V, generator=g, dtype=torch.float64)
    z2 = torch.randn(P, V, generator=g, dtype=torch.float64)
    teacher = teacher_scale * (correlation * z + math.sqrt(1.0 - correlation**2) * z2)
    return ToyProblem(V, T, student_scale * z, teacher)


@dataclass(frozen=True)
class ProblemPreset:
    """A named toy problem: ``make_problem``'s scales and correlation, and its default V and horizons."""

    name: str
    student_scale: float
    teacher_scale: float
    correlation: float
    vocab: int
    Ts: tuple[int, ...]
    description: str

    def make(self, V: int, T: int, seed: int) -> ToyProblem:
        return make_problem(
            V,
            T,
            seed,
            student_scale=self.student_scale,
            teacher_scale=self.teacher_scale,
            correlation=self.correlation,
        )


PROBLEM_PRESETS: dict[str, ProblemPreset] = {
    "default": ProblemPreset(
        "default",
        1.0,
        3.0,
        0.5,
        DEFAULT_VOCAB,
        DEFAULT_TS,
        "student N(0, 1); teacher 3 · (0.5 z + 0.87 z'), sharper and partly aligned",
    ),
    # A student far from a sharper teacher that leans away from the student's preferred tokens: mostly
    # negative rewards with a large mean; measured variance(γ=1)/variance(γ=0) of about 100–150 at T = 16.
    "imbalanced": ProblemPreset(
        "imbalanced",
        2.0,
        4.0,
        -0.5,
        2,
        (4, 8, 12, 16),
        "student 2 z; teacher 4 · (−0.5 z + 0.87 z'), sharper and leaning away from the student",
    ),
}


def get_preset(name: str) -> ProblemPreset:
    try:
        return PROBLEM_PRESETS[name]
    except KeyError:
        raise InputError(f"problem: expected one of {sorted(PROBLEM_PRESETS)}, got {name!r}") from None


def prefix_rows(V: int, seqs_N_T: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` table row of each position's prefix ``c_t = y_<t``."""
    N, T = seqs_N_T.shape
    rows = torch.empty(N, T, dtype=torch.long)
    code = torch.zeros(N, dtype=torch.long)
    offset = 0
    for t in range(T):
        rows[:, t] = offset + code
        code = code * V + seqs_N_T[:, t]
        offset += V**t
    return rows


def sample_sequences(problem: ToyProblem, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, T]`` responses sampled from the student (τ = 1, no truncation), by inverse CDF."""
    seqs = torch.empty(n, problem.T, dtype=torch.long)
    code = torch.zeros(n, dtype=torch.long)
    offset = 0
    for t in range(problem.T):
        probs_N_V = torch.softmax(problem.student_logits_P_V[offset + code], dim=-1)
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        y = (probs_N_V.cumsum(-1) < u).sum(-1).clamp(max=problem.V - 1)
        seqs[:, t] = y
        code = code * problem.V + y
        offset += problem.V**t
    return seqs


def enumerate_sequences(V: int, T: int) -> torch.Tensor:
    """All ``V^T`` responses, ``[V^T, T]`` in lexicographic order."""
    if V**T > MAX_ENUMERATED:
        raise InputError(f"V^T = {V}^{T} = {V**T} sequences exceed the enumeration cap {MAX_ENUMERATED}")
    return torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long).reshape(V**T, T)


def _token_logprobs(logits_P_V: torch.Tensor, rows_N_T: torch.Tensor, seqs_N_T: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_P_V, dim=-1)[rows_N_T].gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1)


def sequence_reverse_kl(problem: ToyProblem, student_logits_P_V: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(π ‖ q)`` over whole sequences, by enumerating all ``V^T`` of them (differentiable)."""
    theta = problem.student_logits_P_V if student_logits_P_V is None else student_logits_P_V
    seqs = enumerate_sequences(problem.V, problem.T)
    rows = prefix_rows(problem.V, seqs)
    lp_seq = _token_logprobs(theta, rows, seqs).sum(-1)
    lq_seq = _token_logprobs(problem.teacher_logits_P_V, rows, seqs).sum(-1)
    return (lp_seq.exp() * (lp_seq - lq_seq)).sum()


def exact_kl_gradient(problem: ToyProblem) -> torch.Tensor:
    """``∇_θ KL(π_θ ‖ q)`` as a ``[P, V]`` table, exact (autograd through the enumeration)."""
    theta = problem.student_logits_P_V.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sequence_reverse_kl(problem, theta), theta)
    return grad


# ---------------------------------------------------------------------------------------- the estimators
@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator setting: ``sampled_token`` with ``gamma``, or ``support_kl`` with ``K``, ``renormalize``."""

    estimator: Literal["sampled_token", "support_kl"]
    gamma: float | None = None
    K: int | None = None
    renormalize: bool | None = None

    def __post_init__(self) -> None:
        if self.estimator == "sampled_token":
            if self.gamma is None or self.K is not None or self.renormalize is not None:
                raise InputError("sampled_token: set gamma only")
        elif self.estimator == "support_kl":
            if self.gamma is not None or self.K is None or self.renormalize is None:
                raise InputError("support_kl: set K and renormalize only")
        else:
            raise InputError(f"estimator: expected 'sampled_token' or 'support_kl', got {self.estimator!r}")

    @property
    def label(self) -> str:
        if self.estimator == "sampled_token":
            return f"sampled_token(gamma={self.gamma:g})"
        return f"support_kl(K={self.K}, {'renorm' if self.renormalize else 'raw'})"


def default_specs(V: int, gammas: Sequence[float], Ks: Sequence[int]) -> list[EstimatorSpec]:
    """Sampled-token for each γ, then support-KL for each K ≤ V (V always included), renormalised or not."""
    specs = [EstimatorSpec("sampled_token", gamma=float(g)) for g in gammas]
    ks = sorted({int(k) for k in Ks if 1 <= int(k) <= V} | {V})
    for k in ks:
        for renorm in (True, False):
            specs.append(EstimatorSpec("support_kl", K=k, renormalize=renorm))
    return specs


def per_sample_gradients(
    problem: ToyProblem, seqs_N_T: torch.Tensor, spec: EstimatorSpec, *, rows_N_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's gradient of its loss ``Σ_t L_t``, as ``(rows[N, T], grad[N, T, V])``.

    ``grad[i, t]`` is sample i's gradient w.r.t. the student's logit row ``rows[i, t]`` (every other
    row of sample i has zero gradient). Computed by the library objective and autograd. ``rows_N_T``
    (``prefix_rows`` of the sequences) may be passed to save recomputing it.
    """
    N, T = seqs_N_T.shape
    rows = prefix_rows(problem.V, seqs_N_T) if rows_N_T is None else rows_N_T
    logits_N_T_V = problem.student_logits_P_V[rows].detach().clone().requires_grad_(True)
    teacher_N_T_V = problem.teacher_logits_P_V[rows]
    mask = torch.ones(N, T, dtype=torch.bool)
    if spec.estimator == "sampled_token":
        lp = torch.log_softmax(logits_N_T_V, dim=-1).gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1)
        lq = torch.log_softmax(teacher_N_T_V, dim=-1).gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1)
        adv = sampled_token_advantages(lq, lp.detach(), mask, gamma=spec.gamma)
        per_token = policy_gradient_loss(lp, lp.detach(), adv, mask)
    else:
        support_ids, teacher_lp = teacher_topk_support(teacher_N_T_V, spec.K)
        per_token = support_kl(logits_N_T_V, support_ids, teacher_lp, mask, renormalize=spec.renormalize)
    # One trajectory's estimate is the token *sum*; denominator=1 makes the total the sum over samples,
    # so the gradient w.r.t. each sample's own leaf rows is that sample's gradient, unscaled.
    total = aggregate(per_token, mask, "seq-mean-token-sum", denominator=1.0)
    (grad,) = torch.autograd.grad(total, logits_N_T_V)
    return rows, grad


@dataclass(frozen=True)
class EstimatorStats:
    """Monte Carlo figures of one estimator setting (``D = P·V`` gradient coordinates)."""

    mean_P_V: torch.Tensor  # mean of the N one-sample estimates
    stderr_P_V: torch.Tensor  # per-coordinate standard error of that mean
    group_variances: torch.Tensor  # [n_estimates] unbiased per-group traces of the covariance
    variance: float  # mean of group_variances: trace of the per-sample covariance
    variance_ci: tuple[float, float]  # 95% percentile bootstrap over groups
    n_samples: int


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
    ``rows_N_T`` is its ``prefix_rows`` (computed if not given).
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
    all_rows = prefix_rows(problem.V, seqs_N_T) if rows_N_T is None else rows_N_T
    groups_per_chunk = max(1, _CHUNK // M)
    for g0 in range(0, n_groups, groups_per_chunk):
        g1 = min(n_groups, g0 + groups_per_chunk)
        chunk = slice(g0 * M, g1 * M)
        rows, grad = per_sample_gradients(problem, seqs_N_T[chunk], spec, rows_N_T=all_rows[chunk])
        flat_rows, flat_grad = rows.reshape(-1), grad.reshape(-1, V)
        sum_P_V.index_add_(0, flat_rows, flat_grad)
        # Within one sample the T rows are distinct, so squares of blocks are squares of coordinates.
        sumsq_P_V.index_add_(0, flat_rows, flat_grad.square())
        sq_norms_G_M = grad.square().sum((1, 2)).reshape(g1 - g0, M)
        group_of = torch.arange(g1 - g0).repeat_interleave(M * problem.T)
        gsum = torch.zeros((g1 - g0) * P, V, dtype=torch.float64)
        gsum.index_add_(0, group_of * P + flat_rows, flat_grad)
        gsum_sq = gsum.reshape(g1 - g0, P * V).square().sum(-1)
        group_var[g0:g1] = (sq_norms_G_M.sum(-1) - gsum_sq / M) / (M - 1)
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


def exact_moments(problem: ToyProblem, spec: EstimatorSpec) -> tuple[torch.Tensor, float]:
    """``(E g [P, V], E‖g − E g‖²)`` of the one-trajectory estimator, exactly, by enumeration."""
    return _exact_moments(problem, spec, _Enumeration.of(problem))


@dataclass(frozen=True)
class _Enumeration:
    """Every sequence, its prefix rows and its probability under the student."""

    seqs_S_T: torch.Tensor
    rows_S_T: torch.Tensor
    prob_S: torch.Tensor

    @staticmethod
    def of(problem: ToyProblem) -> _Enumeration:
        seqs = enumerate_sequences(problem.V, problem.T)
        rows = prefix_rows(problem.V, seqs)
        prob = _token_logprobs(problem.student_logits_P_V.detach(), rows, seqs).sum(-1).exp()
        return _Enumeration(seqs, rows, prob)


def _exact_moments(problem: ToyProblem, spec: EstimatorSpec, en: _Enumeration) -> tuple[torch.Tensor, float]:
    P, V = problem.student_logits_P_V.shape
    mean = torch.zeros(P, V, dtype=torch.float64)
    second = torch.zeros((), dtype=torch.float64)
    for s0 in range(0, en.seqs_S_T.shape[0], _CHUNK):
        part = slice(s0, s0 + _CHUNK)
        rows, grad = per_sample_gradients(problem, en.seqs_S_T[part], spec, rows_N_T=en.rows_S_T[part])
        w = en.prob_S[part]
        mean.index_add_(0, rows.reshape(-1), (w[:, None, None] * grad).reshape(-1, V))
        second += (w * grad.square().sum((1, 2))).sum()
    return mean, float(second - mean.square().sum())


# ------------------------------------------------------------------------------------------ the experiment
def _seed_for(seed: int, T: int, what: int) -> int:
    return int(seed) * 1_000_003 + 1009 * int(T) + what


def run_variance_experiment(
    out_dir: str | Path | None,
    *,
    Ts: Sequence[int] | None = None,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    Ks: Sequence[int] = DEFAULT_KS,
    vocab: int | None = None,
    n_estimates: int = DEFAULT_N_ESTIMATES,
    samples_per_estimate: int = DEFAULT_SAMPLES_PER_ESTIMATE,
    seed: int = DEFAULT_SEED,
    plot: bool = True,
    verbose: bool = False,
    problem: str = DEFAULT_PROBLEM,
) -> list[dict]:
    """Run the experiment; write ``variance.csv``, ``variance.md`` and ``variance.png`` under ``out_dir``.

    ``problem`` names a ``PROBLEM_PRESETS`` entry; ``Ts`` and ``vocab`` left ``None`` take its defaults
    (``default``: V = 4, T = 2 4 6 8). For each T: one toy problem (seeded by ``seed`` and T),
    ``n_estimates × samples_per_estimate`` trajectories from the student, and every estimator setting
    evaluated on them.

    Returns one dict per setting with the CSV columns (``gamma`` None for support_kl, ``K`` and
    ``renormalize`` None for sampled_token) plus ``bias_rel_exact``, ``variance_exact``,
    ``bias_noise_floor`` (``sqrt(variance / N) / ‖∇J‖``), ``n_samples``, ``grad_norm_exact``.
    ``out_dir=None`` writes nothing.
    """
    preset = get_preset(problem)
    Ts = [int(t) for t in (preset.Ts if Ts is None else Ts)]
    vocab = preset.vocab if vocab is None else int(vocab)
    gammas = [float(g) for g in gammas]
    if not Ts or any(t < 1 for t in Ts):
        raise InputError(f"Ts: expected horizons >= 1, got {Ts}")
    if any(not 0.0 <= g <= 1.0 for g in gammas):
        raise InputError(f"gammas: expected values in [0, 1], got {gammas}")
    if vocab < 2:
        raise InputError(f"vocab: expected >= 2, got {vocab}")
    for T in Ts:
        if vocab**T > MAX_ENUMERATED:
            raise InputError(f"V^T = {vocab}^{T} exceeds the enumeration cap {MAX_ENUMERATED}; lower T or vocab")
    if n_estimates < 2 or samples_per_estimate < 2:
        raise InputError("n_estimates and samples_per_estimate: expected >= 2")
    specs = default_specs(vocab, gammas, Ks)
    results: list[dict] = []
    for T in Ts:
        t0 = time.perf_counter()
        toy = preset.make(vocab, T, _seed_for(seed, T, 1))
        exact = exact_kl_gradient(toy)
        exact_norm = float(exact.norm())
        gen = torch.Generator().manual_seed(_seed_for(seed, T, 2))
        seqs = sample_sequences(toy, n_estimates * samples_per_estimate, gen)
        rows = prefix_rows(vocab, seqs)
        enumeration = _Enumeration.of(toy)
        for i, spec in enumerate(specs):
            stats = estimate(
                toy, spec, seqs, samples_per_estimate, bootstrap_seed=_seed_for(seed, T, 100 + i), rows_N_T=rows
            )
            ex_mean, ex_var = _exact_moments(toy, spec, enumeration)
            results.append(
                {
                    "estimator": spec.estimator,
                    "T": T,
                    "gamma": spec.gamma,
                    "K": spec.K,
                    "renormalize": spec.renormalize,
                    "bias_rel": float((stats.mean_P_V - exact).norm()) / exact_norm,
                    "variance": stats.variance,
                    "variance_ci_low": stats.variance_ci[0],
                    "variance_ci_high": stats.variance_ci[1],
                    "bias_rel_exact": float((ex_mean - exact).norm()) / exact_norm,
                    "variance_exact": ex_var,
                    "bias_noise_floor": math.sqrt(max(stats.variance, 0.0) / stats.n_samples) / exact_norm,
                    "n_samples": stats.n_samples,
                    "grad_norm_exact": exact_norm,
                }
            )
        if verbose:
            print(f"T={T}: {len(specs)} settings, {seqs.shape[0]} samples, {time.perf_counter() - t0:.1f}s", flush=True)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(results, out / "variance.csv")
        settings = dict(
            vocab=vocab,
            Ts=Ts,
            n_estimates=n_estimates,
            samples_per_estimate=samples_per_estimate,
            seed=seed,
            problem=preset.name,
        )
        (out / "variance.md").write_text(format_markdown(results, settings), encoding="utf-8")
        if plot:
            from opdkit.analysis.plots import plot_variance

            plot_variance(results, out / "variance.png")
    return results


def _csv_value(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_csv(results: Sequence[dict], path: str | Path) -> None:
    """``variance.csv``: exactly ``CSV_COLUMNS``; empty cells for settings that do not apply."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in results:
            w.writerow([_csv_value(r[c]) for c in CSV_COLUMNS])


def variance_ratios(results: Sequence[dict]) -> dict[int, dict[str, float]]:
    """Per T: ``variance(γ=1) / variance(γ=0)``, Monte Carlo (``mc``) and exact (``exact``)."""
    out: dict[int, dict[str, float]] = {}
    st = [r for r in results if r["estimator"] == "sampled_token"]
    for T in sorted({r["T"] for r in st}):
        by_g = {r["gamma"]: r for r in st if r["T"] == T}
        if 0.0 in by_g and 1.0 in by_g:
            out[T] = {
                "mc": by_g[1.0]["variance"] / by_g[0.0]["variance"],
                "exact": by_g[1.0]["variance_exact"] / by_g[0.0]["variance_exact"],
            }
    return out


def _g(x: float) -> str:
    return f"{x:.3g}"


def format_markdown(results: Sequence[dict], settings: dict) -> str:
    """``variance.md``: the settings, the γ sweep, the support-KL sweep and the γ=1/γ=0 variance ratios."""
    n = settings["n_estimates"] * settings["samples_per_estimate"]
    lines = [
        "# Gradient bias and variance on the tabular toy problem",
        "",
        f"V = {settings['vocab']}, T in {settings['Ts']}, {settings['n_estimates']} groups × "
        f"{settings['samples_per_estimate']} trajectories = {n} samples per T (the same trajectories for "
        f"every setting of one T), seed {settings['seed']}.",
        "",
        f"Problem `{settings.get('problem', DEFAULT_PROBLEM)}`: "
        f"{get_preset(settings.get('problem', DEFAULT_PROBLEM)).description}.",
        "",
        "- `bias_rel` = ‖mean − ∇J‖ / ‖∇J‖ from the samples; `floor` = sqrt(variance / N) / ‖∇J‖, the "
        "size of the Monte Carlo noise in `bias_rel` (a bias well below it is not resolved); `exact` "
        "columns are the estimator's true mean and variance, by enumeration of all V^T sequences.",
        "- `variance` = trace of the covariance of the one-trajectory gradient estimate, with a "
        f"{int(CI_LEVEL * 100)}% percentile bootstrap interval over the groups ({BOOTSTRAP_RESAMPLES} resamples).",
        "- `support_kl` optimises a different objective (the per-position KL on the teacher's top-K); its "
        "bias is measured against the same sequence reverse-KL gradient ∇J.",
        "",
        "## Sampled-token estimator, by discount γ",
        "",
        "| T | γ | bias_rel | floor | bias_rel (exact) | variance | 95% CI | variance (exact) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["estimator"] == "sampled_token":
            lines.append(
                f"| {r['T']} | {r['gamma']:g} | {_g(r['bias_rel'])} | {_g(r['bias_noise_floor'])} | "
                f"{_g(r['bias_rel_exact'])} | {_g(r['variance'])} | [{_g(r['variance_ci_low'])}, "
                f"{_g(r['variance_ci_high'])}] | {_g(r['variance_exact'])} |"
            )
    lines += [
        "",
        "## Support-set KL (teacher top-K), by K",
        "",
        "| T | K | renormalised | bias_rel | floor | bias_rel (exact) | variance | 95% CI | variance (exact) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["estimator"] == "support_kl":
            lines.append(
                f"| {r['T']} | {r['K']} | {'yes' if r['renormalize'] else 'no'} | {_g(r['bias_rel'])} | "
                f"{_g(r['bias_noise_floor'])} | {_g(r['bias_rel_exact'])} | {_g(r['variance'])} | "
                f"[{_g(r['variance_ci_low'])}, {_g(r['variance_ci_high'])}] | {_g(r['variance_exact'])} |"
            )
    ratios = variance_ratios(results)
    if ratios:
        lines += [
            "",
            "## Variance ratio γ = 1 over γ = 0",
            "",
            "| T | Monte Carlo | exact |",
            "|---|---|---|",
        ]
        lines += [f"| {T} | {_g(v['mc'])} | {_g(v['exact'])} |" for T, v in ratios.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- CLI
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.replace(",", " ").split()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(",", " ").split()]


def add_variance_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``opdkit analyze variance``."""
    p.add_argument("--out", required=True, help="output directory (variance.csv, variance.md, variance.png)")
    p.add_argument(
        "--problem",
        choices=sorted(PROBLEM_PRESETS),
        default=DEFAULT_PROBLEM,
        help="toy problem preset (default: 'default'; 'imbalanced': a far student, sharper teacher, V=2, T up to 16)",
    )
    p.add_argument("--T", dest="Ts", type=_ints, default=None, help="horizons, e.g. '2,4,6' (default: the preset's)")
    p.add_argument("--gammas", type=_floats, default=list(DEFAULT_GAMMAS), help="discounts, comma-separated")
    p.add_argument("--K", dest="Ks", type=_ints, default=list(DEFAULT_KS), help="support sizes (V always added)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size V (default: the preset's)")
    p.add_argument("--n-estimates", type=int, default=DEFAULT_N_ESTIMATES, help="independent groups")
    p.add_argument("--samples-per-estimate", type=int, default=DEFAULT_SAMPLES_PER_ESTIMATE, help="trajectories/group")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--no-plot", action="store_true", help="skip variance.png")


def variance_from_args(args: argparse.Namespace) -> int:
    results = run_variance_experiment(
        args.out,
        Ts=args.Ts,
        gammas=args.gammas,
        Ks=args.Ks,
        vocab=args.vocab,
        n_estimates=args.n_estimates,
        samples_per_estimate=args.samples_per_estimate,
        seed=args.seed,
        plot=not args.no_plot,
        verbose=True,
        problem=args.problem,
    )
    for T, v in variance_ratios(results).items():
        print(f"T={T}: variance(gamma=1)/variance(gamma=0) = {v['mc']:.3g} (exact {v['exact']:.3g})")
    print(f"wrote {Path(args.out) / 'variance.csv'}, variance.md" + ("" if args.no_plot else ", variance.png"))
    return 0


def main_variance(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdkit analyze variance", description=__doc__.splitlines()[0])
    add_variance_arguments(p)
    return variance_from_args(p.parse_args(argv))
