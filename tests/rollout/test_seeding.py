"""Counter-based per-trajectory randomness: exact SplitMix64 bits, uniformity, independence of batching."""

from __future__ import annotations

import math

import torch

from opdkit.rollout.seeding import _GOLDEN, _MASK64, _mix_py, gumbel_noise, trajectory_seed, uniforms


def _reference_uniform(seed: int, index: int) -> float:
    key = _mix_py(seed & _MASK64)
    bits = _mix_py((key + (index + 1) * _GOLDEN) & _MASK64)
    return ((bits >> 11) + 0.5) * 2.0**-53


def test_bits_match_the_python_reference():
    # torch's int64 arithmetic must wrap exactly like SplitMix64's unsigned arithmetic
    seeds = torch.tensor([0, 1, 12345, trajectory_seed(7, 3, 9, 2), 2**63 - 1])
    u = uniforms(seeds, step=3, V=17)
    for b, s in enumerate(seeds.tolist()):
        for v in (0, 5, 16):
            assert u[b, v].item() == _reference_uniform(s, 3 * 17 + v)


def test_rows_do_not_depend_on_the_batch():
    seeds = torch.tensor([5, 6, 7])
    full = uniforms(seeds, step=4, V=50)
    assert torch.equal(uniforms(seeds[1:2], step=4, V=50), full[1:2])
    assert torch.equal(uniforms(seeds.flip(0), step=4, V=50), full.flip(0))
    assert not torch.equal(uniforms(seeds, step=5, V=50), full)


def test_uniform_and_gumbel_moments():
    u = uniforms(torch.arange(64), step=0, V=4096).flatten()
    assert 0 < u.min() and u.max() < 1
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 0.002
    # 16 equal bins: chi-square with 15 degrees of freedom, far below the 0.1% quantile (37.7)
    counts = torch.bincount((u * 16).long(), minlength=16).double()
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 37.7
    g = gumbel_noise(torch.arange(64), 0, 4096, dtype=torch.float64).flatten()
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


def test_trajectory_seed_distinguishes_its_parts():
    seeds = {trajectory_seed(0, step, i, j) for step in range(4) for i in range(8) for j in range(4)}
    assert len(seeds) == 128
    assert trajectory_seed(1, 2) != trajectory_seed(2, 1)
    assert all(0 <= s < 2**63 for s in seeds)
