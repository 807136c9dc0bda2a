"""The run directory: what it holds, and the rules for starting, resuming and overwriting it.

``RUN_DIR/config.yaml`` (the resolved config), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
``final/`` (the student exported with ``save_pretrained``), and whatever a caller adds (plots, a
summary). A directory that already holds a run is never reused silently: resume it or overwrite it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from opdkit.config import Config, load_config, save_config
from opdkit.errors import OpdkitError

__all__ = ["RunDirError", "CONFIG_FILE", "check_run_dir", "create_run_dir", "new_run_dir", "prepare_run_dir"]

CONFIG_FILE = "config.yaml"


class RunDirError(OpdkitError, ValueError):
    """The run directory cannot be used as asked (holds another run, or has nothing to resume)."""


def new_run_dir(root: str | Path = "runs", prefix: str = "run") -> Path:
    """A fresh directory name under ``root``: ``runs/run-20261125-153012`` (suffixed if taken)."""
    base = Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def _holds_a_run(path: Path) -> bool:
    return any((path / name).exists() for name in (CONFIG_FILE, "checkpoints", "metrics.jsonl"))


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Refuse, before anything is built or written, a run directory that cannot be used as asked."""
    path = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: pick one")
    if resume:
        if not (path / CONFIG_FILE).exists():
            raise RunDirError(f"run directory '{path}': nothing to resume (no {CONFIG_FILE})")
    elif path.exists() and _holds_a_run(path) and not overwrite:
        raise RunDirError(
            f"run directory '{path}' already holds a run; resume it (--resume {path}) or overwrite it "
            "(run.overwrite=true)"
        )
    return path


def create_run_dir(cfg: Config, run_dir: str | Path, *, overwrite: bool) -> Path:
    """Make the directory of a new run (emptied first when it holds a run and ``overwrite``) and write its
    ``config.yaml``. Called once everything the run needs has loaded, by one process."""
    path = check_run_dir(run_dir, resume=False, overwrite=overwrite)
    if path.exists() and _holds_a_run(path):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / CONFIG_FILE)
    return path


def prepare_run_dir(cfg: Config, run_dir: str | Path, *, resume: bool, overwrite: bool) -> tuple[Path, Config]:
    """Create, resume or overwrite ``run_dir``; returns the directory and the config to run with.

    On resume the run's own ``config.yaml`` is authoritative (the given ``cfg`` is ignored), so that a
    resumed run continues exactly the run that was interrupted.
    """
    path = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        return path, load_config(path / CONFIG_FILE)
    return create_run_dir(cfg, path, overwrite=overwrite), cfg
