"""Metrics sinks: ``metrics.jsonl`` (one line per step) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so that every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep only the lines of steps ``<= last_step`` (a resumed run rewrites what came after its checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if row.get("step", math.inf) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Append one JSON object per step; mirror the numbers to TensorBoard when enabled."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # a dependency of opdkit; a broken install should say what is missing
                msg = "run.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                raise RuntimeError(msg) from exc
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

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
