"""Sampled-token OPD: rewards, discounted advantages, REINFORCE and PPO surrogates."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opdkit.errors import InputError
from opdkit.losses import policy_gradient_loss, sampled_token_advantages, sampled_token_rewards
from tests.losses import reference as ref


def _logprob_pair(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    t = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    o = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    m = torch.rand(B, T, generator=g) > 0.25
    return t, o, m


@given(
    seed=st.integers(0, 10_000),
    B=st.integers(1, 3),
    T=st.integers(1, 9),
    gamma=st.sampled_from([0.0, 0.3, 0.9, 0.99, 1.0]),
    clip=st.sampled_from([None, 0.5, 2.0]),
)
def test_advantages_match_double_loop(seed, B, T, gamma, clip):
    t, o, m = _logprob_pair(seed, B, T)
    got = sampled_token_advantages(t, o, m, gamma=gamma, clip=clip)
    torch.testing.assert_close(got, ref.advantages(t, o, m, gamma, clip), rtol=1e-12, atol=1e-12)
    assert not got.requires_grad


def test_rewards_and_clip():
    t = torch.tensor([[-1.0, -5.0, -0.1]])
    o = torch.tensor([[-2.0, -0.5, -0.1]])
    m = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(sampled_token_rewards(t, o, m), torch.tensor([[1.0, -4.5, 0.0]]))
    torch.testing.assert_close(sampled_token_rewards(t, o, m, clip=2.0), torch.tensor([[1.0, -2.0, 0.0]]))


def test_neg_inf_teacher_logprob_needs_mask_or_clip():
    t = torch.tensor([[-1.0, float("-inf")]])
    o = torch.tensor([[-1.0, -1.0]])
    with pytest.raises(InputError, match="teacher_logprobs"):
        sampled_token_rewards(t, o, torch.ones(1, 2))
    assert sampled_token_rewards(t, o, torch.tensor([[1, 0]])).isfinite().all()
    assert sampled_token_rewards(t, o, torch.ones(1, 2), clip=3.0)[0, 1] == -3.0


def test_reinforce_gradient_is_minus_advantage_times_grad_logprob():
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(2, 4, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(2, 4, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    loss = policy_gradient_loss(lp, lp.detach(), adv, m)
    torch.testing.assert_close(loss, -adv * m)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    torch.testing.assert_close(grad, -adv * m)


def test_ppo_clip_stops_gradient_outside_the_trust_region():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 1.5 (A>0: clipped), 0.5 (A<0: clipped), 1.5 (A<0: not clipped), 1.1 (inside)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 1.1]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    loss = policy_gradient_loss(lp, old, adv, torch.ones(1, 4), clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, 1.5, -2.2]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 1.5, -2.2]], dtype=torch.float64))


def test_masked_positions_cannot_leak_inf():
    lp = torch.tensor([[-1.0, 80.0]], requires_grad=True)  # garbage at the padded position
    loss = policy_gradient_loss(lp, torch.tensor([[-1.0, -90.0]]), torch.tensor([[1.0, 5.0]]), torch.tensor([[1, 0]]))
    assert torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    assert torch.isfinite(grad).all() and grad[0, 1] == 0


def test_bad_input_is_named():
    t, o, m = _logprob_pair(0, 2, 3)
    with pytest.raises(InputError, match="gamma"):
        sampled_token_advantages(t, o, m, gamma=1.5)
    with pytest.raises(InputError, match="old_logprobs"):
        sampled_token_advantages(t, o[:, :2], m)
    with pytest.raises(InputError, match="mask"):
        sampled_token_advantages(t, o, m[:, :2])
    with pytest.raises(InputError, match="advantages"):
        policy_gradient_loss(t, o, t[:1], m)
    with pytest.raises(InputError, match="clip_eps"):
        policy_gradient_loss(t, o, t, m, clip_eps=-0.1)
    with pytest.raises(InputError, match="NaN"):
        sampled_token_advantages(t.masked_fill(torch.ones_like(m), float("nan")), o, m)


# ------------------------------------------------------------- expectation over an enumerable toy problem
class TabularPolicy:
    """An autoregressive policy over V tokens and horizon T with one logit row per prefix."""

    def __init__(self, V: int, T: int, logits: torch.Tensor):
        self.V, self.T = V, T
        self.prefixes = {p: i for i, p in enumerate(q for n in range(T) for q in itertools.product(range(V), repeat=n))}
        self.logits = logits  # [num_prefixes, V]

    def token_logprobs(self, seqs: list[tuple[int, ...]]) -> torch.Tensor:
        """``[N, T]`` log-probs of each token of each sequence given its prefix."""
        rows = [[self.prefixes[s[:t]] for t in range(self.T)] for s in seqs]
        lp = torch.log_softmax(self.logits, dim=-1)[torch.tensor(rows)]  # [N, T, V]
        return lp.gather(-1, torch.tensor(seqs).unsqueeze(-1)).squeeze(-1)


def _expected_gradient(gamma: float, V=3, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(V**k for k in range(T))
    theta = (torch.randn(n, V, generator=g, dtype=torch.float64)).requires_grad_()
    student = TabularPolicy(V, T, theta)
    teacher = TabularPolicy(V, T, torch.randn(n, V, generator=g, dtype=torch.float64) * 2)
    seqs = list(itertools.product(range(V), repeat=T))
    lp_s = student.token_logprobs(seqs)  # [N, T]
    lp_t = teacher.token_logprobs(seqs)
    seq_lp = lp_s.sum(-1)
    exact_kl = (seq_lp.exp() * (seq_lp - lp_t.sum(-1))).sum()
    (exact,) = torch.autograd.grad(exact_kl, theta, retain_graph=True)

    mask = torch.ones(len(seqs), T, dtype=torch.bool)
    adv = sampled_token_advantages(lp_t, lp_s.detach(), mask, gamma=gamma)
    per_token = policy_gradient_loss(lp_s, lp_s.detach(), adv, mask)
    # E_y[Σ_t L_t(y)] with y ~ π, taken exactly by weighting each sequence by its probability
    weight = seq_lp.detach().exp()
    (estimate,) = torch.autograd.grad((weight * per_token.sum(-1)).sum(), theta)
    return estimate, exact


def test_gamma_one_gradient_equals_sequence_reverse_kl_gradient_in_expectation():
    estimate, exact = _expected_gradient(1.0)
    torch.testing.assert_close(estimate, exact, rtol=1e-10, atol=1e-12)


def test_gamma_zero_is_biased_when_future_rewards_matter():
    estimate, exact = _expected_gradient(0.0)
    assert (estimate - exact).norm() > 0.05 * exact.norm()


def test_gamma_zero_is_unbiased_when_the_future_cannot_matter():
    estimate, exact = _expected_gradient(0.0, T=1)
    torch.testing.assert_close(estimate, exact, rtol=1e-10, atol=1e-12)
