"""Run metrics: the registry of every name a run logs, their reduction over processes, and the sinks.

Every metric of ``metrics.jsonl`` is declared once in :data:`METRICS` with its meaning and how it is
reduced over processes, so a 2-process log reads like a 1-process one:

- ``mean``: a mean over items (tokens, sequences, mini-batches) that each process holds part of; each
  process contributes its sum and its count, and the logged value is ``Σ sums / Σ counts`` — exactly the
  1-process value.
- ``max``: the largest value over processes (wall-clock times: the step waits for the slowest).
- ``global``: already the same on every process (the gradient norm after averaging, the step number).

Evaluation metrics (``eval_*``) come reduced from the evaluator. ``opdkit analyze run`` and ``opdkit plot``
read these names.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "PER_TASK", "MetricSpec", "MetricsLogger", "StepMetrics", "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class MetricSpec:
    doc: str
    reduce: str  # "mean" | "max" | "global"


def _m(doc: str, reduce: str = "mean") -> MetricSpec:
    return MetricSpec(doc, reduce)


METRICS: dict[str, MetricSpec] = {
    # bookkeeping
    "step": _m("training step (one rollout batch), 1-based", "global"),
    "skipped": _m("1 if the step changed no weight (non-finite teacher signal or gradient)", "global"),
    "skip_reason": _m("why the step was skipped: teacher_nan or nonfinite_grad", "global"),
    "skipped_steps": _m("skipped steps so far in the run", "global"),
    "lr": _m("learning rate after the step", "global"),
    # the update
    "loss": _m("the objective, mean over the step's optimizer steps (mini-batches)"),
    "grad_norm": _m("gradient norm before clipping, mean over the step's optimizer steps", "global"),
    # METHOD.md's diagnostics, means over loss-mask tokens unless said otherwise
    "negative_reward_frac": _m("fraction of sampled tokens whose reward log q - log pi_old is negative"),
    "reward_skew": _m("skewness of the sampled-token rewards (from moments summed over processes)"),
    "k1": _m("mean log pi_old - log q on the sampled token: a reverse-KL estimate"),
    "teacher_support_mass": _m("teacher probability mass on the support set"),
    "support_size": _m("objective.support=teacher_topp: mean number of ids in a position's nucleus support"),
    "support_size_capped_frac": _m("objective.support=teacher_topp: fraction of positions whose nucleus hit "
                                   "objective.top_k (K_max) before reaching objective.support_top_p"),
    "rollout_tail_mass": _m("mean over the sampled tokens of the student's mass outside the set it sampled from "
                            "(1 - Z_t: the top-p / top-k cut and the blocked pad token), what the rollouts never see; "
                            "near 1 the student hides its probability where no reward reaches"),
    "topp_weight": _m("objective.topp_correction: mean importance weight (token Z_t, or the sequence's "
                      "min(prod Z_t, clip)) that multiplies the loss (with Adam an even scale barely changes the step; "
                      "uneven weights re-weight the tokens or sequences)"),
    "student_support_mass": _m(
        "student (pi_old) probability mass on the support set, over the responses of the step's first mini-batch"
    ),
    "sampled_outside_support_frac": _m("fraction of sampled tokens outside the support set"),
    "entropy": _m("student entropy (nats) at response tokens"),
    # the rollout
    "response_length": _m("response tokens per sequence"),
    "truncation_rate": _m("fraction of responses that hit rollout.max_new_tokens"),
    "special_masked_frac": _m("fraction of response tokens removed from the loss by special-token masking"),
    "prompt_truncated_frac": _m("fraction of responses whose prompt was cut to data.max_prompt_tokens (on the left)"),
    "rollouts": _m("responses sampled in the step (all processes)", "global"),
    # multi-turn episodes (environment tasks)
    "episode_success": _m("fraction of the step's episodes won"),
    "episode_turns": _m("actions per episode"),
    "env_failure_rate": _m("fraction of episodes ended by an environment that raised or overran env.step_timeout_s"),
    # multi-task runs: the step's task; the metrics of PER_TASK are also logged as NAME@TASK
    "task": _m("the task this step's batch came from (multi-task runs)", "global"),
    "tokens_per_s": _m("response tokens of the step (all processes) per second of the step", "global"),
    # time, seconds (slowest process)
    "time_rollout_s": _m("seconds sampling the rollout", "max"),
    "time_student_s": _m("seconds in the no-grad student pass (pi_old)", "max"),
    "time_teacher_s": _m("seconds in teacher scoring", "max"),
    "time_update_s": _m("seconds in the forward/backward passes and optimizer steps", "max"),
    "time_eval_s": _m("seconds evaluating", "max"),
    "time_step_s": _m("seconds for the whole step", "max"),
    # evaluation (reduced by the evaluator)
    "eval_accuracy": _m("avg@n on data.eval_path: mean correctness over problems x eval.n_samples (several "
                        "benchmarks: the mean of their avg@n)", "global"),
    "eval_response_length": _m("mean response tokens of the evaluation answers", "global"),
    "eval_truncation_rate": _m("fraction of evaluation answers that hit eval.max_new_tokens", "global"),
    "eval_no_answer_rate": _m("fraction of evaluation answers with no final answer (no \\boxed{})", "global"),
    # with several benchmarks in data.eval_path, also eval_<name>_accuracy for each; every eval_* above is then
    # the mean of the benchmarks' values (each counts once). eval.at_start logs a step-0 row of eval_* only.
}


#: Metrics a multi-task run also logs as ``NAME@TASK`` (the step's task), one curve per task.
PER_TASK = ("loss", "k1", "negative_reward_frac", "teacher_support_mass", "entropy", "response_length",
            "episode_success", "episode_turns")


class StepMetrics:
    """Collects one step's metrics on one process; :meth:`reduce` combines them over processes.

    ``mean(name, total, count)`` adds a local sum and count; ``max(name, value)``, ``set(name, value)``
    (a ``global`` value) and ``moments(name, n, s1, s2, s3)`` (for a skewness) complete it.
    """

    def __init__(self):
        self._sums: dict[str, list[float]] = {}
        self._max: dict[str, float] = {}
        self._global: dict[str, Any] = {}
        self._moments: dict[str, list[float]] = {}
        self.notes: list[str] = []  # this process's words for an error message (never reduced)

    def _known(self, name: str) -> None:
        if name not in METRICS:
            raise KeyError(f"metric {name!r} is not declared in opdkit.train.metrics.METRICS")

    def mean(self, name: str, total: float, count: float) -> None:
        self._known(name)
        acc = self._sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(total)
        acc[1] += float(count)

    def max(self, name: str, value: float) -> None:
        self._known(name)
        self._max[name] = max(self._max.get(name, -math.inf), float(value))

    def set(self, name: str, value: Any) -> None:
        if not name.startswith("eval_"):
            self._known(name)
        self._global[name] = value

    def moments(self, name: str, n: float, s1: float, s2: float, s3: float) -> None:
        self._known(name)
        acc = self._moments.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((n, s1, s2, s3)):
            acc[i] += float(v)

    def reduce(self, dist) -> dict[str, Any]:
        """The step's metrics over every process (collective: every process must call it)."""
        means, moments = sorted(self._sums), sorted(self._moments)
        flat = [v for k in means for v in self._sums[k]] + [v for k in moments for v in self._moments[k]]
        flat = dist.sum(flat)
        maxes = sorted(self._max)
        maxed = dist.max([self._max[k] for k in maxes])
        out: dict[str, Any] = dict(self._global)
        for i, k in enumerate(means):
            total, count = flat[2 * i], flat[2 * i + 1]
            out[k] = total / count if count > 0 else float("nan")
        base = 2 * len(means)
        for i, k in enumerate(moments):
            n, s1, s2, s3 = flat[base + 4 * i : base + 4 * i + 4]
            out[k] = _skew(n, s1, s2, s3)
        out.update(dict(zip(maxes, maxed, strict=True)))
        return out


def _skew(n: float, s1: float, s2: float, s3: float) -> float:
    if n < 2:
        return 0.0
    m1, m2, m3 = s1 / n, s2 / n, s3 / n
    var = m2 - m1 * m1
    if not var > 1e-300:
        return 0.0
    return (m3 - 3 * m1 * m2 + 2 * m1**3) / var**1.5


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so that every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (a line cut short by a kill is skipped)."""
    from opdkit.data.jsonl import read_jsonl

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [row for _, row in read_jsonl(path, what="metrics file", skip_bad_lines=True)]


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep only the lines of steps ``<= last_step`` (a resumed run rewrites what came after its checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [json.dumps(r, sort_keys=True) for r in read_metrics(run_dir) if r.get("step", math.inf) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Append one JSON object per step; mirror the numbers to TensorBoard when enabled."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, from_step: int = 1):
        """``from_step``: the first step this logger will write (a resumed run's TensorBoard events from that
        step on, written before the interruption, are discarded, as ``truncate_metrics`` does for the JSONL)."""
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # a dependency of opdkit; a broken install should say what is missing
                msg = "run.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                raise RuntimeError(msg) from exc
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                     purge_step=from_step if from_step > 1 else None)

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")
            f.flush()
        if self._tb is not None:
            step = int(row["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
