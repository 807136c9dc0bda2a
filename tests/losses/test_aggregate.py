"""aggregate(): token-mean / seq-mean-token-mean / seq-mean-token-sum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opdkit.errors import InputError
from opdkit.losses import AGGREGATION_MODES, aggregate
from tests.losses import reference as ref


@given(
    seed=st.integers(0, 10_000),
    shape=st.sampled_from([(5,), (3, 4), (2, 3, 5)]),
    mode=st.sampled_from(AGGREGATION_MODES),
    p_mask=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_aggregate_matches_loops(seed, shape, mode, p_mask):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    m = torch.rand(*shape, generator=g) >= p_mask
    got = aggregate(x, m, mode)
    want = ref.aggregate(x, m, mode)
    torch.testing.assert_close(got, want.to(got.dtype))
    if want.requires_grad:
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_empty_mask_gives_zero_not_nan(mode):
    x = torch.full((2, 3), float("nan")).requires_grad_()
    out = aggregate(x, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, x)
    assert torch.equal(g, torch.zeros_like(g))


def test_modes_differ_as_documented():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(x, m, "token-mean").item() == pytest.approx(8 / 5)
    assert aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((1 + 4) / 2)
    assert aggregate(x, m, "seq-mean-token-sum").item() == pytest.approx((4 + 4) / 2)


def test_denominator_lets_micro_batches_sum_to_the_batch_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g)
    m = torch.rand(6, 5, generator=g) > 0.3
    for mode, count in (("token-mean", m.sum()), ("seq-mean-token-mean", (m.sum(-1) > 0).sum())):
        whole = aggregate(x, m, mode)
        parts = sum(aggregate(x[i : i + 2], m[i : i + 2], mode, denominator=count) for i in range(0, 6, 2))
        torch.testing.assert_close(parts, whole)


def test_bad_input():
    with pytest.raises(InputError, match="mode"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "mean")
    with pytest.raises(InputError, match="mask"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 3), "token-mean")
    with pytest.raises(InputError, match="denominator"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "token-mean", denominator=0)
