"""The gradient estimators on real (tiny) language models: the output layer's per-sample gradients, an exact
gradient at T = 2 (by the chain rule over every first token), the ratio's growth, the command line."""

from __future__ import annotations

import csv

import pytest
import torch

from opdkit.analysis.estimators import EstimatorSpec
from opdkit.analysis.lm_variance import LMProblem, _forward, head_gradients, run_lm_variance, sample_trajectories
from opdkit.analysis.variance import CSV_COLUMNS, variance_ratios
from opdkit.cli import main
from opdkit.data.chat import render_chat


@pytest.fixture(scope="module")
def problem(tiny_model_dirs):
    from opdkit.hf import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dirs["qwen2"])
    student = load_causal_lm(tiny_model_dirs["qwen2"])
    teacher = load_causal_lm(tiny_model_dirs["llama"])
    prompts = [render_chat(tok, [{"role": "user", "content": f"What is {i} + {i}?"}]) for i in range(2)]
    return LMProblem(student, teacher, prompts)


def test_head_gradients_equal_the_closed_form(problem):
    which, tokens = sample_trajectories(problem, 3, 5, torch.Generator().manual_seed(0))
    h, q = _forward(problem, which, tokens)
    spec = EstimatorSpec("sampled_token", gamma=0.5)
    g = head_gradients(problem, tokens, h, q, spec).reshape(3, problem.V, -1)
    z = h @ problem.W_V_d.T
    pi = torch.softmax(z, -1)
    lp = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]
    lq = torch.log_softmax(q, -1).gather(-1, tokens[..., None])[..., 0]
    r = lq - lp
    adv = torch.stack([sum(0.5 ** (u - t) * r[:, u] for u in range(t, 5)) for t in range(5)], dim=1)
    # the loss is −A log π: its gradient w.r.t. W is Σ_t A_t (π_t − e_{y_t}) h_tᵀ
    closed = torch.einsum("nt,ntv,ntd->nvd", adv, pi - torch.nn.functional.one_hot(tokens, problem.V).double(), h)
    torch.testing.assert_close(g, closed, rtol=1e-9, atol=1e-12)


def _exact_T2(problem, detach_first: bool) -> torch.Tensor:
    """∇_W of the 2-token sequence reverse KL averaged over the prompts, through every first token y1:
    J = KL(π1 ‖ q1) + Σ_{y1} π1(y1) KL(π2(·|y1) ‖ q2(·|y1)); ``detach_first``: π1's weights held (γ = 0's mean)."""
    V = problem.V
    W = problem.W_V_d.clone().requires_grad_(True)
    total = 0.0
    with torch.no_grad():
        parts = []
        for p in problem.prompt_ids:
            ids = torch.cat([p.expand(V, -1), torch.arange(V)[:, None]], dim=1)
            s = problem.student(input_ids=ids, output_hidden_states=True)
            t = problem.teacher(input_ids=ids).logits.double()
            L = p.numel()
            parts.append((s.hidden_states[-1][0, L - 1].double(), t[0, L - 1], s.hidden_states[-1][:, L].double(),
                          t[:, L]))
    for h1, q1, h2, q2 in parts:
        lp1, lq1 = torch.log_softmax(W @ h1, -1), torch.log_softmax(q1, -1)
        lp2, lq2 = torch.log_softmax(h2 @ W.T, -1), torch.log_softmax(q2, -1)
        kl2 = (lp2.exp() * (lp2 - lq2)).sum(-1)
        w1 = lp1.exp().detach() if detach_first else lp1.exp()
        total = total + (lp1.exp() * (lp1 - lq1)).sum() + (w1 * kl2).sum()
    (g,) = torch.autograd.grad(total / len(parts), W)
    return g.reshape(-1)


def test_monte_carlo_means_match_the_exact_gradients_at_T2(problem):
    """γ = 1 against ∇J, γ = 0 against its own exact mean, each within the Monte Carlo noise. (With these
    random-weight models the second token barely depends on the first, so γ = 0's bias is far below the
    noise here: the toy problems measure it.)"""
    N = 6000
    which, tokens = sample_trajectories(problem, N, 2, torch.Generator().manual_seed(1))
    h, q = _forward(problem, which, tokens)
    for gamma, exact in ((1.0, _exact_T2(problem, False)), (0.0, _exact_T2(problem, True))):
        g = head_gradients(problem, tokens, h, q, EstimatorSpec("sampled_token", gamma=gamma))
        mean = g.mean(0)
        noise = float((g - mean).square().sum(-1).mean()) / N  # E‖mean − E g‖² when unbiased
        assert float((mean - exact).square().sum()) < 1.5 * noise, gamma
        # the gradient itself is resolved: an estimator of 0 (or of the wrong sign) would fail the line above
        assert float(exact.square().sum()) > 5 * noise


def test_the_variance_ratio_grows_with_T(problem):
    specs = [EstimatorSpec("sampled_token", gamma=0.0), EstimatorSpec("sampled_token", gamma=1.0)]
    results = run_lm_variance(problem, specs, Ts=[2, 8, 32], n_estimates=10, samples_per_estimate=20,
                              reference_factor=1, seed=0)
    ratios = variance_ratios(results)
    for a, b in ((2, 8), (8, 32)):
        assert ratios[b]["ci_low"] > ratios[a]["ci_high"], ratios


def test_command_line_on_two_model_directories(tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "v"
    rc = main(["analyze", "variance", "--problem", "lm", "--student", str(tiny_model_dirs["qwen2"]),
               "--teacher", str(tiny_model_dirs["llama"]), "--T", "2,4", "--gammas", "0,1", "--K", "4",
               "--n-estimates", "4", "--samples-per-estimate", "5", "--reference-factor", "1", "--no-plot",
               "--out", str(out)])
    assert rc == 0
    with open(out / "variance.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 1 + 2 * (2 + 4)  # γ 0, 1; K 4 and V, renorm or not
    assert "output layer" in (out / "variance.md").read_text()
    assert "variance(gamma=1)/variance(gamma=0)" in capsys.readouterr().out
    assert main(["analyze", "variance", "--problem", "lm", "--out", str(tmp_path / "w")]) == 2
    assert "give --student DIR and --teacher DIR" in capsys.readouterr().err
    assert main(["analyze", "variance", "--student", "x", "--out", str(tmp_path / "w")]) == 2
    assert "--student: only with --problem demo or lm" in capsys.readouterr().err
