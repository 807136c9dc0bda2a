"""Counter-based per-trajectory randomness: exact SplitMix64 bits, uniformity, independence of batching."""

from __future__ import annotations

import math

import torch

from opdkit.rollout.seeding import _GOLDEN, _MASK64, _mix_py, step_uniforms, trajectory_seed


def _moments_ok(u: torch.Tensor) -> None:
    assert 0 < u.min() and u.max() < 1
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 0.002
    # 16 equal bins: chi-square with 15 degrees of freedom, far below the 0.1% quantile (37.7)
    counts = torch.bincount((u * 16).long(), minlength=16).double()
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 37.7


def test_uniform_moments():
    # the sampler's stream: one draw per (seed, step), over many seeds and steps
    seeds = torch.tensor([trajectory_seed(3, i) for i in range(512)])
    _moments_ok(torch.cat([step_uniforms(seeds, t) for t in range(512)]))


def test_step_uniforms_bits_and_batching():
    seeds = torch.tensor([0, 1, 12345, trajectory_seed(7, 3, 9, 2), 2**63 - 1])
    u = step_uniforms(seeds, 6)
    for b, s in enumerate(seeds.tolist()):
        key = _mix_py((_mix_py(s & _MASK64) + _GOLDEN) & _MASK64)
        bits = _mix_py((key + 7 * _GOLDEN) & _MASK64)
        assert u[b].item() == ((bits >> 11) + 0.5) * 2.0**-53
    assert torch.equal(step_uniforms(seeds[2:4], 6), u[2:4])
    assert not torch.equal(step_uniforms(seeds, 7), u)
    assert torch.equal(step_uniforms(seeds.tolist(), 6), u)  # a list of ints is the same as the tensor


def test_splitmix64_known_answer():
    assert _mix_py(_GOLDEN) == 0xE220A8397B1DCDAF  # SplitMix64 seeded with 0: its first output


def test_trajectory_seed_distinguishes_its_parts():
    seeds = {trajectory_seed(0, step, i, j) for step in range(4) for i in range(8) for j in range(4)}
    assert len(seeds) == 128
    assert trajectory_seed(1, 2) != trajectory_seed(2, 1)
    assert all(0 <= s < 2**63 for s in seeds)
