"""The bias–variance experiment's text outputs: ``variance.csv``, ``variance.md`` and the γ=1/γ=0 ratios.

Every function takes the result dicts of ``run_variance_experiment`` (one per estimator setting and T).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from opdkit.analysis.estimators import BOOTSTRAP_RESAMPLES, CI_LEVEL
from opdkit.analysis.toy import DEFAULT_PROBLEM, get_preset

__all__ = ["CSV_COLUMNS", "format_markdown", "variance_ratios", "write_csv"]

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
