"""Atomic checkpoints of every process's state: a checkpoint directory exists complete or not at all.

Layout of ``RUN_DIR/checkpoints/step-000040/``: what ``accelerate``'s ``save_state`` writes (the student
module's weights as ``model.safetensors``, the optimizer and scheduler states, and one RNG-state file per
process; under FSDP each process's shards), ``trainer_state.json`` (step, data position, counters), and
``COMPLETE``. Everything is loaded back with ``torch.load(weights_only=True)`` or safetensors: no pickle of
arbitrary objects.

A checkpoint is written into ``checkpoints/.tmp-step-000040`` (the same name on every process, on a file
system they share), every file is flushed to disk, ``COMPLETE`` is written last by the main process, and
only then is the directory renamed into place (``os.rename`` within one file system is atomic). A process
killed at any moment leaves either the previous checkpoints untouched or a ``.tmp-*`` directory that is
never read and is removed on the next start. Old checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "remove_partial_checkpoints",
]

_NAME = re.compile(r"^step-(\d{6,})$")
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


def save_checkpoint(run_dir: str | Path, step: int, *, accelerator, dist, trainer_state: dict[str, Any],
                    keep_last: int) -> Checkpoint:
    """Write checkpoint ``step`` of every process atomically, then keep the ``keep_last`` newest.

    Collective: every process calls it. ``accelerator.save_state`` writes the prepared model, optimizer
    and scheduler and each process's RNG state.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        dist.barrier()
        if dist.is_main:
            (tmp / TRAINER_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True))
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_file(path)
            (tmp / COMPLETE_FILE).write_text("ok\n")
            _fsync_file(tmp / COMPLETE_FILE)
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (after a resume): replace it as a whole
                old = root / f".tmp-old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(root)
            for stale in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(stale.path, ignore_errors=True)
    except Exception as exc:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = f"the previous checkpoint ({previous[-1].path}) is intact" if previous else "no earlier checkpoint"
        reason = str(exc).splitlines()[0] if str(exc) else "no details"
        raise CheckpointError(f"checkpoint of step {step} could not be written ({type(exc).__name__}: {reason}; "
                              f"disk full?); {kept}") from None
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return Checkpoint(final, step)


def load_checkpoint(ckpt: Checkpoint, *, accelerator) -> dict[str, Any]:
    """Restore every process's state from a complete checkpoint; returns its ``trainer_state``."""
    if not (ckpt.path / COMPLETE_FILE).exists():
        raise CheckpointError(f"checkpoint '{ckpt.path}' is incomplete (no {COMPLETE_FILE} marker)")
    try:
        accelerator.load_state(str(ckpt.path))
        return json.loads((ckpt.path / TRAINER_FILE).read_text())
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{ckpt.path}' could not be read ({type(exc).__name__}: {exc})") from exc
