"""Benchmark: how much the sampled-token gradient variance grows from γ = 0 to γ = 1, per horizon T.

METHOD.md ("The bias–variance analysis") reports that the gradient variance rises by 2–3 orders of
magnitude as γ goes from 0 (token-level OPD) to 1 (the sequence-level estimator). This script measures
``variance(γ = 1) / variance(γ = 0)`` with ``opdkit.analysis.variance`` at the default sizes of
``opdkit analyze variance`` (same problems, same seeds, same trajectories): Monte Carlo with its paired
bootstrap interval, exact by enumeration where the horizon allows, and the log-log slope of the ratio
against T over the upper half of the horizons.

Problems: ``bigram`` (the default: a shared-parameter bigram student, V = 8, T = 2 … 256, over several
seeds), ``tabular`` (one row per prefix, V = 4, T = 2 4 6 8) and ``imbalanced`` (tabular, V = 2,
T = 4 … 16).

    .venv/bin/python benchmarks/variance_bench.py                   # all three (~5 min on 2 cores)
    .venv/bin/python benchmarks/variance_bench.py --problem bigram --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from opdkit.analysis.variance import PROBLEM_PRESETS, run_variance_experiment, variance_ratios
from opdkit.analysis.variance_report import ratio_slope


def measure(problem: str, seed: int) -> None:
    t0 = time.perf_counter()
    results = run_variance_experiment(None, gammas=[0.0, 1.0], Ks=[], seed=seed, plot=False, problem=problem)
    ratios = variance_ratios(results)
    pr = PROBLEM_PRESETS[problem]
    n = results[0]["n_samples"]
    print(f"\nproblem {problem}, V = {pr.vocab}, {n} trajectories per T, seed {seed} "
          f"({time.perf_counter() - t0:.1f} s); slope of log ratio vs log T: {ratio_slope(ratios):.2f}")
    print(f"{'T':>4} {'ratio MC':>10} {'95% CI':>22} {'exact':>8}")
    for T, v in ratios.items():
        exact = "-" if math.isnan(v["exact"]) else f"{v['exact']:.3g}"
        ci = f"[{v['ci_low']:.4g}, {v['ci_high']:.4g}]"
        print(f"{T:>4} {v['mc']:>10.4g} {ci:>22} {exact:>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", choices=["all", *sorted(PROBLEM_PRESETS)], default="all", help="problem(s) to measure")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the bigram problem (the others use the first)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    )
    print("ratio = variance(gamma=1) / variance(gamma=0), variance = trace of the per-sample covariance;")
    print("95% CI: percentile bootstrap over groups, both estimators resampled together (same trajectories).")
    names = ["bigram", "tabular", "imbalanced"] if args.problem == "all" else [args.problem]
    for name in names:
        for seed in seeds if name == "bigram" else seeds[:1]:
            measure(name, seed)


if __name__ == "__main__":
    main()
