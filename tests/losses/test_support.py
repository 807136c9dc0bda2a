"""Support sets (teacher top-K, student top-K, + sampled token, dropped ids) and special-token masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opdkit.errors import InputError
from opdkit.losses import (
    add_sampled_token,
    drop_support_ids,
    gather_logprobs,
    special_token_mask,
    student_topk_support,
    support_kl,
    teacher_topk_support,
)


def test_teacher_topk_is_sorted_and_full_vocab_normalised():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 20, generator=g, dtype=torch.float64)
    ids, lp = teacher_topk_support(logits, 5)
    full = torch.log_softmax(logits, -1)
    assert ids.shape == (2, 3, 5) and ids.dtype == torch.long
    torch.testing.assert_close(lp, full.gather(-1, ids))
    assert (lp[..., :-1] >= lp[..., 1:]).all()
    assert (lp.min(-1).values >= full.topk(5, -1).values.min(-1).values).all()


def test_teacher_topk_temperature():
    logits = torch.randn(4, 9, dtype=torch.float64)
    _, lp = teacher_topk_support(logits, 3, temperature=2.0)
    torch.testing.assert_close(lp, torch.log_softmax(logits / 2, -1).topk(3, -1).values)


def test_student_topk_scores_the_teacher_at_student_ids():
    s = torch.randn(3, 10, dtype=torch.float64)
    t = torch.randn(3, 10, dtype=torch.float64)
    ids, lp = student_topk_support(s, t, 4)
    assert torch.equal(ids, s.topk(4, -1).indices)
    torch.testing.assert_close(lp, torch.log_softmax(t, -1).gather(-1, ids))
    torch.testing.assert_close(gather_logprobs(t, ids), lp)


def test_plus_sampled_slot_is_padded_when_sampled_is_already_in_support():
    ids = torch.tensor([[3, 1], [3, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.2], [0.5, 0.2]]))
    sampled = torch.tensor([1, 7])
    sampled_lp = torch.log(torch.tensor([0.2, 0.01]))
    ids2, lp2 = add_sampled_token(ids, lp, sampled, sampled_lp)
    assert ids2.shape == (2, 3)
    assert lp2[0, 2] == float("-inf")  # duplicate of slot 1: weight 0
    assert ids2[1, 2] == 7 and torch.isclose(lp2[1, 2], torch.log(torch.tensor(0.01)))
    # the objective on S + {y} equals the objective on the union written out by hand
    student = torch.randn(2, 10, dtype=torch.float64)
    m = torch.ones(2, dtype=torch.bool)
    got = support_kl(student, ids2, lp2.double(), m)
    by_hand = torch.stack(
        [
            support_kl(student[:1], ids[:1], lp[:1].double(), m[:1])[0],
            support_kl(student[1:], ids2[1:], lp2[1:].double(), m[1:])[0],
        ]
    )
    torch.testing.assert_close(got, by_hand)


def test_drop_support_ids_pads_the_listed_ids():
    ids = torch.tensor([[5, 2, 9]])
    lp = torch.tensor([[-0.1, -1.0, -2.0]])
    out = drop_support_ids(ids, lp, [9, 5])
    assert out.tolist() == [[float("-inf"), -1.0, float("-inf")]]
    assert torch.equal(drop_support_ids(ids, lp, []), lp)


def test_special_token_mask_first_and_all():
    sampled = torch.tensor([[7, 1, 7, 2, 7, 1], [0, 0, 7, 7, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    first = special_token_mask(sampled, [7, 1], mask, mode="first")
    assert first.tolist() == [[False, False, True, True, True, True], [False, False, False, True, True, True]]
    every = special_token_mask(sampled, torch.tensor([7, 1]), mask, mode="all")
    assert every.tolist() == [[False, False, False, True, False, False], [False, False, False, False, True, True]]


def test_special_token_mask_ignores_positions_outside_the_mask():
    # the first 7 is in the prompt (mask 0); the first *response* 7 is the one masked
    sampled = torch.tensor([[7, 7, 7]])
    out = special_token_mask(sampled, [7], torch.tensor([[0.0, 1.0, 1.0]]))
    assert out.dtype == torch.float32 and out.tolist() == [[0.0, 0.0, 1.0]]


@given(seed=st.integers(0, 1000), mode=st.sampled_from(["first", "all"]))
def test_special_token_mask_against_loop(seed, mode):
    g = torch.Generator().manual_seed(seed)
    sampled = torch.randint(0, 6, (3, 8), generator=g)
    mask = torch.rand(3, 8, generator=g) > 0.2
    special = [1, 4]
    got = special_token_mask(sampled, special, mask, mode=mode)
    want = mask.clone()
    for b in range(3):
        seen = set()
        for t in range(8):
            tok = int(sampled[b, t])
            if mask[b, t] and tok in special and (mode == "all" or tok not in seen):
                want[b, t] = False
                seen.add(tok)
    assert torch.equal(got, want)


def test_support_bad_input():
    with pytest.raises(InputError, match="k"):
        teacher_topk_support(torch.randn(2, 5), 6)
    with pytest.raises(InputError, match="k"):
        teacher_topk_support(torch.randn(2, 5), 0)
    with pytest.raises(InputError, match="teacher_logits"):
        teacher_topk_support(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(InputError, match="mode"):
        special_token_mask(torch.zeros(1, 2, dtype=torch.long), [1], torch.ones(1, 2), mode="last")
    with pytest.raises(InputError, match="special_ids"):
        special_token_mask(torch.zeros(1, 2, dtype=torch.long), [1.5], torch.ones(1, 2))
    with pytest.raises(InputError, match="ids"):
        gather_logprobs(torch.randn(2, 5), torch.tensor([[5], [0]]))
    with pytest.raises(InputError, match="sampled_ids"):
        add_sampled_token(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long),
                          torch.zeros(2))
