"""Atomic checkpoints: a checkpoint directory either exists complete or does not exist at all.

Layout of ``RUN_DIR/checkpoints/step-000040/``: ``model.safetensors`` (the trainable student weights),
``state.pt`` (optimizer, scheduler and RNG states: tensors and plain Python values only, loaded with
``weights_only=True``), ``trainer_state.json`` (step, data position, counters), and ``COMPLETE``.

A checkpoint is written into a hidden temporary directory beside its final name, every file is
flushed to disk, ``COMPLETE`` is written last, and only then is the directory renamed into place
(``os.rename`` within one filesystem is atomic). A process killed at any moment leaves either the
previous checkpoints untouched or a ``.tmp-*`` directory that is never read and is removed on the
next start. Old checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
]

_NAME = re.compile(r"^step-(\d{6,})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
TRAINER_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"


class CheckpointError(OpdkitError):
    """A checkpoint is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first (temporary and incomplete directories are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / COMPLETE_FILE).exists():
            found.append(Checkpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted saves (``.tmp-*`` directories); returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-"):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Checkpoint:
    """Write checkpoint ``step`` atomically, then keep only the ``keep_last`` newest complete ones."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        save_file(tensors, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        (tmp / TRAINER_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True))
        for name in (MODEL_FILE, STATE_FILE, TRAINER_FILE):
            _fsync_file(tmp / name)
        (tmp / COMPLETE_FILE).write_text("ok\n")
        _fsync_file(tmp / COMPLETE_FILE)
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (after a resume): replace it as a whole
            old = root / f".tmp-old-{final.name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, step)


def load_checkpoint(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model_state, state, trainer_state)`` of a complete checkpoint; no pickle of arbitrary objects."""
    from safetensors.torch import load_file

    if not (ckpt.path / COMPLETE_FILE).exists():
        raise CheckpointError(f"checkpoint '{ckpt.path}' is incomplete (no {COMPLETE_FILE} marker)")
    try:
        model_state = load_file(str(ckpt.path / MODEL_FILE))
        state = torch.load(ckpt.path / STATE_FILE, map_location="cpu", weights_only=True)
        trainer_state = json.loads((ckpt.path / TRAINER_FILE).read_text())
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{ckpt.path}' could not be read ({type(exc).__name__}: {exc})") from exc
    return model_state, state, trainer_state
