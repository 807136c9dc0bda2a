"""Benchmark: how much the sampled-token gradient variance grows from γ = 0 to γ = 1, per horizon T.

METHOD.md ("The bias–variance analysis") reports that the gradient variance rises by 2–3 orders of
magnitude as γ goes from 0 (token-level OPD) to 1 (the sequence-level estimator). This script measures
``variance(γ = 1) / variance(γ = 0)`` on the tabular toy problem of ``opdkit.analysis.variance`` at the
default size of ``opdkit analyze variance`` (same problems, same seeds, same trajectories), Monte Carlo
(with the ratio of the bootstrap interval ends as a rough range) and exact (by enumeration), together
with the support-set KL (K = V, renormalised) for scale. ``--extended`` adds a V = 2 sweep to longer
horizons, where enumeration still fits, to show how the ratio keeps growing with T.

Both problem presets are measured: ``default`` (V = 4, T = 2 4 6 8) and ``imbalanced`` (a student far
from a sharper teacher, mostly negative rewards; V = 2, T = 4 8 12 16), each at its own default size.

    .venv/bin/python benchmarks/variance_bench.py             # both presets at their default sizes
    .venv/bin/python benchmarks/variance_bench.py --extended  # + default problem at V = 2, T = 4 8 12 16
    .venv/bin/python benchmarks/variance_bench.py --problem default  # one preset only
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from opdkit.analysis.variance import (
    DEFAULT_N_ESTIMATES,
    DEFAULT_SAMPLES_PER_ESTIMATE,
    DEFAULT_SEED,
    PROBLEM_PRESETS,
    run_variance_experiment,
)


def measure(vocab: int, Ts: list[int], n_estimates: int, samples: int, seed: int, problem: str = "default") -> None:
    t0 = time.perf_counter()
    results = run_variance_experiment(
        None,
        Ts=Ts,
        gammas=[0.0, 1.0],
        Ks=[],
        vocab=vocab,
        n_estimates=n_estimates,
        samples_per_estimate=samples,
        seed=seed,
        plot=False,
        problem=problem,
    )
    elapsed = time.perf_counter() - t0
    print(
        f"\nproblem {problem}, V = {vocab}, {n_estimates} x {samples} trajectories per T, seed {seed} ({elapsed:.1f} s)"
    )
    print(
        f"{'T':>3} {'var(g=0)':>10} {'var(g=1)':>10} {'ratio MC':>9} {'CI range':>15} {'ratio exact':>11}"
        f" {'bias g=0':>9} {'var supKL':>10}"
    )
    for T in Ts:
        by = {(r["estimator"], r["gamma"], r["renormalize"]): r for r in results if r["T"] == T}
        v0, v1 = by[("sampled_token", 0.0, None)], by[("sampled_token", 1.0, None)]
        kl = by[("support_kl", None, True)]
        lo = v1["variance_ci_low"] / v0["variance_ci_high"]
        hi = v1["variance_ci_high"] / v0["variance_ci_low"]
        print(
            f"{T:>3} {v0['variance']:>10.4g} {v1['variance']:>10.4g} {v1['variance'] / v0['variance']:>9.3g} "
            f"{f'[{lo:.3g}, {hi:.3g}]':>15} {v1['variance_exact'] / v0['variance_exact']:>11.3g} "
            f"{v0['bias_rel_exact']:>9.3g} {kl['variance']:>10.4g}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extended", action="store_true", help="also V = 2 with T = 4 8 12 16")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--problem", choices=["both", *sorted(PROBLEM_PRESETS)], default="both", help="preset(s) to measure")
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    )
    print("ratio = variance(gamma=1) / variance(gamma=0), variance = trace of the per-sample covariance;")
    print("'CI range' = [low1/high0, high1/low0] from the 95% bootstrap intervals; 'bias g=0' = exact")
    print("||E g0 - grad J|| / ||grad J||; 'var supKL' = support-set KL gradient, K = V, renormalised.")
    names = sorted(PROBLEM_PRESETS) if args.problem == "both" else [args.problem]
    for name in names:
        pr = PROBLEM_PRESETS[name]
        measure(pr.vocab, list(pr.Ts), DEFAULT_N_ESTIMATES, DEFAULT_SAMPLES_PER_ESTIMATE, args.seed, name)
    if args.extended:
        measure(2, [4, 8, 12, 16], DEFAULT_N_ESTIMATES, DEFAULT_SAMPLES_PER_ESTIMATE, args.seed, "default")


if __name__ == "__main__":
    main()
