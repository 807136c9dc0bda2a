"""Diagnostics of METHOD.md."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from opdkit.losses import (
    entropy,
    negative_reward_fraction,
    opd_diagnostics,
    outside_support_fraction,
    reward_skew,
    support_mass,
)


def test_negative_reward_fraction_and_k1():
    t = torch.tensor([[-1.0, -3.0, -0.5, -9.0]])
    o = torch.tensor([[-2.0, -1.0, -0.7, -1.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert negative_reward_fraction(t, o, m).item() == pytest.approx(1 / 3)
    d = opd_diagnostics(m, teacher_sampled_logprobs=t, old_logprobs=o)
    assert d["k1"].item() == pytest.approx(((-2 + 1) + (-1 + 3) + (-0.7 + 0.5)) / 3)


def test_reward_skew_sign():
    o = torch.zeros(1, 6)
    m = torch.ones(1, 6)
    right = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    assert reward_skew(right, o, m).item() > 1
    assert reward_skew(-right, o, m).item() < -1
    assert reward_skew(torch.zeros(1, 6), o, m).item() == 0


def test_support_mass_and_outside_fraction():
    lp = torch.log(torch.tensor([[[0.5, 0.2, 0.0]], [[0.1, 0.1, 0.1]]]))  # [2, 1, 3]; a 0-prob (padded) slot
    m = torch.ones(2, 1)
    assert support_mass(lp, m).item() == pytest.approx((0.7 + 0.3) / 2)
    ids = torch.tensor([[[4, 2, 9]], [[1, 2, 3]]])
    sampled = torch.tensor([[9], [3]])  # 9 sits in a padded slot: it counts as outside
    assert outside_support_fraction(sampled, ids, lp, m).item() == pytest.approx(0.5)


def test_entropy():
    logits = torch.zeros(2, 3, 4)
    assert entropy(logits, torch.ones(2, 3)).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[0.0, -float("inf"), -float("inf")]])
    assert entropy(peaked, torch.ones(1)).item() == 0.0


def test_empty_mask_gives_zero():
    d = opd_diagnostics(
        torch.zeros(2, 3),
        sampled_ids=torch.zeros(2, 3, dtype=torch.long),
        old_logprobs=torch.zeros(2, 3),
        teacher_sampled_logprobs=torch.zeros(2, 3),
        support_ids=torch.zeros(2, 3, 2, dtype=torch.long),
        teacher_support_logprobs=torch.zeros(2, 3, 2),
        student_support_logprobs=torch.zeros(2, 3, 2),
        student_logits=torch.zeros(2, 3, 5),
        per_token_loss=torch.zeros(2, 3),
    )
    assert set(d) == {
        "negative_reward_frac", "reward_skew", "k1", "teacher_support_mass", "student_support_mass",
        "sampled_outside_support_frac", "entropy", "loss_per_token",
    }
    assert all(v.item() == 0 for v in d.values())


def test_import_losses_is_light():
    code = "import sys, opdkit.losses; bad = [m for m in sys.modules if m.split('.')[0] in " \
           "('transformers', 'accelerate', 'yaml', 'safetensors')]; print(bad); assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True)
