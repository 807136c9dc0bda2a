"""Diagnostics report of a training run: the paper's three failure modes over time, from ``metrics.jsonl``.

Input: ``RUN_DIR/metrics.jsonl``, one JSON object per line, one line per step, with the keys the trainer
writes (``METRIC_KEYS``); any key may be missing or null on a line, extra keys are ignored, blank lines
are skipped. A line that is not a JSON object, a ``step`` that is not an integer, or a metric that is not
a number is an error naming the file and the line.

Output (in ``out_dir``, default ``RUN_DIR``):

- ``failure_modes.png``: (1) reward imbalance: fraction of negative sampled-token rewards and their
  skew; (2) teacher confidence on the student's prefixes: teacher vs student probability mass on the
  support, and k1; (3) positions the objective cannot explain: masked special tokens, sampled tokens
  outside the support, and the student's mass its rollouts never sample.
- ``training.png``: loss, entropy, grad norm, response length, truncation rate, throughput.
- ``run_report.md``: first / last / min / max (with steps) of every metric, and plain-words flags
  (thresholds in ``FLAG_THRESHOLDS``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opdkit.data.jsonl import DataError, read_jsonl
from opdkit.errors import OpdkitError

__all__ = [
    "FAILURE_MODES",
    "FLAG_THRESHOLDS",
    "METRIC_KEYS",
    "MetricsError",
    "RunMetrics",
    "add_run_report_arguments",
    "flags",
    "load_metrics",
    "main_run_report",
    "run_report",
    "run_report_from_args",
    "summarize",
]

METRIC_KEYS: tuple[str, ...] = (
    "loss",
    "negative_reward_frac",
    "reward_skew",
    "k1",
    "teacher_support_mass",
    "student_support_mass",
    "sampled_outside_support_frac",
    "special_masked_frac",
    "rollout_tail_mass",
    "entropy",
    "grad_norm",
    "response_length",
    "truncation_rate",
    "tokens_per_s",
)

FAILURE_MODES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("1. reward imbalance", ("negative_reward_frac", "reward_skew")),
    ("2. teacher confidence on student prefixes", ("teacher_support_mass", "student_support_mass", "k1")),
    ("3. special-token and out-of-support positions", ("special_masked_frac", "sampled_outside_support_frac",
                                                        "rollout_tail_mass")),
)

FLAG_THRESHOLDS = {
    "negative_reward_majority": 0.5,  # mean negative_reward_frac above this
    "reward_skew": 1.0,  # |mean reward_skew| above this
    "support_mass_gap": 0.1,  # teacher minus student mass on the support, at the end
    "teacher_mass_low": 0.5,  # teacher mass on its own support below this, at the end
    "relative_change": 0.5,  # a fall/rise by this fraction of the start (entropy, teacher mass, k1)
    "outside_support": 0.2,  # sampled_outside_support_frac above this, at the end
    "special_masked": 0.05,  # special_masked_frac above this, at the end
    "grad_spike": 10.0,  # max grad norm over the median
    "truncation": 0.1,  # truncation_rate above this, at the end
    "tail_mass": 0.5,  # rollout_tail_mass above this, at the end
}
# Start and end values are means over this fraction of the steps (at least one step), so that one noisy
# step does not decide a flag.
WINDOW_FRACTION = 0.1


class MetricsError(OpdkitError, ValueError):
    """``metrics.jsonl`` is missing or malformed; the message names the file (and the line)."""


@dataclass(frozen=True)
class RunMetrics:
    """``steps[i]`` and, per metric, ``values[key][i]`` (None where the line did not log it)."""

    path: Path
    steps: list[int]
    values: dict[str, list[float | None]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps at which ``key`` was logged as a finite number, and those values."""
        pairs = [(s, v) for s, v in zip(self.steps, self.values.get(key, [])) if v is not None and math.isfinite(v)]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def non_finite(self, key: str) -> list[int]:
        return [s for s, v in zip(self.steps, self.values.get(key, [])) if v is not None and not math.isfinite(v)]


def _metrics_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.suffix == ".jsonl" or p.is_file() else p / "metrics.jsonl"


def load_metrics(path: str | Path) -> RunMetrics:
    """Read ``metrics.jsonl`` (or ``RUN_DIR/metrics.jsonl``); errors name the file and the line.

    A line without ``step`` (or with null) gets the previous step + 1 (0 for the first line).
    """
    path = _metrics_path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: no such file (expected the run's metrics.jsonl)")
    steps: list[int] = []
    values: dict[str, list[float | None]] = {k: [] for k in METRIC_KEYS}
    try:
        for lineno, obj in read_jsonl(path, what="metrics file"):
            where = f"{path} line {lineno}"
            step = obj.get("step")
            if step is None:
                step = steps[-1] + 1 if steps else 0
            elif isinstance(step, bool) or not isinstance(step, int):
                if isinstance(step, float) and step.is_integer():
                    step = int(step)
                else:
                    raise MetricsError(f"{where}: 'step' must be an integer, got {step!r}")
            steps.append(step)
            for key in METRIC_KEYS:
                v = obj.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise MetricsError(f"{where}: {key!r} must be a number or null, got {v!r}")
                values[key].append(None if v is None else float(v))
    except DataError as exc:
        raise MetricsError(str(exc)) from None
    if not steps:
        raise MetricsError(f"{path}: no metrics lines")
    return RunMetrics(path, steps, values)


# --------------------------------------------------------------------------------------------- summary
def _window(vals: list[float], end: bool) -> float:
    n = max(1, int(len(vals) * WINDOW_FRACTION))
    part = vals[-n:] if end else vals[:n]
    return sum(part) / len(part)


def summarize(m: RunMetrics) -> dict[str, dict]:
    """Per logged metric: ``n``, ``first``, ``last``, ``min``/``argmin`` step, ``max``/``argmax`` step,
    ``mean``, ``median``, ``start``/``end`` (window means), ``non_finite`` (steps with NaN/inf)."""
    out: dict[str, dict] = {}
    for key in METRIC_KEYS:
        steps, vals = m.series(key)
        bad = m.non_finite(key)
        if not vals:
            if bad:
                out[key] = {"n": 0, "non_finite": bad}
            continue
        i_min = min(range(len(vals)), key=vals.__getitem__)
        i_max = max(range(len(vals)), key=vals.__getitem__)
        out[key] = {
            "n": len(vals),
            "first": vals[0],
            "last": vals[-1],
            "min": vals[i_min],
            "argmin": steps[i_min],
            "max": vals[i_max],
            "argmax": steps[i_max],
            "mean": sum(vals) / len(vals),
            "median": sorted(vals)[len(vals) // 2],
            "start": _window(vals, end=False),
            "end": _window(vals, end=True),
            "non_finite": bad,
        }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def flags(summary: dict[str, dict]) -> list[str]:
    """Plain-words warnings about the run, from ``summarize``'s output."""
    th = FLAG_THRESHOLDS
    out: list[str] = []

    def has(k: str) -> bool:
        return k in summary and summary[k].get("n", 0) > 0

    for key, s in summary.items():
        if s.get("non_finite"):
            steps = s["non_finite"]
            out.append(f"{key} was NaN or infinite at {len(steps)} step(s) (first at step {steps[0]})")
    if has("negative_reward_frac"):
        s = summary["negative_reward_frac"]
        if s["mean"] > th["negative_reward_majority"]:
            out.append(
                f"negative rewards are the majority ({_pct(s['mean'])} of sampled tokens on average, "
                f"{_pct(s['last'])} at the last step): the sampled-token signal mostly pushes down"
            )
    if has("reward_skew") and abs(summary["reward_skew"]["mean"]) > th["reward_skew"]:
        skew = summary["reward_skew"]["mean"]
        side = "negative" if skew < 0 else "positive"
        out.append(
            f"rewards are strongly skewed to the {side} side (mean skew {skew:.2f}): a few extreme tokens dominate"
        )
    if has("teacher_support_mass"):
        t = summary["teacher_support_mass"]
        if t["end"] < th["teacher_mass_low"]:
            out.append(
                f"the teacher is unsure on the student's prefixes: only {_pct(t['end'])} of its mass on the support"
            )
        if t["start"] > 0 and t["end"] < (1 - th["relative_change"]) * t["start"]:
            out.append(
                f"teacher mass on the support fell by {_pct(1 - t['end'] / t['start'])}: prefixes drift off-teacher"
            )
        if has("student_support_mass"):
            gap = t["end"] - summary["student_support_mass"]["end"]
            if gap > th["support_mass_gap"]:
                out.append(
                    f"the student puts {_pct(gap)} less mass on the support than the teacher "
                    f"({_pct(summary['student_support_mass']['end'])} vs {_pct(t['end'])})"
                )
    if has("k1"):
        k = summary["k1"]
        if k["start"] > 0 and k["end"] > (1 + th["relative_change"]) * k["start"]:
            out.append(f"k1 rose from {k['start']:.3g} to {k['end']:.3g}: the student moves away from the teacher")
    if has("sampled_outside_support_frac") and summary["sampled_outside_support_frac"]["end"] > th["outside_support"]:
        out.append(
            f"{_pct(summary['sampled_outside_support_frac']['end'])} of sampled tokens fall outside the support "
            "(the support KL gives them no signal)"
        )
    if has("rollout_tail_mass") and summary["rollout_tail_mass"]["end"] > th["tail_mass"]:
        out.append(
            f"the student puts {_pct(summary['rollout_tail_mass']['end'])} of its probability where its rollouts "
            "never sample (outside the top-p / top-k cut, or on the blocked pad token): it hides its mass where "
            "no reward reaches, a collapse no loss term sees"
        )
    if has("special_masked_frac") and summary["special_masked_frac"]["end"] > th["special_masked"]:
        out.append(f"{_pct(summary['special_masked_frac']['end'])} of response positions are masked special tokens")
    if has("entropy"):
        e = summary["entropy"]
        if e["start"] > 0 and e["end"] < (1 - th["relative_change"]) * e["start"]:
            out.append(f"entropy fell by {_pct(1 - e['end'] / e['start'])}: possible collapse")
        elif e["start"] > 0 and e["end"] > (1 + th["relative_change"]) * e["start"]:
            out.append(f"entropy rose by {_pct(e['end'] / e['start'] - 1)}: the student may be degenerating into noise")
    if has("grad_norm"):
        g = summary["grad_norm"]
        if g["median"] > 0 and g["max"] > th["grad_spike"] * g["median"]:
            out.append(
                f"grad-norm spikes: {g['max']:.3g} at step {g['argmax']} is "
                f"{g['max'] / g['median']:.0f}x the median {g['median']:.3g}"
            )
    if has("truncation_rate") and summary["truncation_rate"]["end"] > th["truncation"]:
        out.append(f"{_pct(summary['truncation_rate']['end'])} of responses hit the length limit at the end")
    return out


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _markdown(m: RunMetrics, summary: dict[str, dict], warn: list[str], figures: list[str]) -> str:
    lines = [
        "# Run diagnostics",
        "",
        f"Source: `{m.path}` ({len(m.steps)} lines, steps {min(m.steps)}–{max(m.steps)}).",
        "",
        "## Flags",
        "",
    ]
    lines += [f"- {w}" for w in warn] if warn else ["- none: no metric crossed a threshold"]
    lines += [
        "",
        "## Metrics",
        "",
        "| metric | n | first | last | min (step) | max (step) |",
        "|---|---|---|---|---|---|",
    ]
    for key in METRIC_KEYS:
        s = summary.get(key)
        if s is None or not s.get("n"):
            lines.append(f"| {key} | 0 | not logged | | | |")
            continue
        lines.append(
            f"| {key} | {s['n']} | {_fmt(s['first'])} | {_fmt(s['last'])} | {_fmt(s['min'])} ({s['argmin']}) | "
            f"{_fmt(s['max'])} ({s['argmax']}) |"
        )
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _plot(m: RunMetrics, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (title, keys) in zip(axes, FAILURE_MODES):
        twin = None
        for i, key in enumerate(keys):
            steps, vals = m.series(key)
            if key in ("reward_skew", "k1"):
                twin = twin or ax.twinx()
                target, style = twin, "--"
            else:
                target, style = ax, "-"
            if vals:
                target.plot(steps, vals, style, color=f"C{i}", label=key, marker="." if len(vals) < 30 else None)
            else:
                target.plot([], [], style, color=f"C{i}", label=f"{key} (not logged)")
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
            twin.set_ylabel("dashed: " + ", ".join(k for k in keys if k in ("reward_skew", "k1")))
        ax.legend(handles, labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction / mass")
    fig.tight_layout()
    fig.savefig(out_dir / "failure_modes.png", dpi=100)
    plt.close(fig)
    written.append("failure_modes.png")

    keys = ("loss", "entropy", "grad_norm", "response_length", "truncation_rate", "tokens_per_s")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, key in zip(axes.flat, keys):
        steps, vals = m.series(key)
        if vals:
            ax.plot(steps, vals, marker="." if len(vals) < 30 else None)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "training.png", dpi=100)
    plt.close(fig)
    written.append("training.png")
    return written


def run_report(run_dir: str | Path, out_dir: str | Path | None = None, *, plots: bool = True) -> Path:
    """Write ``run_report.md`` (and ``failure_modes.png``, ``training.png``); return the report's path.

    ``run_dir`` is the run directory (holding ``metrics.jsonl``) or the metrics file itself.
    """
    from opdkit.paths import check_output_dir

    if out_dir is not None:
        check_output_dir(out_dir, "--out")
    m = load_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else m.path.parent
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(m)
    figures = _plot(m, out) if plots else []
    report = out / "run_report.md"
    report.write_text(_markdown(m, summary, flags(summary), figures), encoding="utf-8")
    return report


def add_run_report_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``opdkit analyze run``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory with metrics.jsonl (or the file)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR)")
    p.add_argument("--no-plots", action="store_true", help="write only run_report.md")


def run_report_from_args(args: argparse.Namespace) -> int:
    path = run_report(args.run_dir, args.out, plots=not args.no_plots)
    print(path.read_text(encoding="utf-8"), end="")
    print(f"wrote {path}")
    return 0


def main_run_report(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdkit analyze run", description=__doc__.splitlines()[0])
    add_run_report_arguments(p)
    return run_report_from_args(p.parse_args(argv))
