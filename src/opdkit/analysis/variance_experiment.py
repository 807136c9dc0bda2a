"""Bias and variance of the OPD gradient estimators, on toy problems with an exact gradient or on real LMs.

This module runs the experiment (``run_variance_experiment``): per horizon T, one toy problem
(``opdkit.analysis.toy``), its exact gradient, the sampled trajectories, and every estimator setting
(``opdkit.analysis.estimators``) evaluated on them; the files are written by
``opdkit.analysis.variance_report`` and ``opdkit.analysis.plots``. (The first line above is the
``opdkit analyze variance`` description.)

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
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from opdkit.analysis.estimators import bigram_exact_mean, default_specs, estimate, exact_moments
from opdkit.analysis.toy import (
    DEFAULT_PROBLEM,
    MAX_ENUMERATED,
    Enumeration,
    exact_kl_gradient,
    get_preset,
    sample_sequences,
)
from opdkit.analysis.variance_report import format_markdown, write_csv
from opdkit.errors import InputError

__all__ = [
    "DEFAULT_GAMMAS",
    "DEFAULT_KS",
    "DEFAULT_N_ESTIMATES",
    "DEFAULT_SAMPLES_PER_ESTIMATE",
    "DEFAULT_SEED",
    "run_variance_experiment",
]

DEFAULT_GAMMAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)  # V is always added; K > V is skipped
DEFAULT_N_ESTIMATES = 100
DEFAULT_SAMPLES_PER_ESTIMATE = 500
DEFAULT_SEED = 0


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
    samples_per_estimate: int | None = None,
    seed: int = DEFAULT_SEED,
    plot: bool = True,
    verbose: bool = False,
    problem: str = DEFAULT_PROBLEM,
    top_p: float = 1.0,
) -> list[dict]:
    """Run the experiment; write ``variance.csv``, ``variance.md`` and ``variance.png`` under ``out_dir``.

    ``problem`` names a ``PROBLEM_PRESETS`` entry; ``Ts`` and ``vocab`` left ``None`` take its defaults
    (the default ``bigram``: V = 8, T = 2 .. 256). For each T: one toy problem (seeded by ``seed`` and T),
    ``n_estimates × samples_per_estimate`` trajectories from the student, and every estimator setting
    evaluated on them. ``Ks`` above V are skipped (V itself is always measured).

    Returns one dict per setting with the CSV columns (``gamma`` None for support_kl, ``K`` and
    ``renormalize`` None for sampled_token) plus ``bias_rel_exact``, ``variance_exact``,
    ``bias_noise_floor`` (``sqrt(variance / N) / ‖∇J‖``), ``n_samples``, ``grad_norm_exact``.
    ``out_dir=None`` writes nothing. ``top_p < 1``: rollouts from the student truncated to each row's nucleus
    (the objective stays the untruncated student's KL), and the sampled-token estimators also with token and
    sequence importance corrections (``estimator`` ``sampled_token_token_is``, ``sampled_token_sequence_is``).
    """
    preset = get_preset(problem)
    Ts = [int(t) for t in (preset.Ts if Ts is None else Ts)]
    vocab = preset.vocab if vocab is None else int(vocab)
    samples_per_estimate = preset.samples_per_estimate if samples_per_estimate is None else int(samples_per_estimate)
    gammas = [float(g) for g in gammas]
    if not Ts or any(t < 1 for t in Ts):
        raise InputError(f"Ts: expected horizons >= 1, got {Ts}")
    if any(not 0.0 <= g <= 1.0 for g in gammas):
        raise InputError(f"gammas: expected values in [0, 1], got {gammas}")
    if vocab < 2:
        raise InputError(f"vocab: expected >= 2, got {vocab}")
    for T in Ts:
        if preset.structure == "prefix" and vocab**T > MAX_ENUMERATED:
            raise InputError(
                f"V^T = {vocab}^{T} exceeds the enumeration cap {MAX_ENUMERATED} of the tabular problem "
                f"{preset.name!r}; lower T or vocab, or use --problem bigram"
            )
    if n_estimates < 2:
        raise InputError(f"n_estimates: expected >= 2 groups, got {n_estimates}")
    if samples_per_estimate < 2:
        raise InputError(f"samples_per_estimate: expected >= 2 trajectories per group, got {samples_per_estimate}")
    if len(set(gammas)) != len(gammas):
        raise InputError(f"gammas: a discount given twice ({', '.join(f'{g:g}' for g in gammas)})")
    if not 0.0 < float(top_p) <= 1.0:
        raise InputError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    specs = default_specs(vocab, gammas, Ks, corrections=top_p < 1.0)
    results: list[dict] = []
    for T in Ts:
        t0 = time.perf_counter()
        # A bigram's tables do not depend on T: one problem for every horizon, so the curve against T
        # is one student's; a tabular problem's tables grow with T and are drawn per T.
        toy = preset.make(vocab, T, _seed_for(seed, 0 if preset.structure == "bigram" else T, 1))
        toy = dataclasses.replace(toy, top_p=float(top_p))
        exact = exact_kl_gradient(toy)
        exact_norm = float(exact.norm())
        gen = torch.Generator().manual_seed(_seed_for(seed, T, 2))
        seqs = sample_sequences(toy, n_estimates * samples_per_estimate, gen)
        rows = toy.rows(seqs)
        enumeration = Enumeration.of(toy) if toy.enumerable else None
        for i, spec in enumerate(specs):
            stats = estimate(
                toy, spec, seqs, samples_per_estimate, bootstrap_seed=_seed_for(seed, T, 100 + i), rows_N_T=rows
            )
            if enumeration is not None:
                ex_mean, ex_var = exact_moments(toy, spec, enumeration=enumeration)
            else:  # beyond enumeration: the chain's marginals give some means exactly, no variance
                ex_mean, ex_var = bigram_exact_mean(toy, spec), math.nan
            results.append(
                {
                    "estimator": spec.name,
                    "T": T,
                    "gamma": spec.gamma,
                    "K": spec.K,
                    "renormalize": spec.renormalize,
                    "bias_rel": float((stats.mean_P_V - exact).norm()) / exact_norm,
                    "variance": stats.variance,
                    "variance_ci_low": stats.variance_ci[0],
                    "variance_ci_high": stats.variance_ci[1],
                    "bias_rel_exact": math.nan if ex_mean is None else float((ex_mean - exact).norm()) / exact_norm,
                    "variance_exact": ex_var,
                    "bias_noise_floor": math.sqrt(max(stats.variance, 0.0) / stats.n_samples) / exact_norm,
                    "n_samples": stats.n_samples,
                    "grad_norm_exact": exact_norm,
                    "group_variances": stats.group_variances.tolist(),
                    "rollout_top_p": float(top_p),
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
            top_p=float(top_p),
        )
        (out / "variance.md").write_text(format_markdown(results, settings), encoding="utf-8")
        if plot:
            from opdkit.analysis.plots import plot_variance

            plot_variance(results, out / "variance.png", top_p=float(top_p))
        else:  # an earlier run's figure would no longer match the table
            (out / "variance.png").unlink(missing_ok=True)
    return results
