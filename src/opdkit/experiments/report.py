"""An experiment's files: ``results.csv`` (one row per arm), ``results.md`` (the claim and the table) and
``NAME.png`` (accuracy curves; the experiment's axis or its training metrics)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from opdkit.experiments.arms import Experiment

__all__ = ["CSV_COLUMNS", "accuracy_interval", "write_report"]

CSV_COLUMNS = ("arm", "label", "teacher", "x", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "gap_closed",
               "grad_variance", "grad_mean_sq", "noise_to_signal", "loss", "grad_norm", "negative_reward_frac",
               "reward_skew", "teacher_support_mass", "support_size", "response_length", "truncation_rate",
               "skipped_steps", "seconds", "topp_weight", "rollout_tail_mass")


def accuracy_interval(acc: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of an accuracy measured on ``n`` problems."""
    if n <= 0:
        return math.nan, math.nan
    z = 1.959964
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    n = summary["eval_problems"]
    before, teacher = summary["student_accuracy_before"], summary["teacher_accuracy"]
    gap = teacher - before
    rows = []
    for name, r in summary["arms"].items():
        lo, hi = accuracy_interval(r["accuracy"], n)
        row = {"arm": name, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
               "gap_closed": (r["accuracy"] - before) / gap if gap > 0 else math.nan}
        for c in CSV_COLUMNS:
            row.setdefault(c, r.get(c))
        rows.append(row)
    return rows


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3g}"
    return str(v)


_OPTIONAL = (("reward_skew", "reward skew", False), ("support_size", "support size", False),
             ("topp_weight", "IS weight", False), ("rollout_tail_mass", "tail mass", False))
_MEANING = {"reward_skew": "reward skew (of the sampled-token rewards)",
            "support_size": "support size (ids per position of a nucleus support)",
            "topp_weight": "IS weight (the top-p importance weight that multiplies the loss)",
            "rollout_tail_mass": "tail mass (the student's probability outside the nucleus it sampled from)"}


def write_report(exp: Experiment, summary: dict[str, Any], out: Path) -> None:
    rows = _rows(summary)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in CSV_COLUMNS])
    lines = [
        f"# Experiment `{exp.name}`: {exp.title}",
        "",
        f"Claim: {exp.claim}.",
        "",
        f"The demo task, seed {summary['seed']}, {summary['steps'] or 'the demo config'} OPD steps per arm "
        f"(same prompts, samples and seeds); accuracy on {summary['eval_problems']} held-out problems "
        f"(one sample each, τ 1, top-p 0.9) with a 95% Wilson interval. Teacher "
        f"{_fmt(summary['teacher_accuracy'], True)}, student before OPD "
        f"{_fmt(summary['student_accuracy_before'], True)}"
        + (f"; the end-swapped teacher {_fmt(summary['eos_swapped_teacher_accuracy'], True)}"
           if "eos_swapped_teacher_accuracy" in summary else "") + ".",
        "",
    ]
    probe = any(r.get("grad_variance") is not None for r in rows)
    if probe:
        lines += ["Gradient variance: the trace of the covariance of one rollout batch's gradient at the starting "
                  "student (independent batches, no update); noise/signal = that variance / ‖E g‖².", ""]
    # columns only some arms have: shown when any arm has them ("–" for the others)
    optional = [(key, title, pct) for key, title, pct in _OPTIONAL if any(r.get(key) is not None for r in rows)]
    head = ["arm", "accuracy", "95% CI", "gap closed"]
    head += ["grad variance", "noise/signal"] if probe else []
    head += ["neg. reward frac"] + [title for _, title, _ in optional] + ["response length", "truncated", "seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = f"{_fmt(r['accuracy_ci_low'], True)}–{_fmt(r['accuracy_ci_high'], True)}"
        cells = [f"{r['arm']} ({r['label']})", _fmt(r["accuracy"], True), ci, _fmt(r["gap_closed"], True)]
        cells += [_fmt(r["grad_variance"]), _fmt(r["noise_to_signal"])] if probe else []
        cells += [_fmt(r["negative_reward_frac"], True)] + [_fmt(r[key], pct) for key, _, pct in optional]
        cells += [_fmt(r["response_length"]), _fmt(r["truncation_rate"], True), _fmt(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    means = ["neg. reward frac (sampled-token rewards below 0)"]
    means += [_MEANING[key] for key, _, _ in optional]
    means += ["response length", "truncated (responses cut by the length limit)"]
    lines += ["", f"Means over the run's steps: {', '.join(means)}."]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(exp, summary, out / f"{exp.name}.png")


def _plot(exp: Experiment, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, (ax_acc, ax_b) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name, r in arms.items():
        steps = [0] + [s for s, _ in r["curve"]]
        ax_acc.plot(steps, [summary["student_accuracy_before"]] + [a for _, a in r["curve"]], marker=".", label=name)
    ax_acc.axhline(summary["teacher_accuracy"], color="k", ls="--", lw=1, label="teacher")
    ax_acc.set_xlabel("training step")
    ax_acc.set_ylabel("held-out accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title(exp.title)
    ax_acc.legend(fontsize=7)
    ax_acc.grid(alpha=0.3)
    n = summary["eval_problems"]

    def err(rs):  # the accuracies' 95% Wilson intervals as error bars
        ci = [accuracy_interval(r["accuracy"], n) for r in rs]
        return [[r["accuracy"] - lo for r, (lo, _) in zip(rs, ci)], [hi - r["accuracy"] for r, (_, hi) in zip(rs, ci)]]

    on_axis = [(r["x"], r) for r in arms.values() if r.get("x") is not None]
    if exp.axis and on_axis:  # accuracy and gradient variance against K
        xs = [x for x, _ in on_axis]
        ax_b.errorbar(xs, [r["accuracy"] for _, r in on_axis], yerr=err([r for _, r in on_axis]), marker="o",
                      capsize=3, label="top-K accuracy")
        # arms off the axis (nucleus supports) at their mean support size, when they logged one
        off = [(name, r) for name, r in arms.items() if r.get("x") is None and r.get("support_size")]
        if off:
            ax_b.errorbar([r["support_size"] for _, r in off], [r["accuracy"] for _, r in off],
                          yerr=err([r for _, r in off]), fmt="D", color="tab:green", capsize=3,
                          label="nucleus, at its mean size")
            for name, r in off:  # (left of the point: the largest sizes sit at the right edge)
                ax_b.annotate(name, (r["support_size"], r["accuracy"]), fontsize=7, xytext=(-4, -12),
                              textcoords="offset points", ha="right")
        ax_b.set_xscale("log", base=2)
        ax_b.set_xlabel(f"{exp.axis} (ids in the support)")
        ax_b.set_ylabel("held-out accuracy (95% CI)")
        var = [(x, r["grad_variance"]) for x, r in on_axis if (r.get("grad_variance") or 0) > 0]
        if var:  # (K = 1 has none: a KL over one token is 0)
            tw = ax_b.twinx()
            tw.plot([x for x, _ in var], [v for _, v in var], color="tab:red", marker="s", ls="--",
                    label="grad variance")
            off_var = [(r["support_size"], r["grad_variance"]) for _, r in off if (r.get("grad_variance") or 0) > 0]
            if off_var:  # the nucleus arms' variance, at their mean size
                tw.plot([x for x, _ in off_var], [v for _, v in off_var], color="tab:red", marker="D", ls="none",
                        mfc="none")
            tw.set_yscale("log")
            tw.set_ylabel("batch gradient variance (red; ◇ nucleus)", color="tab:red")
        ax_b.set_title(f"against {exp.axis}")
    elif exp.name == "reward_imbalance" or not exp.probe:  # training metrics over steps
        for name, r in arms.items():
            for key, ls in (("negative_reward_frac", "-"), ("truncation_rate", ":")):
                curve = r.get(f"{key}_curve")
                if curve:
                    ax_b.plot([s for s, _ in curve], [v for _, v in curve], ls=ls, label=f"{name}: {key}")
        ax_b.set_xlabel("training step")
        ax_b.set_ylabel("fraction")
        ax_b.set_ylim(0, 1)
        ax_b.set_title("negative rewards (solid) and truncated responses (dotted)")
    else:  # accuracy and gradient variance per arm
        names = list(arms)
        ax_b.bar(range(len(names)), [arms[n]["accuracy"] for n in names], yerr=err([arms[n] for n in names]),
                 capsize=3, color="tab:blue", alpha=0.7)
        ax_b.set_xticks(range(len(names)))
        ax_b.set_xticklabels(names, rotation=20, fontsize=7, ha="right")
        ax_b.set_ylabel("held-out accuracy (95% CI)")
        var = [(i, arms[n]["grad_variance"]) for i, n in enumerate(names) if (arms[n].get("grad_variance") or 0) > 0]
        if var:  # one marker per arm: the arms are categories, not points on a line
            tw = ax_b.twinx()
            tw.plot([i for i, _ in var], [v for _, v in var], color="tab:red", marker="s", ls="none")
            tw.set_yscale("log")
            tw.set_ylabel("batch gradient variance", color="tab:red")
        ax_b.set_title("accuracy (bars) and gradient variance (red squares)")
    ax_b.legend(fontsize=7) if ax_b.get_legend_handles_labels()[0] else None
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
