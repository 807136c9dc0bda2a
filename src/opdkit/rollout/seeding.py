"""Per-trajectory randomness that does not depend on how trajectories are batched.

A trajectory's sampling seed is a function of what identifies it (run seed, step, prompt position, sample
index: :func:`trajectory_seed`), and its random numbers at generation step ``t`` are a pure function of
(seed, t) (:func:`step_uniforms`): a counter-based generator (SplitMix64, which passes BigCrush). The
sampler draws by inversion — the first token, in id order, at which the cumulative kept probability
exceeds ``u`` times the kept total (:mod:`opdkit.rollout.draw`) — so the same trajectory samples the same
tokens whether it is generated alone, in a batch of 128, or on another process, which is what makes a
2-process run equal a 1-process one.
"""

from __future__ import annotations

import torch

__all__ = ["step_uniforms", "trajectory_seed"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


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


def step_uniforms(seeds, step: int, *, device=None) -> torch.Tensor:
    """``[B]`` float64 uniforms in (0, 1), one per trajectory and generation step: ``seeds`` (a sequence of
    ints or an int64 tensor) each keyed by SplitMix64 mixing, then draw ``step`` of that stream.

    Evaluated with Python integers: for the few rows of a batch that is faster than two dozen tensor ops."""
    seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds
    out = []
    for seed in seeds:
        key = _mix_py((_mix_py(int(seed) & _MASK64) + _GOLDEN) & _MASK64)
        out.append(((_mix_py((key + (int(step) + 1) * _GOLDEN) & _MASK64) >> 11) + 0.5) * 2.0**-53)
    return torch.tensor(out, dtype=torch.float64, device=device)
