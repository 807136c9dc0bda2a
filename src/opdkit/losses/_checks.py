"""Argument checks shared by the loss functions.

Every public loss validates its inputs up front so that a wrong shape, dtype or device fails with a
message naming the argument, instead of broadcasting silently or failing deep inside an indexing op.
Value checks (NaN, ids in range) cost one pass over the data and a host sync; callers on a hot path
that have already validated their data may pass ``check_inputs=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opdkit.errors import InputError

__all__ = [
    "check_tensor",
    "check_float",
    "check_int",
    "check_mask",
    "check_same_device",
    "check_leading",
    "check_no_nan",
    "check_ids_in_range",
    "check_teacher_logprobs",
    "result_dtype",
    "as_id_tensor",
]


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: object, *, min_dim: int = 0) -> torch.Tensor:
    """``x`` is a floating-point tensor with at least ``min_dim`` dimensions."""
    x = check_tensor(name, x)
    if not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise InputError(f"{name}: expected at least {min_dim} dimension(s), got shape {_shape(x)}")
    return x


def check_int(name: str, x: object, *, min_dim: int = 0) -> torch.Tensor:
    """``x`` is an integer tensor (token ids) with at least ``min_dim`` dimensions."""
    x = check_tensor(name, x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise InputError(f"{name}: expected an integer tensor of token ids, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise InputError(f"{name}: expected at least {min_dim} dimension(s), got shape {_shape(x)}")
    return x


def check_mask(name: str, mask: object, shape: torch.Size, *, check_values: bool = True) -> torch.Tensor:
    """``mask`` has exactly ``shape`` and holds booleans or 0/1 numbers; returns it as bool."""
    mask = check_tensor(name, mask)
    if mask.shape != shape:
        raise InputError(
            f"{name}: expected shape [{', '.join(str(s) for s in shape)}] (the leading shape of the "
            f"other inputs), got {_shape(mask)}; masks are not broadcast"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise InputError(f"{name}: expected a bool or 0/1 tensor, got dtype {mask.dtype}")
    if check_values and mask.numel() > 0:
        ok = (mask == 0) | (mask == 1)
        if not bool(ok.all()):
            raise InputError(f"{name}: expected only 0/1 values (or a bool tensor), found other values")
    return mask != 0


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise InputError(f"all tensors must be on one device, got {listing}")


def check_leading(name: str, x: torch.Tensor, leading: torch.Size, ref: str, *, trailing: int = 1) -> None:
    """``x`` has ``leading`` as its shape before its last ``trailing`` dimensions."""
    got = x.shape[: x.dim() - trailing] if trailing else x.shape
    if x.dim() < trailing or got != leading:
        raise InputError(
            f"{name}: leading shape {_shape(x)[:-1] if trailing else _shape(x)} does not match {ref} "
            f"(expected leading dims [{', '.join(str(s) for s in leading)}], got shape {_shape(x)})"
        )


def check_no_nan(name: str, x: torch.Tensor, *, allow_neg_inf: bool = True) -> None:
    """No NaN (and no +inf; -inf only when allowed) in ``x``."""
    if x.numel() == 0:
        return
    # A sum is finite only if every element is (a NaN or an inf propagates): one reduction and no [x.shape]
    # bool temporary in the common case (909 MiB and 0.4 s for a 151,936 x 896 float32 head). A finite
    # tensor whose sum overflows falls through to the exact checks below.
    if x.is_floating_point() and bool(torch.isfinite(x.sum())):
        return
    if bool(torch.isfinite(x).all()):
        return
    if bool(torch.isnan(x).any()):
        raise InputError(f"{name}: contains NaN")
    if bool((x == float("inf")).any()):
        raise InputError(f"{name}: contains +inf")
    if not allow_neg_inf and bool((x == float("-inf")).any()):
        raise InputError(f"{name}: contains -inf")


def check_teacher_logprobs(name: str, x: torch.Tensor) -> None:
    """Teacher log-probs are <= 0 (up to rounding) and have no NaN; -inf marks padded slots."""
    check_no_nan(name, x, allow_neg_inf=True)
    if x.numel() and bool((x > 1e-3).any()):
        raise InputError(
            f"{name}: expected log-probabilities (<= 0), found values up to {float(x.max()):.4g}; "
            "pass teacher log-probs, not raw logits"
        )


def check_ids_in_range(name: str, ids: torch.Tensor, vocab: int, valid: torch.Tensor | None = None) -> None:
    """Ids (where ``valid``) lie in ``[0, vocab)``."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        first = ids[bad].flatten()[0].item()
        raise InputError(
            f"{name}: token id {first} is outside the student vocabulary [0, {vocab}); "
            "check that teacher and student share a vocabulary (`opdkit check`)"
        )


def result_dtype(*xs: torch.Tensor) -> torch.dtype:
    """Losses compute in at least float32: bf16/fp16 inputs give float32, float64 stays float64."""
    dtype = torch.float32
    for x in xs:
        if x.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def as_id_tensor(name: str, ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A sequence of ints or a 1-D integer tensor -> 1-D int64 tensor on ``device``."""
    if isinstance(ids, torch.Tensor):
        check_int(name, ids)
        if ids.dim() != 1:
            raise InputError(f"{name}: expected a 1-D tensor of ids, got shape {_shape(ids)}")
        return ids.to(device=device, dtype=torch.long)
    try:
        values = [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected a sequence of integer token ids ({exc})") from None
    for v, orig in zip(values, ids):
        if isinstance(orig, bool) or v != orig:
            raise InputError(f"{name}: expected integer token ids, got {orig!r}")
    return torch.tensor(values, dtype=torch.long, device=device)
