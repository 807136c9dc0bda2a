"""The ``opdkit analyze variance`` command line: its flags, and running the experiment from them."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from opdkit.analysis import variance_experiment
from opdkit.analysis.toy import DEFAULT_PROBLEM, PROBLEM_PRESETS
from opdkit.analysis.variance_experiment import (
    DEFAULT_GAMMAS,
    DEFAULT_KS,
    DEFAULT_N_ESTIMATES,
    DEFAULT_SAMPLES_PER_ESTIMATE,
    DEFAULT_SEED,
    run_variance_experiment,
)
from opdkit.analysis.variance_report import variance_ratios

__all__ = ["add_variance_arguments", "main_variance", "variance_from_args"]


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
        help=(
            "toy problem (default: 'bigram': a bigram student, V=8, T = 2..256, Monte Carlo with exact ∇J; "
            "'tabular': one row per prefix, V=4, T = 2..8, everything enumerated; 'imbalanced': a tabular, "
            "far student under a sharper teacher, V=2, T up to 16)"
        ),
    )
    p.add_argument("--T", dest="Ts", type=_ints, default=None, help="horizons, e.g. '2,4,6' (default: the preset's)")
    p.add_argument("--gammas", type=_floats, default=list(DEFAULT_GAMMAS), help="discounts, comma-separated")
    p.add_argument("--K", dest="Ks", type=_ints, default=list(DEFAULT_KS), help="support sizes (V always added)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size V (default: the preset's)")
    p.add_argument("--n-estimates", type=int, default=DEFAULT_N_ESTIMATES, help="independent groups")
    p.add_argument(
        "--samples-per-estimate",
        type=int,
        default=None,
        help=f"trajectories per group (default: the problem's; bigram 100, tabular {DEFAULT_SAMPLES_PER_ESTIMATE})",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--no-plot", action="store_true", help="skip variance.png")


def variance_from_args(args: argparse.Namespace) -> int:
    from opdkit.paths import check_output_dir

    check_output_dir(args.out, "--out")  # before minutes of computation, not after
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
        exact = "" if math.isnan(v["exact"]) else f", exact {v['exact']:.3g}"
        print(
            f"T={T}: variance(gamma=1)/variance(gamma=0) = {v['mc']:.3g} "
            f"(95% CI {v['ci_low']:.3g}-{v['ci_high']:.3g}{exact})"
        )
    print(f"wrote {Path(args.out) / 'variance.csv'}, variance.md" + ("" if args.no_plot else ", variance.png"))
    return 0


def main_variance(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdkit analyze variance", description=variance_experiment.__doc__.splitlines()[0])
    add_variance_arguments(p)
    return variance_from_args(p.parse_args(argv))
