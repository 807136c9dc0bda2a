"""The run directory: what it holds, and the rules for starting, resuming and overwriting it.

``RUN_DIR/.opdkit-run`` (the marker: this directory was created by opdkit as a run), ``config.yaml`` (the
resolved config), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``final/`` (the student exported with
``save_pretrained``), ``plots/`` and whatever the demo or the analyses add.

Rules, so that nothing a user made is ever deleted:

- a new run needs a directory that does not exist or is empty; it is created, with its marker and
  ``config.yaml``, only once the whole start-up (config, data, models, compatibility) has succeeded, so a
  failed start leaves nothing behind;
- ``run.overwrite=true`` reuses a directory only if it carries the marker, and then removes only the
  entries opdkit writes into a run (listed in :data:`RUN_ENTRIES`); any other file stays where it is;
- a non-empty directory without the marker is refused, whatever ``run.overwrite`` says.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from opdkit.config import Config, load_config, save_config
from opdkit.errors import OpdkitError
from opdkit.paths import check_output_dir

__all__ = [
    "CONFIG_FILE",
    "MARKER_FILE",
    "RUN_ENTRIES",
    "RunDirError",
    "check_output_dir",
    "check_run_dir",
    "create_run_dir",
    "is_run_dir",
    "new_run_dir",
    "prepare_run_dir",
    "RESUME_OVERRIDES",
    "resume_config",
    "write_run_config",
]

CONFIG_FILE = "config.yaml"
MARKER_FILE = ".opdkit-run"
#: What opdkit writes into a run directory; run.overwrite=true removes these and nothing else.
RUN_ENTRIES = (
    MARKER_FILE, CONFIG_FILE, "metrics.jsonl", "metrics.jsonl.tmp", "tensorboard", "checkpoints", "final",
    ".final-tmp", "plots", "run_report.md", "demo_summary.json", "compare.md", "compare.png",
)


#: What ``opdkit train --resume DIR a.b=value`` may change: where things are, how long the run is, and
#: bookkeeping that does not change the math of the steps already taken.
RESUME_OVERRIDES = (
    "model.path", "teacher.path", "data.train_path", "data.eval_path", "optim.total_steps", "run.save_every",
    "run.keep_last", "run.log_every", "run.tensorboard", "run.device", "teacher.chunk_size",
    "model.logits_chunk_size", "eval.every_steps", "eval.batch_size",
)


class RunDirError(OpdkitError, ValueError):
    """The run directory cannot be used as asked (holds another run, or has nothing to resume)."""


def new_run_dir(root: str | Path = "runs", prefix: str = "run") -> Path:
    """A fresh directory name under ``root``: ``runs/run-20261125-153012`` (suffixed if taken)."""
    base = Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def is_run_dir(path: str | Path) -> bool:
    """Whether opdkit created ``path`` as a run (it carries the marker)."""
    return (Path(path) / MARKER_FILE).is_file()


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, what: str = "run.out_dir") -> Path:
    """Refuse, before anything is built or written, a run directory that cannot be used as asked."""
    path = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: pick one")
    if resume:
        if not path.is_dir():
            raise RunDirError(f"--resume '{path}': no such run directory")
        if not (path / CONFIG_FILE).exists():
            raise RunDirError(f"--resume '{path}': nothing to resume (no {CONFIG_FILE}: not an opdkit run directory)")
        return path
    check_output_dir(path, what)
    if not path.exists() or not any(path.iterdir()):
        return path
    if not is_run_dir(path):
        raise RunDirError(
            f"{what} '{path}': the directory is not empty and was not created by opdkit as a run (no "
            f"{MARKER_FILE}); opdkit will not write into it or delete anything in it: choose a new or empty directory"
        )
    if not overwrite:
        raise RunDirError(
            f"{what} '{path}' already holds a run; continue it with `opdkit train --resume {path}`, or start "
            "again in it with run.overwrite=true (removes that run's files only)"
        )
    return path


def create_run_dir(cfg: Config, run_dir: str | Path, *, overwrite: bool) -> Path:
    """Make the directory of a new run (a marked run's own entries removed first when ``overwrite``), write
    its marker and ``config.yaml``. Called once everything the run needs has loaded, by one process."""
    path = check_run_dir(run_dir, resume=False, overwrite=overwrite)
    if path.exists() and is_run_dir(path):
        for name in RUN_ENTRIES:
            entry = path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).write_text("created by opdkit as a run directory; run.overwrite=true may remove its "
                                    "run files\n")
    save_config(cfg, path / CONFIG_FILE)
    return path


def prepare_run_dir(cfg: Config, run_dir: str | Path, *, resume: bool, overwrite: bool) -> tuple[Path, Config]:
    """Create, resume or overwrite ``run_dir``; returns the directory and the config to run with.

    On resume the run's own ``config.yaml`` is authoritative (the given ``cfg`` is ignored).
    """
    path = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        return path, load_config(path / CONFIG_FILE)
    return create_run_dir(cfg, path, overwrite=overwrite), cfg


def resume_config(run_dir: str | Path, overrides) -> Config:
    """The run's own config with the allowed resume ``overrides`` applied (``a.b=value`` strings).

    Anything else would change the math of the steps already taken (or of the schedule): refused, named.
    """
    from opdkit.config import apply_overrides, config_to_dict

    path = check_run_dir(run_dir, resume=True, overwrite=False)
    cfg = load_config(path / CONFIG_FILE)
    if not overrides:
        return cfg
    new = apply_overrides(cfg, overrides)
    old_d, new_d = config_to_dict(cfg), config_to_dict(new)
    changed = [f"{s}.{k}" for s, fields in new_d.items() for k, v in fields.items() if old_d[s][k] != v]
    refused = [k for k in changed if k not in RESUME_OVERRIDES]
    if refused:
        raise RunDirError(
            f"--resume {path}: {', '.join(refused)} cannot change when a run is resumed (it would change the math "
            f"of the steps already taken); resume may change only {', '.join(RESUME_OVERRIDES)}"
        )
    if "optim.total_steps" in changed and new.optim.schedule == "cosine":
        raise RunDirError(
            f"--resume {path}: optim.total_steps cannot change with optim.schedule=cosine: the cosine schedule's "
            "length is the run's length (the learning rate of the remaining steps would jump)"
        )
    return new


def write_run_config(cfg: Config, run_dir: str | Path) -> None:
    """Replace the run's ``config.yaml`` atomically (after a resume changed allowed fields)."""
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_name(CONFIG_FILE + ".tmp")
    save_config(cfg, tmp)
    os.replace(tmp, path)
