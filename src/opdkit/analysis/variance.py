"""The bias–variance experiment's public import path (``opdkit analyze variance``): re-exports only.

Bias and variance of OPD gradient estimators on a toy problem whose exact gradient is known
(METHOD.md, "The bias–variance analysis"). The code lives in one module per job:

- ``opdkit.analysis.toy``: the enumerable tabular toy problem and its presets, sampling, enumeration,
  and the exact gradient of the sequence-level reverse KL.
- ``opdkit.analysis.estimators``: the estimator settings, their per-sample gradients, Monte Carlo
  statistics (with bootstrap intervals) and exact moments.
- ``opdkit.analysis.variance_experiment``: the experiment runner and its defaults (the statistics it
  reports are described there).
- ``opdkit.analysis.variance_report``: ``variance.csv``, ``variance.md`` and the γ=1/γ=0 variance ratios.
- ``opdkit.analysis.variance_cli``: the command line (``main_variance``).
- ``opdkit.analysis.plots``: ``variance.png`` (matplotlib, imported only when plotting).
"""

from __future__ import annotations

from opdkit.analysis.estimators import (
    BOOTSTRAP_RESAMPLES,
    CI_LEVEL,
    EstimatorSpec,
    EstimatorStats,
    default_specs,
    estimate,
    exact_moments,
    per_sample_gradients,
)
from opdkit.analysis.toy import (
    DEFAULT_PROBLEM,
    DEFAULT_TS,
    DEFAULT_VOCAB,
    MAX_ENUMERATED,
    PROBLEM_PRESETS,
    Enumeration,
    ProblemPreset,
    ToyProblem,
    enumerate_sequences,
    exact_kl_gradient,
    get_preset,
    make_problem,
    num_prefixes,
    prefix_rows,
    sample_sequences,
    sequence_reverse_kl,
)
from opdkit.analysis.variance_cli import add_variance_arguments, main_variance, variance_from_args
from opdkit.analysis.variance_experiment import (
    DEFAULT_GAMMAS,
    DEFAULT_KS,
    DEFAULT_N_ESTIMATES,
    DEFAULT_SAMPLES_PER_ESTIMATE,
    DEFAULT_SEED,
    run_variance_experiment,
)
from opdkit.analysis.variance_report import CSV_COLUMNS, format_markdown, variance_ratios, write_csv

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CI_LEVEL",
    "CSV_COLUMNS",
    "DEFAULT_PROBLEM",
    "DEFAULT_GAMMAS",
    "DEFAULT_KS",
    "DEFAULT_N_ESTIMATES",
    "DEFAULT_SAMPLES_PER_ESTIMATE",
    "DEFAULT_SEED",
    "DEFAULT_TS",
    "DEFAULT_VOCAB",
    "Enumeration",
    "EstimatorSpec",
    "EstimatorStats",
    "MAX_ENUMERATED",
    "PROBLEM_PRESETS",
    "ProblemPreset",
    "ToyProblem",
    "add_variance_arguments",
    "default_specs",
    "enumerate_sequences",
    "estimate",
    "exact_kl_gradient",
    "exact_moments",
    "format_markdown",
    "get_preset",
    "main_variance",
    "make_problem",
    "num_prefixes",
    "per_sample_gradients",
    "prefix_rows",
    "run_variance_experiment",
    "sample_sequences",
    "sequence_reverse_kl",
    "variance_from_args",
    "variance_ratios",
    "write_csv",
]
