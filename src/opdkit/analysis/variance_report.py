"""The bias–variance experiment's text outputs: ``variance.csv``, ``variance.md`` and the γ=1/γ=0 ratios.

Every function takes the result dicts of ``run_variance_experiment`` (one per estimator setting and T).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from opdkit.analysis.estimators import BOOTSTRAP_RESAMPLES, CI_LEVEL
from opdkit.analysis.toy import DEFAULT_PROBLEM, get_preset

__all__ = ["CSV_COLUMNS", "MIN_RELIABLE_GROUPS", "format_markdown", "ratio_slope", "variance_ratios", "write_csv"]

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
    "rollout_top_p",  # (added after the first nine, which keep their order) the rollouts' nucleus mass; 1 = none
)


MIN_RELIABLE_GROUPS = 30  # below: the bootstrap intervals are flagged as rough (report and command line)


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
            w.writerow([_csv_value(r.get(c, 1.0 if c == "rollout_top_p" else None)) for c in CSV_COLUMNS])


def _ratio_ci(num: Sequence[float], den: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(num) / mean(den)``, resampling the groups jointly.

    Both estimators were evaluated on the same trajectories (common random numbers), so group i of one
    is paired with group i of the other.
    """
    import torch

    a = torch.tensor(list(num), dtype=torch.float64)
    b = torch.tensor(list(den), dtype=torch.float64)
    if a.numel() != b.numel() or a.numel() < 2:
        return math.nan, math.nan
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(a.numel(), (BOOTSTRAP_RESAMPLES, a.numel()), generator=g)
    ratios = a[idx].mean(-1) / b[idx].mean(-1)
    alpha = (1.0 - CI_LEVEL) / 2
    lo, hi = torch.quantile(ratios, torch.tensor([alpha, 1.0 - alpha], dtype=ratios.dtype))
    return float(lo), float(hi)


def variance_ratios(results: Sequence[dict]) -> dict[int, dict[str, float]]:
    """Per T: ``variance(γ=1) / variance(γ=0)``: Monte Carlo (``mc``) with its bootstrap interval
    (``ci_low``, ``ci_high``; NaN without the per-group variances), and exact (``exact``; NaN where the
    horizon cannot be enumerated)."""
    out: dict[int, dict[str, float]] = {}
    st = [r for r in results if r["estimator"] == "sampled_token"]
    for T in sorted({r["T"] for r in st}):
        by_g = {r["gamma"]: r for r in st if r["T"] == T}
        if 0.0 in by_g and 1.0 in by_g:
            one, zero = by_g[1.0], by_g[0.0]
            lo, hi = math.nan, math.nan
            if one.get("group_variances") and zero.get("group_variances") and zero["variance"] > 0:
                lo, hi = _ratio_ci(one["group_variances"], zero["group_variances"], seed=T)
            out[T] = {
                "mc": one["variance"] / zero["variance"] if zero["variance"] > 0 else math.nan,
                "ci_low": lo,
                "ci_high": hi,
                "exact": one["variance_exact"] / zero["variance_exact"] if zero["variance_exact"] > 0 else math.nan,
            }
    return out


def ratio_slope(ratios: dict[int, dict[str, float]]) -> float:
    """Least-squares slope of log(ratio) against log(T) over the upper half of the horizons (NaN if < 2)."""
    Ts = [T for T in sorted(ratios) if ratios[T]["mc"] > 0]
    Ts = Ts[len(Ts) // 2 :] if len(Ts) >= 4 else Ts
    if len(Ts) < 2:
        return math.nan
    xs = [math.log(T) for T in Ts]
    ys = [math.log(ratios[T]["mc"]) for T in Ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else math.nan


def _g(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3g}"


def format_markdown(results: Sequence[dict], settings: dict) -> str:
    """``variance.md``: the settings, the γ sweep, the support-KL sweep and the γ=1/γ=0 variance ratios."""
    n = settings["n_estimates"] * settings["samples_per_estimate"]
    lines = [
        "# Gradient bias and variance of the OPD gradient estimators",
        "",
        f"V = {settings['vocab']}, T in {settings['Ts']}, {settings['n_estimates']} groups × "
        f"{settings['samples_per_estimate']} trajectories = {n} samples per T (the same trajectories for "
        f"every setting of one T), seed {settings['seed']}.",
        "",
        f"Problem `{settings.get('problem', DEFAULT_PROBLEM)}`: "
        f"{settings.get('description') or get_preset(settings.get('problem', DEFAULT_PROBLEM)).description}.",
        "",
        (
            "- `bias_rel` = ‖mean − ref‖ / ‖ref‖ with `ref` the mean of γ = 1 over the reference trajectories "
            "(there is no exact gradient for a network); `floor` = sqrt(variance / N) / ‖ref‖ plus the "
            "reference's own noise: a bias below it is not resolved; no `exact` column applies."
            if settings.get("lm")
            else "- `bias_rel` = ‖mean − ∇J‖ / ‖∇J‖ from the samples; `floor` = sqrt(variance / N) / ‖∇J‖, the "
            "size of the Monte Carlo noise in `bias_rel` (a bias well below it is not resolved); `exact` "
            "columns are the estimator's true mean and variance, by enumeration of all V^T sequences where "
            "V^T is small; beyond that (bigram problems) ∇J and the exact means of γ = 0, γ = 1 and the "
            "support-set KL come from the Markov chain's marginals, and the others show –"
            + (" (under top-p rollouts only ∇J does: the estimators' exact means show – there)."
               if settings.get("top_p", 1.0) < 1.0 else ".")
        ),
        "- `variance` = trace of the covariance of the one-trajectory gradient estimate, with a "
        f"{int(CI_LEVEL * 100)}% percentile bootstrap interval over the groups ({BOOTSTRAP_RESAMPLES} resamples)"
        + (f". **Only {settings['n_estimates']} groups: the intervals are rough** (a percentile bootstrap over "
           f"fewer than {MIN_RELIABLE_GROUPS} groups of a heavy-tailed variance under-covers; the settings of one "
           "T share their trajectories, so they miss together)." if settings["n_estimates"] < MIN_RELIABLE_GROUPS
           else "."),
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
    corrected = [r for r in results if r["estimator"].endswith("_is")]
    if corrected:
        lines += [
            "",
            f"## Top-p rollouts (p = {settings.get('top_p', 1.0):g}): sampled-token with and without importance "
            "correction",
            "",
            "Rollouts come from the truncated student π_p, the objective is the untruncated student's KL: `none` "
            "is the paper's estimator, `token` weights each token's loss by its nucleus mass Z_t = π/π_p, "
            "`sequence` weights the whole trajectory by Π_t Z_t.",
            "",
            "| T | γ | correction | bias_rel | floor | bias_rel (exact) | variance | 95% CI | variance (exact) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in [r for r in results if r["estimator"].startswith("sampled_token")]:
            kind = r["estimator"].removeprefix("sampled_token").removesuffix("_is").lstrip("_") or "none"
            lines.append(
                f"| {r['T']} | {r['gamma']:g} | {kind} | {_g(r['bias_rel'])} | {_g(r['bias_noise_floor'])} | "
                f"{_g(r['bias_rel_exact'])} | {_g(r['variance'])} | [{_g(r['variance_ci_low'])}, "
                f"{_g(r['variance_ci_high'])}] | {_g(r['variance_exact'])} |"
            )
    ratios = variance_ratios(results)
    if ratios:
        lines += [
            "",
            "## Variance ratio γ = 1 over γ = 0",
            "",
            f"| T | Monte Carlo | {int(CI_LEVEL * 100)}% CI (paired bootstrap) | exact |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {T} | {_g(v['mc'])} | [{_g(v['ci_low'])}, {_g(v['ci_high'])}] | {_g(v['exact'])} |"
            for T, v in ratios.items()
        ]
        slope = ratio_slope(ratios)
        if not math.isnan(slope):
            lines += [
                "",
                f"Growth: the ratio rises as T^{slope:.2f} over the upper half of the horizons (log-log "
                "least squares; 2 is the T² of a per-token reward with a non-zero mean, 1 the T of "
                "zero-mean independent rewards).",
            ]
    return "\n".join(lines) + "\n"
