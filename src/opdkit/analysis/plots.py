"""Figures of the analyses (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gap(a: float, b: float) -> float:
    """An error bar's length ``a − b``; 0 where the interval is unknown (NaN)."""
    return 0.0 if math.isnan(a) or math.isnan(b) else max(a - b, 0.0)


def plot_variance(results: Sequence[dict], path: str | Path, *, top_p: float = 1.0) -> Path:
    """``variance.png``: (a) variance against γ per T, log scale, with the support-KL (K = V) level
    dashed; (b) support-KL variance against K; (c) the exact relative bias against γ, MC as markers;
    (d) variance(γ=1)/variance(γ=0) against T, log-log, with its bootstrap interval and a T² line.
    ``top_p < 1`` (rollouts from the truncated student): the titles say so, and the importance-corrected
    sampled-token estimators are drawn in (a) and (c) with their own line styles (token dotted, sequence
    dash-dotted)."""
    from opdkit.analysis.variance_report import variance_ratios

    plt = _pyplot()
    st = [r for r in results if r["estimator"] == "sampled_token"]
    sk = [r for r in results if r["estimator"] == "support_kl"]
    Ts = sorted({r["T"] for r in results})
    gammas = sorted({r["gamma"] for r in st})
    pos = {g: i for i, g in enumerate(gammas)}
    colors = plt.get_cmap("viridis")([i / max(1, len(Ts) - 1) * 0.85 for i in range(len(Ts))])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    ax_var, ax_k, ax_bias, ax_ratio = axes
    for T, c in zip(Ts, colors):
        rows = sorted((r for r in st if r["T"] == T), key=lambda r: r["gamma"])
        if rows:
            x = [pos[r["gamma"]] for r in rows]
            y = [r["variance"] for r in rows]
            lo = [max(r["variance"] - r["variance_ci_low"], 0.0) for r in rows]
            hi = [max(r["variance_ci_high"] - r["variance"], 0.0) for r in rows]
            ax_var.errorbar(x, y, yerr=[lo, hi], color=c, marker="o", ms=4, capsize=3, label=f"sampled-token, T={T}")
            ax_bias.plot(x, [r["bias_rel_exact"] for r in rows], color=c, marker="o", ms=3, label=f"T={T} (exact)")
            ax_bias.plot(x, [r["bias_rel"] for r in rows], color=c, ls="none", marker="x", ms=5)
        for kind, ls in (("token", ":"), ("sequence", "-.")):  # the top-p corrections, if measured
            rows = sorted((r for r in results if r["estimator"] == f"sampled_token_{kind}_is" and r["T"] == T),
                          key=lambda r: r["gamma"])
            if rows:
                x = [pos[r["gamma"]] for r in rows]
                ax_var.plot(x, [r["variance"] for r in rows], color=c, ls=ls, marker=".", label=f"{kind} IS, T={T}")
                # like the uncorrected rows: the exact bias as the line where it is known, Monte Carlo as x
                exact = [r["bias_rel_exact"] for r in rows]
                if not all(math.isnan(v) for v in exact):
                    ax_bias.plot(x, exact, color=c, ls=ls, marker=".", label=f"{kind} IS, T={T} (exact)")
                ax_bias.plot(x, [r["bias_rel"] for r in rows], color=c, ls="none", marker="x", ms=5)
        full = [r for r in sk if r["T"] == T and r["renormalize"] and r["K"] == max(q["K"] for q in sk)]
        if full and full[0]["variance"] > 0:
            ax_var.axhline(full[0]["variance"], color=c, ls="--", lw=1, label=f"support KL K={full[0]['K']}, T={T}")
        for renorm, ls in ((True, "-"), (False, "--")):
            ks = sorted((r for r in sk if r["T"] == T and r["renormalize"] is renorm), key=lambda r: r["K"])
            ks = [r for r in ks if r["variance"] > 0]
            if ks:
                ax_k.plot(
                    [r["K"] for r in ks],
                    [r["variance"] for r in ks],
                    color=c,
                    ls=ls,
                    marker="o",
                    ms=4,
                    label=f"T={T}, {'renormalised' if renorm else 'not renormalised'}",
                )
    for ax in (ax_var, ax_bias):
        ax.set_xticks(range(len(gammas)))
        ax.set_xticklabels([f"{g:g}" for g in gammas])
        ax.set_xlabel("discount γ")
    ax_var.set_yscale("log")
    ax_var.set_ylabel("variance per sample (trace of covariance)")
    ax_var.set_title("sampled-token gradient variance (95% CI)")
    ax_k.set_xscale("log", base=2)
    k_values = sorted({r["K"] for r in sk})
    ax_k.set_xticks(k_values)
    ax_k.set_xticklabels([str(k) for k in k_values])
    ax_k.minorticks_off()
    ax_k.set_yscale("log")
    ax_k.set_xlabel("support size K")
    ax_k.set_ylabel("variance per sample")
    ax_k.set_title("support-set KL gradient variance")
    ax_bias.set_ylabel("‖E ĝ − ∇J‖ / ‖∇J‖")
    ax_bias.set_title("relative bias (line: exact, x: Monte Carlo)")
    ratios = variance_ratios(results)
    rT = [T for T in sorted(ratios) if ratios[T]["mc"] > 0]
    if rT:
        y = [ratios[T]["mc"] for T in rT]
        lo = [_gap(ratios[T]["mc"], ratios[T]["ci_low"]) for T in rT]
        hi = [_gap(ratios[T]["ci_high"], ratios[T]["mc"]) for T in rT]
        ax_ratio.errorbar(rT, y, yerr=[lo, hi], marker="o", ms=4, capsize=3, label="Monte Carlo (95% CI)")
        ex = [(T, ratios[T]["exact"]) for T in rT if not math.isnan(ratios[T]["exact"])]
        if ex:
            ax_ratio.plot([t for t, _ in ex], [v for _, v in ex], ls="none", marker="x", ms=7, label="exact")
        c = y[-1] / rT[-1] ** 2  # the T² line through the longest horizon
        ax_ratio.plot(rT, [c * T**2 for T in rT], ls="--", color="grey", label="∝ T² (through the last point)")
        ax_ratio.set_xscale("log", base=2)
        ax_ratio.set_yscale("log")
    ax_ratio.set_xlabel("horizon T")
    ax_ratio.set_ylabel("variance(γ=1) / variance(γ=0)")
    ax_ratio.set_title("variance ratio against T")
    if top_p < 1.0:
        for ax in axes:
            ax.set_title(f"{ax.get_title()}\nrollouts top-p {top_p:g}", fontsize=10)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # (a panel may have nothing labelled, e.g. one γ)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
