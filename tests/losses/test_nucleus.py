"""Nucleus support sets (objective.support=teacher_topp): the fewest of the teacher's top ids reaching a mass."""

from __future__ import annotations

import pytest
import torch

from opdkit.errors import InputError
from opdkit.losses import nucleus_support, support_kl, teacher_topk_support


def _reference_set(probs_V: list[float], K: int, p: float, min_k: int) -> set[int]:
    """By hand: rank the ids by probability, keep adding until the mass reaches p (at least min_k, at most K)."""
    ranked = sorted(range(len(probs_V)), key=lambda v: -probs_V[v])[:K]
    kept, mass = [], 0.0
    for v in ranked:
        if len(kept) >= min_k and mass >= p - 1e-6:  # reached up to rounding (NUCLEUS_MASS_TOL)
            break
        kept.append(v)
        mass += probs_V[v]
    return set(kept)


@pytest.mark.parametrize(("p", "min_k"), [(0.5, 1), (0.9, 1), (0.9, 3), (0.99, 2)])
def test_the_kept_ids_and_the_loss_match_a_float64_reference(p, min_k):
    g = torch.Generator().manual_seed(0)
    B, T, V, K = 3, 5, 40, 12
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 4.0
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids, lp = teacher_topk_support(teacher, K)
    ids, lp = nucleus_support(ids, lp, p, min_k=min_k)
    q = torch.softmax(teacher, -1)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss = support_kl(student, ids, lp, mask)
    sizes = []
    for b in range(B):
        for t in range(T):
            want = _reference_set(q[b, t].tolist(), K, p, min_k)
            got = {int(i) for i, v in zip(ids[b, t], lp[b, t]) if v > float("-inf")}
            assert got == want
            sizes.append(len(got))
            # the renormalised reverse KL on that set, written out
            s = sorted(want)
            ls = torch.log_softmax(student[b, t, s], -1)
            lq = torch.log_softmax(teacher[b, t, s], -1)
            ref = float((ls.exp() * (ls - lq)).sum())
            assert abs(float(loss[b, t]) - ref) < 1e-12
    assert min(sizes) >= min_k and max(sizes) <= K and len(set(sizes)) > 1  # sizes vary by position


def test_p_one_keeps_top_k_and_order_does_not_matter():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 30, generator=g)
    ids, lp = teacher_topk_support(teacher, 8)
    same_ids, same_lp = nucleus_support(ids, lp, 1.0)
    assert torch.equal(same_ids, ids) and torch.equal(same_lp, lp)  # p forces K_max: the top-K support itself
    perm = torch.randperm(8, generator=g)
    _, a = nucleus_support(ids, lp, 0.6)
    _, b = nucleus_support(ids[:, perm], lp[:, perm], 0.6)
    assert torch.equal(a[:, perm], b)


def test_padded_slots_stay_padded_and_bad_arguments_are_refused():
    ids = torch.tensor([[3, 1, 2]])
    lp = torch.tensor([[-0.1, float("-inf"), -3.0]])
    _, out = nucleus_support(ids, lp, 0.99, min_k=3)
    assert out[0, 1] == float("-inf") and torch.isfinite(out[0, [0, 2]]).all()
    for bad in (0.0, 1.5, True):
        with pytest.raises(InputError, match="top_p"):
            nucleus_support(ids, lp, bad)
    with pytest.raises(InputError, match="min_k"):
        nucleus_support(ids, lp, 0.9, min_k=0)


def test_p_one_keeps_every_slot_in_float32():
    """A float32 running mass can reach 1 before the last ids: p = 1 must still keep all K (found in review)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(200, 50, generator=g) * 5
    ids, lp = teacher_topk_support(teacher, 32)
    assert lp.dtype == torch.float32
    _, kept = nucleus_support(ids, lp, 1.0)
    assert torch.equal(kept, lp)


def test_a_mass_that_reaches_p_up_to_rounding_has_reached_it():
    # 0.6 + 0.3 is 0.8999999999999999 in floating point: without a tolerance a third id would be kept
    probs = torch.tensor([[0.3, 0.6, 0.1]], dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2]])
    _, lp = nucleus_support(ids, probs.log(), 0.9)
    assert torch.isfinite(lp).tolist() == [[True, True, False]]
    _, lp = nucleus_support(ids, probs.log(), 0.9 + 1e-4)  # beyond the tolerance: the third id is needed
    assert torch.isfinite(lp).all()
