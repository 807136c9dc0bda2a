"""Importance weights for top-p rollouts: exact on a known truncated distribution."""

from __future__ import annotations

import itertools

import pytest
import torch

from opdkit.errors import InputError
from opdkit.losses import topp_correction_weights


def _nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for v in order.tolist():
        keep[v] = True
        mass += float(probs[v])
        if mass >= p:
            break
    return keep


def test_weights_are_the_nucleus_mass_and_undo_the_truncation_in_expectation():
    pi = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], dtype=torch.float64)
    keep = _nucleus(pi, 0.75)  # {0, 1, 2}: mass 0.8
    Z = float(pi[keep].sum())
    pi_p = torch.where(keep, pi / Z, torch.zeros_like(pi))
    f = torch.tensor([1.5, -2.0, 0.3, 7.0, -1.0, 4.0], dtype=torch.float64)
    kept = keep.nonzero().flatten().tolist()
    # one token: E_{pi_p}[w f] = sum over the nucleus of pi f (the truncation undone, up to the tail)
    ids = torch.tensor(kept)
    w = topp_correction_weights(pi[ids].log()[:, None], pi_p[ids].log()[:, None], torch.ones(len(kept), 1),
                                mode="token")[:, 0]
    torch.testing.assert_close(w, torch.full((len(kept),), Z, dtype=torch.float64))
    assert abs(float((pi_p[ids] * w * f[ids]).sum()) - float((pi[ids] * f[ids]).sum())) < 1e-12
    # three tokens: the sequence weight is the product, E_{pi_p}[w F] = sum over nucleus sequences of pi F
    seqs = torch.tensor(list(itertools.product(kept, repeat=3)))
    old, samp = pi[seqs].log(), pi_p[seqs].log()
    mask = torch.ones_like(old)
    ws = topp_correction_weights(old, samp, mask, mode="sequence")
    assert torch.allclose(ws, torch.full_like(ws, Z**3))
    F = f[seqs].sum(-1)
    lhs = float((samp.sum(-1).exp() * ws[:, 0] * F).sum())
    rhs = float((old.sum(-1).exp() * F).sum())
    assert abs(lhs - rhs) < 1e-12
    # the clip bounds it; masked positions get 0 and do not count
    assert torch.allclose(topp_correction_weights(old, samp, mask, mode="sequence", clip=0.1),
                          torch.full_like(ws, min(Z**3, 0.1)))
    mask[:, 2] = 0
    part = topp_correction_weights(old, samp, mask, mode="sequence")
    assert torch.allclose(part[:, :2], torch.full_like(part[:, :2], Z**2)) and (part[:, 2] == 0).all()
    # a token the loss masks out (an end-of-turn token) was still drawn from pi_p: with sampled_mask it counts
    drawn = torch.ones_like(mask)
    full = topp_correction_weights(old, samp, mask, mode="sequence", sampled_mask=drawn)
    assert torch.allclose(full[:, :2], torch.full_like(full[:, :2], Z**3)) and (full[:, 2] == 0).all()
    with pytest.raises(InputError, match="sampled_mask: expected the shape of mask"):
        topp_correction_weights(old, samp, mask, mode="sequence", sampled_mask=drawn[:, :2])


def test_untruncated_rollouts_weigh_one_and_bad_arguments_are_refused():
    lp = torch.log(torch.tensor([[0.2, 0.5]]))
    assert torch.equal(topp_correction_weights(lp, lp, torch.ones(1, 2), mode="token"), torch.ones(1, 2))
    # a rounding excess (pi > pi_p) is read as Z = 1
    assert torch.equal(topp_correction_weights(lp + 1e-7, lp, torch.ones(1, 2)), torch.ones(1, 2))
    with pytest.raises(InputError, match="mode"):
        topp_correction_weights(lp, lp, torch.ones(1, 2), mode="prefix")
    with pytest.raises(InputError, match="clip"):
        topp_correction_weights(lp, lp, torch.ones(1, 2), mode="sequence", clip=0)
