"""The run directory: what it holds, and the rules for starting, resuming and overwriting it.

``RUN_DIR/.opdkit-run`` (the marker: this directory was created by opdkit as a run), ``config.yaml`` (the
resolved config), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``final/`` (the student exported with
``save_pretrained``), ``plots/`` and whatever the demo or the analyses add.

Rules, so that nothing a user made is ever deleted:

- a new run needs a directory that does not exist or is empty; it is created, with its marker and
  ``config.yaml``, only once the whole start-up (config, data, models, compatibility) has succeeded, so a
  failed start leaves nothing behind;
- ``run.overwrite=true`` reuses a directory only if it carries the marker, and then removes only the
  files opdkit wrote into the run (:func:`remove_run_files`): its top-level files, checkpoint directories,
  TensorBoard event files, the plots it drew and the exported model's files (listed by the export); any
  other file, at any depth, stays where it is;
- a non-empty directory without the marker is refused, whatever ``run.overwrite`` says, and so is
  ``--resume`` of a directory without the marker.
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
    "EXPORT_MANIFEST",
    "remove_run_files",
    "resume_config",
    "write_run_config",
]

CONFIG_FILE = "config.yaml"
MARKER_FILE = ".opdkit-run"
#: Files opdkit writes at the top of a run directory (the trainer, `opdkit analyze run`, the demo).
RUN_ENTRIES = (
    MARKER_FILE, CONFIG_FILE, "config.yaml.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "run_report.md",
    "training.png", "failure_modes.png", "demo_summary.json", "compare.md", "compare.png",
)
#: The manifest the export writes into ``final/``: the files it wrote (run.overwrite removes those only).
EXPORT_MANIFEST = ".opdkit-export.json"


#: What ``opdkit train --resume DIR a.b=value`` may change: where things are, how long the run is, and
#: bookkeeping that does not change the math of the steps already taken.
RESUME_OVERRIDES = (
    "model.path", "teacher.path", "data.train_path", "data.eval_path", "model.chat_template", "optim.total_steps",
    "run.save_every", "run.keep_last", "run.log_every", "run.tensorboard", "run.device", "teacher.chunk_size",
    "model.logits_chunk_size", "eval.*", "teacher.url", "teacher.token_file", "teacher.timeout_s", "teacher.retries",
    "teacher.tokenizer_path",
)
# (A moved model, teacher, prompt file or chat template is checked to be the same on resume: digests; a
# remote teacher reports its model directory's digest, so a run may move between teacher.path and teacher.url.)


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


def remove_run_files(path: Path) -> None:
    """Remove what opdkit wrote into the run ``path`` and nothing else (empty folders it made go too)."""
    import json
    import re

    from opdkit.train.plots import PANELS

    for name in RUN_ENTRIES:
        if (path / name).is_file() or (path / name).is_symlink():
            (path / name).unlink()
    owned = {
        "checkpoints": lambda c: c.is_dir() and re.match(r"^(step-\d{6,}|\.tmp-.*|\.abandoned-.*)$", c.name),
        "tensorboard": lambda c: c.is_file() and c.name.startswith("events.out.tfevents."),
        "plots": lambda c: c.is_file() and c.name in PANELS,
        ".final-tmp": lambda c: True,
    }
    final = path / "final"
    if (final / EXPORT_MANIFEST).is_file():
        try:
            listed = set(json.loads((final / EXPORT_MANIFEST).read_text())) | {EXPORT_MANIFEST}
        except (OSError, ValueError):
            listed = {EXPORT_MANIFEST}
        owned["final"] = lambda c: c.name in listed
    for sub, mine in owned.items():
        folder = path / sub
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if mine(child):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, what: str = "run.out_dir") -> Path:
    """Refuse, before anything is built or written, a run directory that cannot be used as asked."""
    path = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: pick one")
    if resume:
        if not path.exists():
            raise RunDirError(f"--resume '{path}': no such run directory")
        if not path.is_dir():
            raise RunDirError(f"--resume '{path}': not a directory (give the run's directory)")
        if not is_run_dir(path) or not (path / CONFIG_FILE).exists():
            raise RunDirError(f"--resume '{path}': not a run directory opdkit created (no {MARKER_FILE} and "
                              f"{CONFIG_FILE}); opdkit resumes only its own runs")
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
        remove_run_files(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"run.out_dir '{path}': cannot be created ({exc.strerror or exc})") from None
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
    for key in ("run.out_dir", "run.overwrite"):
        if key in changed:
            raise RunDirError(f"--resume {path}: {key} does not apply to a resumed run (it stays in {path})")
    refused = [k for k in changed if k not in RESUME_OVERRIDES and not k.startswith("eval.")]
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
