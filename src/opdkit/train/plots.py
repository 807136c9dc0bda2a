"""``opdkit plot RUN_DIR``: PNG curves of a run's metrics (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from opdkit.errors import OpdkitError

__all__ = ["plot_run", "PANELS"]

# One figure per group; a metric that a run never logged is left out.
PANELS = {
    "loss.png": ("Loss and gradient", ["loss", "grad_norm"]),
    "diagnostics.png": (
        "Diagnostics",
        [
            "negative_reward_frac",
            "k1",
            "teacher_support_mass",
            "student_support_mass",
            "sampled_outside_support_frac",
            "special_masked_frac",
            "entropy",
        ],
    ),
    "rollout.png": ("Rollouts", ["response_length", "truncation_rate", "tokens_per_s"]),
    "accuracy.png": ("Accuracy", ["eval_accuracy", "accuracy"]),
}


_FRACTIONS = ("accuracy", "_rate", "_frac", "_mass")  # metrics that live in [0, 1]


def _read(path: Path) -> list[dict]:
    from opdkit.data.jsonl import DataError, read_jsonl

    if not path.exists():
        raise OpdkitError(f"'{path}': no such file (is this a run directory?)")
    try:  # a live run may have a half-written last line: skipped; so are lines without a step
        rows = [row for _, row in read_jsonl(path, what="metrics file", skip_bad_lines=True)]
    except DataError as exc:
        raise OpdkitError(str(exc)) from None
    return [r for r in rows if isinstance(r.get("step"), (int, float)) and not isinstance(r.get("step"), bool)]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel with data under ``out_dir`` (default ``RUN_DIR/plots``); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from opdkit.paths import check_output_dir

    run = Path(run_dir)
    if run.is_file() and run.suffix == ".jsonl":  # the metrics file itself
        run = run.parent
    if not run.is_dir():
        raise OpdkitError(f"RUN_DIR '{run_dir}': no such run directory")
    out = Path(out_dir) if out_dir is not None else run / "plots"
    check_output_dir(out, "--out")
    rows = _read(run / "metrics.jsonl")
    if not any(isinstance(v, (int, float)) for r in rows for k, v in r.items() if k != "step"):
        raise OpdkitError(f"'{run / 'metrics.jsonl'}': no metrics to plot yet (the run has logged no step)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OpdkitError(f"--out '{out}': cannot be created ({exc.strerror or exc})") from None
    written = []
    per_benchmark = sorted({k for r in rows for k in r if k.startswith("eval_") and k.endswith("_accuracy")
                            and k != "eval_accuracy"})
    for filename, (title, keys) in PANELS.items():
        if filename == "accuracy.png":
            keys = keys + per_benchmark
        series = {}
        for key in keys:
            pts = [
                (r["step"], r[key])
                for r in rows
                if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
            ]
            if pts:
                series[key] = pts
        if not series:
            continue
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.2 * len(series)), sharex=True, squeeze=False)
        for ax, (key, pts) in zip(axes[:, 0], series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
            ax.set_ylabel(key, fontsize=8)
            if key.endswith(_FRACTIONS):  # a flat 5% line should not fill the panel with 0.048-0.052
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{title} — {run.name}")
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
