"""One precision policy for every pass of the student: sampling, the π_old pass and the loss.

Weights that train are float32 (master weights: a bf16 update at the paper's learning rate of 2e-6 would
round away for most weights); the compute runs under ``torch.autocast`` in the policy's dtype. The same
autocast wraps the rollout, the no-grad student pass and the loss forward, so the policy that sampled is
the policy that is trained. The teacher runs in its own dtype (``teacher.dtype``).

``run.precision: auto`` is bf16 on a CUDA GPU that supports it and fp32 elsewhere: on a CPU, bf16 matmuls
are several times slower than fp32 (a 1.5B Qwen2 forward measured 7x slower here), so it is used only when
asked, with a warning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["Precision", "resolve_precision", "upcast_trainable"]


@dataclass(frozen=True)
class Precision:
    """``name`` is ``fp32`` or ``bf16``; ``device_type`` the autocast device (``cpu`` or ``cuda``)."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self):
        """The autocast context of every student pass (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(setting: str, device: torch.device, log=None, key: str = "run.precision") -> Precision:
    """``run.precision`` (``auto``, ``fp32``, ``bf16``) on ``device`` -> a :class:`Precision`."""
    cuda = device.type == "cuda"
    if setting == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    else:
        name = setting
    if name == "bf16" and not cuda and log is not None:
        log(f"warning: {key} bf16 on a CPU: correct, but bf16 matmuls there are several times slower "
            f"than fp32 (measured 7x for a 1.5B Qwen2 forward); {key} fp32 is faster")
    return Precision(name, device.type)


def upcast_trainable(model) -> int:
    """Make every trainable parameter float32 in place (master weights); returns how many were upcast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()
            n += 1
    return n


def teacher_dtype(setting: str, precision: Precision) -> str:
    """``teacher.dtype`` resolved: ``run`` follows the run's compute precision (bfloat16 for bf16, else
    float32); the other settings are load dtypes already."""
    if setting == "run":
        return "bfloat16" if precision.name == "bf16" else "float32"
    return setting


def teacher_load_dtype(setting: str, run_precision: str = "auto", device=None) -> str:
    """:func:`teacher_dtype` where no :class:`Precision` is at hand: ``run`` resolved with the precision
    ``run_precision`` would give on ``device`` (default CPU)."""
    if setting != "run":
        return setting
    return teacher_dtype(setting, resolve_precision(run_precision, torch.device(device or "cpu")))

