"""Per-trajectory randomness that does not depend on how trajectories are batched.

A trajectory's sampling seed is a function of what identifies it (run seed, step, prompt position, sample
index: :func:`trajectory_seed`), and its random numbers at generation step ``t`` are a pure function of
(seed, t) (:func:`step_uniforms`): a counter-based generator (SplitMix64, which passes BigCrush) evaluated
for a whole batch in one vectorised pass. The sampler draws by inversion — the first token, in id order,
at which the cumulative kept probability exceeds ``u`` times the kept total (:mod:`opdkit.rollout.draw`) —
so the same trajectory samples the same tokens whether it is generated alone, in a batch of 128, or on
another process, which is what makes a 2-process run equal a 1-process one. :func:`uniforms` gives
``[B, V]`` draws keyed by (seed, step, token id) for other uses.
"""

from __future__ import annotations

import torch

__all__ = ["step_uniforms", "trajectory_seed", "uniforms"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores (same bits)."""
    return x - (1 << 64) if x >= (1 << 63) else x


def _mix_py(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def trajectory_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. ``rollout.seed, step, prompt position, sample index``)."""
    h = 0
    for p in parts:
        h = _mix_py((h + _GOLDEN + (int(p) & _MASK64)) & _MASK64)
    return h >> 1


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    # int64 products wrap modulo 2**64 in torch, exactly as SplitMix64's unsigned arithmetic needs
    # (tests/rollout/test_seeding.py checks the bits against the Python reference).
    z = (z ^ _srl(z, 30)) * _i64(_M1)
    z = (z ^ _srl(z, 27)) * _i64(_M2)
    return z ^ _srl(z, 31)


def uniforms(seeds_B: torch.Tensor, step: int, V: int) -> torch.Tensor:
    """``[B, V]`` float64 uniforms in (0, 1): stream ``seeds_B[b]``, draws ``step * V .. step * V + V - 1``."""
    key_B = _mix(seeds_B.long())
    counter_V = torch.arange(V, dtype=torch.long, device=seeds_B.device) + (int(step) * V + 1)
    bits = _mix(key_B[:, None] + counter_V[None, :] * _i64(_GOLDEN))
    return (_srl(bits, 11).double() + 0.5) * (2.0**-53)


def step_uniforms(seeds_B: torch.Tensor | list[int], step: int) -> torch.Tensor:
    """``[B]`` float64 uniforms in (0, 1), one per trajectory and generation step: draw ``step`` of a stream
    keyed by each seed mixed twice (so it never meets :func:`uniforms`' streams). The sampler's draw.

    Evaluated with Python integers: for the few rows of a batch that is faster than two dozen tensor ops."""
    seeds = seeds_B.tolist() if isinstance(seeds_B, torch.Tensor) else seeds_B
    out = []
    for seed in seeds:
        key = _mix_py((_mix_py(int(seed) & _MASK64) + _GOLDEN) & _MASK64)
        out.append(((_mix_py((key + (int(step) + 1) * _GOLDEN) & _MASK64) >> 11) + 0.5) * 2.0**-53)
    device = seeds_B.device if isinstance(seeds_B, torch.Tensor) else None
    return torch.tensor(out, dtype=torch.float64, device=device)
