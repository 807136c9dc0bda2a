"""The fused draw (opdkit.rollout.draw): its kept sets are transformers' top-k set and the exact top-p
nucleus, its token is the inversion of the row's uniform over that set in id order, its recorded log-probs,
entropy and log-normaliser equal float64 references, and many draws follow the truncated distribution."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper

from opdkit.rollout.draw import draw_step, invert
from opdkit.rollout.nucleus import nucleus, top_p_keep
from opdkit.rollout.seeding import step_uniforms


def _exact_nucleus(y64_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Float64 reference: keep a token when the mass of the tokens ranked strictly above it is below p."""
    probs = torch.softmax(y64_B_V, -1)
    p_sorted, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    above = torch.cumsum(p_sorted, -1) - p_sorted
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, above < top_p)


def _logits(kind, B, V, g):
    if kind == "gaussian":
        return torch.randn(B, V, generator=g) * 3
    if kind == "flat":  # a random-weight model: thousands of tokens in the nucleus
        return torch.randn(B, V, generator=g) * 0.05
    if kind == "zipf":
        ranks = torch.stack([torch.randperm(V, generator=g) for _ in range(B)]).float() + 1
        return -3.6 * torch.log(ranks) + 0.3 * torch.randn(B, V, generator=g)
    if kind == "ties":
        return torch.randint(0, 4, (B, V), generator=g).float()
    if kind == "neginf":  # a model that masks tokens itself
        x = torch.randn(B, V, generator=g) * 2
        x[:, ::3] = -math.inf
        return x
    raise ValueError(kind)


SETTINGS = [(1.0, 0, 1.0), (1.0, 0, 0.9), (0.7, 0, 0.8), (1.5, 6, 0.95), (1.0, 40, 1.0), (1.0, 1, 1.0),
            (0.05, 0, 0.9), (20.0, 0, 0.9), (1.3, 25, 0.5)]


def _reference_keep(scores, temperature, top_k, top_p, block):
    """The truncated set from transformers' top-k warper and the float64 nucleus, pad blocked; and the rows
    with a tie across the nucleus boundary (there only the warper's sort order decides which tied tokens go)."""
    x = scores.clone() / temperature
    if block is not None:
        x[:, block] = -math.inf
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    keep = torch.isfinite(x)
    tie = torch.zeros(x.shape[0], dtype=torch.bool)
    if top_p < 1.0:
        keep = _exact_nucleus(x.double(), top_p) & keep
        tie = _boundary_tie(x, top_p)
    return keep, tie


def _boundary_tie(x, top_p):
    probs = torch.softmax(x.double(), -1)
    vals, order = torch.sort(x, dim=-1, descending=True, stable=True)
    p_sorted = probs.gather(-1, order)
    above = torch.cumsum(p_sorted, -1) - p_sorted
    n = (above < top_p).sum(-1)
    r = torch.arange(x.shape[0])
    return (n < x.shape[1]) & (vals[r, (n - 1).clamp(min=0)] == vals[r, n.clamp(max=x.shape[1] - 1)])


@pytest.mark.parametrize("kind", ["gaussian", "flat", "zipf", "ties", "neginf"])
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
@pytest.mark.parametrize("block", [None, 5])
def test_token_is_the_inversion_over_the_reference_set(kind, temperature, top_k, top_p, block):
    g = torch.Generator().manual_seed(zlib.crc32(repr((kind, temperature, top_k, top_p, block)).encode()))
    B, V = 6, 3000
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    for step in range(3):
        scores = _logits(kind, B, V, g)
        d = draw_step(scores, seeds_B=seeds, step=step, temperature=temperature, top_k=top_k, top_p=top_p,
                      block_id=block)
        keep, tie = _reference_keep(scores, temperature, top_k, top_p, block)
        y = scores.double() / temperature
        w = torch.where(keep, torch.softmax(torch.where(keep, y, -math.inf), -1), 0.0)
        cum = torch.cumsum(w, -1)
        u = step_uniforms(seeds, step)
        ref = torch.searchsorted(cum, u[:, None], right=True)[:, 0]
        for b in range(B):
            if bool(tie[b]):  # the warper's order picks among the tied tokens: any of them may be kept
                edge = y[b][keep[b]].min()
                assert y[b, d.token_B[b]] >= edge and w[b, ref[b]] > 0
                ref[b] = d.token_B[b]
                continue
            assert keep[b, d.token_B[b]], (b, d.token_B[b])
            if d.token_B[b] != ref[b]:  # only where u lies within float32 rounding of a boundary of the CDF
                t = int(d.token_B[b])
                left = float(cum[b, t - 1]) if t else 0.0
                assert left - 1e-5 <= float(u[b]) <= float(cum[b, t]) + 1e-5, (b, t, int(ref[b]), float(u[b]))
                ref[b] = d.token_B[b]
        lp = torch.log_softmax(y, -1)
        torch.testing.assert_close(d.old_logprob_B.double(), lp.gather(1, ref[:, None])[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(d.logsumexp_B.double(), torch.logsumexp(y, -1), atol=1e-5, rtol=1e-6)
        ent = -(lp.exp() * lp).nan_to_num().sum(-1)
        torch.testing.assert_close(d.entropy_B.double(), ent, atol=1e-4, rtol=1e-5)
        s_ref = w.gather(1, ref[:, None])[:, 0].log()
        torch.testing.assert_close(d.sampling_logprob_B.double()[~tie], s_ref[~tie], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gaussian", "flat", "zipf"])
@pytest.mark.parametrize("V", [1000, 151936])
def test_exact_nucleus_equals_the_float64_rule(kind, V):
    """match_rounding=False: the float64 rule, through both the partial selection and the buckets."""
    g = torch.Generator().manual_seed(V)
    for p in (0.3, 0.9, 0.99):
        scores = _logits(kind, 4, V, g)
        ours = top_p_keep(scores, p, match_rounding=False)
        exact = _exact_nucleus(scores.double(), p)
        assert (exact.sum(-1) > 0).all()
        # only a token whose mass ranked above lies within float32 rounding (1e-6) of p may differ
        probs = torch.softmax(scores.double(), -1)
        p_sorted, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        above = torch.zeros_like(probs).scatter(-1, order, torch.cumsum(p_sorted, -1) - p_sorted)
        differ = ours != exact
        assert bool(((above[differ] - p).abs() < 1e-6).all()), (kind, V, p, above[differ])
        assert int(differ.sum()) <= 2


def test_wide_and_narrow_rows_are_both_exercised():
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([_logits("flat", 2, 151936, g), _logits("zipf", 2, 151936, g)])
    nu = nucleus(scores, 0.9, match_rounding=False)
    assert sorted(nu.wide_rows.tolist()) == [0, 1] and sorted(nu.narrow_rows.tolist()) == [2, 3]
    assert int(nu.keep_W_V.sum(-1).min()) > 100_000


def test_blocked_token_holding_almost_all_the_mass():
    """The truncated normaliser must not cancel away when the blocked (pad) token dominates."""
    V = 500
    scores = torch.randn(3, V)
    scores[:, 7] = 40.0  # pad: p ~ 1 - 1e-15
    d = draw_step(scores, seeds_B=torch.tensor([1, 2, 3]), step=0, top_p=0.9, block_id=7)
    assert not (d.token_B == 7).any()
    y = scores.double().clone()
    y[:, 7] = -math.inf
    keep = _exact_nucleus(y, 0.9)
    tlp = torch.log_softmax(torch.where(keep, y, -math.inf), -1).gather(1, d.token_B[:, None])[:, 0]
    torch.testing.assert_close(d.sampling_logprob_B.double(), tlp, atol=1e-5, rtol=0)


def test_invert_never_picks_a_zero_weight():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    for u in (1e-12, 0.3333, 0.5, 1 - 2**-53):
        pos, total = invert(w, torch.full((2,), u, dtype=torch.float64))
        assert w[0, pos[0]] > 0 and pos[1] == 4
        assert total.tolist() == [3.0, 3.0]


@pytest.mark.parametrize(("kind", "top_p"), [("peaked", 0.9), ("flat", 0.9), ("peaked", 1.0)])
def test_draws_follow_the_truncated_distribution(kind, top_p):
    """Many seeds on one row: the frequencies match the truncated distribution (chi-square, p ~ 5e-4)."""
    V, n = 151936, 4000
    g = torch.Generator().manual_seed(3)
    row = torch.full((V,), -20.0) if kind == "peaked" else torch.randn(V, generator=g) * 0.05 - 6
    likely = torch.randperm(V, generator=g)[:10]
    row[likely] = torch.linspace(0.0, 2.5, 10)
    seeds = torch.arange(n) * 7919 + 11
    tokens = torch.cat([draw_step(row.expand(500, V), seeds_B=seeds[i:i + 500], step=0, top_p=top_p).token_B
                        for i in range(0, n, 500)])
    keep = _exact_nucleus(row.double()[None], top_p)[0] if top_p < 1 else torch.ones(V, dtype=torch.bool)
    probs = torch.where(keep, torch.softmax(row.double(), -1), 0.0)
    probs /= probs.sum()
    assert bool(keep[tokens].all())
    # the ten likely tokens, and everything else pooled
    counts = torch.tensor([(tokens == t).sum().item() for t in likely.tolist()] + [0], dtype=torch.float64)
    counts[-1] = n - counts[:-1].sum()
    expected = torch.cat([probs[likely], (1 - probs[likely].sum()).reshape(1)]) * n
    used = expected > 5
    chi2 = float(((counts[used] - expected[used]) ** 2 / expected[used]).sum())
    dof = int(used.sum()) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.29 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, counts, expected)
