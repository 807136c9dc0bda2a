"""Counter-based per-trajectory randomness: exact SplitMix64 bits, uniformity, independence of batching."""

from __future__ import annotations

import math

import torch

from opdkit.rollout.seeding import _GOLDEN, _MASK64, _mix_py, step_uniforms, trajectory_seed, uniforms


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
    _moments_ok(uniforms(torch.arange(64), step=0, V=4096).flatten())
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
    assert not torch.isin(u, uniforms(seeds, 6, 64)).any()  # a different stream from uniforms'


def test_trajectory_seed_distinguishes_its_parts():
    seeds = {trajectory_seed(0, step, i, j) for step in range(4) for i in range(8) for j in range(4)}
    assert len(seeds) == 128
    assert trajectory_seed(1, 2) != trajectory_seed(2, 1)
    assert all(0 <= s < 2**63 for s in seeds)
