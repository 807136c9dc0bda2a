"""The sort-free nucleus keeps exactly transformers' TopPLogitsWarper token set (ties and extreme
temperatures included) and, inside the sampler, draws from the same distribution (chi-square)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from opdkit.rollout.nucleus import FastTopPLogitsWarper, top_p_keep


def _warper_keep(scores, p):
    return ~torch.isinf(TopPLogitsWarper(p)(None, scores.clone()))


def _logits(kind: str, B: int, V: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(B, V, generator=g) * 3
    if kind == "zipf":  # a language model's shape: a few likely tokens, a long tail
        ranks = torch.stack([torch.randperm(V, generator=g) for _ in range(B)]).float() + 1
        return -1.2 * torch.log(ranks) * 3 + 0.3 * torch.randn(B, V, generator=g)
    if kind == "ties":  # many exactly equal logits, also across the nucleus boundary
        return torch.randint(0, 6, (B, V), generator=g).float()
    if kind == "onehot":
        x = torch.full((B, V), -30.0)
        x[:, 0] = 10.0
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gaussian", "zipf", "ties", "onehot"])
@pytest.mark.parametrize("V", [7, 1000, 151936])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
def test_same_tokens_as_the_warper(kind, V, temperature):
    g = torch.Generator().manual_seed(V + int(temperature * 100))
    for p in (0.1, 0.5, 0.9, 0.95, 0.999):
        scores = _logits(kind, 4, V, g) / temperature
        assert torch.equal(top_p_keep(scores, p), _warper_keep(scores, p)), (kind, V, temperature, p)


def test_after_top_k_and_with_blocked_tokens():
    g = torch.Generator().manual_seed(0)
    scores = _logits("zipf", 6, 5000, g)
    scores[:, 3] = float("-inf")  # a blocked pad token
    scores = TopKLogitsWarper(50)(None, scores)
    for p in (0.3, 0.9, 1.0):
        assert torch.equal(top_p_keep(scores, p), _warper_keep(scores, p))


def test_the_processor_masks_like_the_warper():
    g = torch.Generator().manual_seed(1)
    scores = _logits("gaussian", 3, 2000, g)
    ours = FastTopPLogitsWarper(0.8)(None, scores.clone())
    theirs = TopPLogitsWarper(0.8)(None, scores.clone())
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError):
        FastTopPLogitsWarper(0.0)


@pytest.mark.parametrize("match_rounding", [True, False])
def test_mixed_batch_of_wide_and_narrow_rows(match_rounding):
    """Rows taking different paths (partial selection, buckets, the warper's sort) stay in their places."""
    g = torch.Generator().manual_seed(5)
    V = 151936
    rows = [_logits("gaussian", 1, V, g) / 20, _logits("zipf", 1, V, g), _logits("ties", 1, V, g),
            _logits("gaussian", 1, V, g) / 20, _logits("onehot", 1, V, g), _logits("zipf", 1, V, g) / 3]
    scores = torch.cat(rows)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        x = scores[order]
        ours = top_p_keep(x, 0.9, match_rounding=match_rounding)
        alone = torch.cat([top_p_keep(x[i:i + 1], 0.9, match_rounding=match_rounding) for i in range(len(order))])
        assert torch.equal(ours, alone)
        if match_rounding:
            assert torch.equal(ours, _warper_keep(x, 0.9))
