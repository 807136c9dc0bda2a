"""The bias–variance experiment: exact gradient, estimator means, reproducibility, output files."""

from __future__ import annotations

import csv

import pytest
import torch

from opdkit.analysis.variance import (
    CSV_COLUMNS,
    EstimatorSpec,
    ToyProblem,
    enumerate_sequences,
    estimate,
    exact_kl_gradient,
    exact_moments,
    make_problem,
    num_prefixes,
    per_sample_gradients,
    prefix_rows,
    run_variance_experiment,
    sample_sequences,
    sequence_reverse_kl,
)
from opdkit.errors import InputError
from opdkit.losses import policy_gradient_loss, sampled_token_advantages, support_kl, teacher_topk_support

SMALL = dict(
    Ts=[1, 3], gammas=[0.0, 0.5, 1.0], Ks=[1, 2], vocab=3, n_estimates=8, samples_per_estimate=50, problem="tabular"
)


def test_prefix_rows_are_distinct_per_prefix_and_cover_the_table():
    V, T = 3, 3
    seqs = enumerate_sequences(V, T)
    rows = prefix_rows(V, seqs)
    assert rows[:, 0].eq(0).all()
    assert set(rows.flatten().tolist()) == set(range(num_prefixes(V, T)))
    prefixes = {}
    for s, r in zip(seqs.tolist(), rows.tolist()):
        for t in range(T):
            assert prefixes.setdefault(r[t], tuple(s[:t])) == tuple(s[:t])


def test_exact_gradient_matches_finite_differences():
    problem = make_problem(3, 3, seed=1)
    exact = exact_kl_gradient(problem)
    theta = problem.student_logits_P_V
    eps = 1e-6
    g = torch.Generator().manual_seed(0)
    coords = [(int(torch.randint(theta.shape[0], (1,), generator=g)), int(torch.randint(3, (1,), generator=g)))]
    coords += [(0, 0), (theta.shape[0] - 1, 2)]
    for i, j in coords:
        plus, minus = theta.clone(), theta.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (sequence_reverse_kl(problem, plus) - sequence_reverse_kl(problem, minus)) / (2 * eps)
        assert abs(float(fd) - float(exact[i, j])) < 1e-7 * max(1.0, abs(float(fd)))


def test_kl_is_zero_with_zero_gradient_when_student_equals_teacher():
    p = make_problem(3, 2, seed=0)
    same = ToyProblem(3, 2, p.teacher_logits_P_V.clone(), p.teacher_logits_P_V.clone())
    assert abs(float(sequence_reverse_kl(same))) < 1e-12
    assert float(exact_kl_gradient(same).abs().max()) < 1e-12


def autograd_through_the_table(problem, seqs, spec):
    """Reference: autograd w.r.t. the whole [P, V] table, one sample at a time (the parts of a row visited at
    several positions add up, as for a bigram problem)."""
    rows = problem.rows(seqs)
    out = []
    for i in range(seqs.shape[0]):
        theta = problem.student_logits_P_V.clone().requires_grad_(True)
        r, y = rows[i : i + 1], seqs[i : i + 1]
        mask = torch.ones_like(y, dtype=torch.bool)
        if spec.estimator == "sampled_token":
            lp = torch.log_softmax(theta[r], -1).gather(-1, y[..., None])[..., 0]
            lq = torch.log_softmax(problem.teacher_logits_P_V[r], -1).gather(-1, y[..., None])[..., 0]
            adv = sampled_token_advantages(lq, lp.detach(), mask, gamma=spec.gamma)
            loss = policy_gradient_loss(lp, lp.detach(), adv, mask).sum()
        else:
            ids, tlp = teacher_topk_support(problem.teacher_logits_P_V[r], spec.K)
            loss = support_kl(theta[r], ids, tlp, mask, renormalize=spec.renormalize).sum()
        (g,) = torch.autograd.grad(loss, theta)
        out.append(g)
    return torch.stack(out)


@pytest.mark.parametrize(
    "spec",
    [
        EstimatorSpec("sampled_token", gamma=0.0),
        EstimatorSpec("sampled_token", gamma=0.7),
        EstimatorSpec("sampled_token", gamma=1.0),
        EstimatorSpec("support_kl", K=2, renormalize=True),
        EstimatorSpec("support_kl", K=2, renormalize=False),
    ],
    ids=lambda s: s.label,
)
def test_vectorised_per_sample_gradients_match_autograd_and_closed_form(spec):
    problem = make_problem(3, 3, seed=2)
    seqs = sample_sequences(problem, 7, torch.Generator().manual_seed(0))
    rows, grad = per_sample_gradients(problem, seqs, spec)
    P, V = problem.student_logits_P_V.shape
    dense = torch.zeros(seqs.shape[0], P, V, dtype=torch.float64)
    for i in range(seqs.shape[0]):
        dense[i].index_add_(0, rows[i], grad[i])
    torch.testing.assert_close(dense, autograd_through_the_table(problem, seqs, spec), rtol=1e-10, atol=1e-12)
    if spec.estimator == "sampled_token":
        # closed form: −A_t (onehot(y_t) − π(·|c_t)) at row c_t (the loss is −A log π)
        pi = torch.softmax(problem.student_logits_P_V[rows], -1)
        lp = pi.gather(-1, seqs[..., None])[..., 0].log()
        lq = torch.log_softmax(problem.teacher_logits_P_V[rows], -1).gather(-1, seqs[..., None])[..., 0]
        adv = sampled_token_advantages(lq, lp, torch.ones_like(lp, dtype=torch.bool), gamma=spec.gamma)
        closed = -adv[..., None] * (torch.nn.functional.one_hot(seqs, V).double() - pi)
        torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)


def test_gamma_one_is_exactly_unbiased_and_gamma_zero_equals_full_vocab_support_kl_in_expectation():
    problem = make_problem(3, 3, seed=3)
    exact = exact_kl_gradient(problem)
    mean1, _ = exact_moments(problem, EstimatorSpec("sampled_token", gamma=1.0))
    torch.testing.assert_close(mean1, exact, rtol=1e-10, atol=1e-12)
    mean0, var0 = exact_moments(problem, EstimatorSpec("sampled_token", gamma=0.0))
    mean_kl, var_kl = exact_moments(problem, EstimatorSpec("support_kl", K=3, renormalize=True))
    # E[r_t ∇log π(y_t)] = ∇ KL(π(·|c_t) ‖ q(·|c_t)): same mean, and the support KL has no reward noise
    torch.testing.assert_close(mean0, mean_kl, rtol=1e-10, atol=1e-12)
    assert var_kl < var0


def test_gamma_one_monte_carlo_mean_is_within_its_standard_errors():
    problem = make_problem(3, 3, seed=4)
    exact = exact_kl_gradient(problem)
    seqs = sample_sequences(problem, 20 * 200, torch.Generator().manual_seed(5))
    stats = estimate(problem, EstimatorSpec("sampled_token", gamma=1.0), seqs, 200)
    # Coordinates no sample reaches have exact gradient ~0 there and standard error 0: compare with slack.
    z = (stats.mean_P_V - exact).abs() / stats.stderr_P_V.clamp(min=1e-12)
    reached = stats.stderr_P_V > 0
    assert float(z[reached].max()) < 4.5
    # and the estimated variance agrees with the exact one within its bootstrap interval (up to 10% slack)
    _, exact_var = exact_moments(problem, EstimatorSpec("sampled_token", gamma=1.0))
    lo, hi = stats.variance_ci
    assert 0.9 * lo <= exact_var <= 1.1 * hi


def test_gamma_zero_bias_is_non_zero_when_the_future_matters_and_zero_when_it_cannot():
    problem = make_problem(3, 3, seed=6)
    exact = exact_kl_gradient(problem)
    mean0, _ = exact_moments(problem, EstimatorSpec("sampled_token", gamma=0.0))
    assert float((mean0 - exact).norm()) > 0.05 * float(exact.norm())

    # T = 1: there is no future
    one = make_problem(3, 1, seed=6)
    mean0, _ = exact_moments(one, EstimatorSpec("sampled_token", gamma=0.0))
    torch.testing.assert_close(mean0, exact_kl_gradient(one), rtol=1e-10, atol=1e-12)

    # every prefix has the same student row and the same teacher row: future rewards do not depend on y_t
    P = num_prefixes(3, 3)
    flat = ToyProblem(
        3, 3, problem.student_logits_P_V[:1].expand(P, 3).clone(), problem.teacher_logits_P_V[:1].expand(P, 3).clone()
    )
    exact_flat = exact_kl_gradient(flat)
    assert float(exact_flat.norm()) > 0.1
    mean0, _ = exact_moments(flat, EstimatorSpec("sampled_token", gamma=0.0))
    torch.testing.assert_close(mean0, exact_flat, rtol=1e-9, atol=1e-12)


def _csv_rows(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


def test_experiment_writes_required_csv_markdown_and_png(tmp_path):
    results = run_variance_experiment(tmp_path, seed=0, **SMALL)
    header, rows = _csv_rows(tmp_path / "variance.csv")
    assert tuple(header) == CSV_COLUMNS
    # 3 gammas + K in {1, 2, 3=V} x renormalised or not, for each of 2 horizons
    assert len(rows) == len(results) == 2 * (3 + 3 * 2)
    col = {c: i for i, c in enumerate(header)}
    for r in rows:
        if r[col["estimator"]] == "sampled_token":
            assert r[col["gamma"]] != "" and r[col["K"]] == "" and r[col["renormalize"]] == ""
        else:
            assert r[col["estimator"]] == "support_kl"
            assert r[col["gamma"]] == "" and r[col["K"]] != "" and r[col["renormalize"]] in ("true", "false")
        lo, v, hi = (float(r[col[c]]) for c in ("variance_ci_low", "variance", "variance_ci_high"))
        assert lo <= v <= hi
    md = (tmp_path / "variance.md").read_text()
    assert "| T | γ |" in md and "Variance ratio" in md
    assert (tmp_path / "variance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by = {(r["estimator"], r["T"], r["gamma"], r["K"], r["renormalize"]): r for r in results}
    # T = 1: every discount is the same estimator, unbiased
    assert by[("sampled_token", 1, 0.0, None, None)]["bias_rel_exact"] < 1e-10
    assert (
        by[("sampled_token", 1, 0.0, None, None)]["variance"] == by[("sampled_token", 1, 1.0, None, None)]["variance"]
    )
    # K = 1 renormalised: the KL over one slot is 0, so is its gradient
    k1 = by[("support_kl", 3, None, 1, True)]
    assert k1["variance"] == 0.0 and abs(k1["bias_rel"] - 1.0) < 1e-12


def test_same_seed_same_figures_bitwise_other_seed_differs(tmp_path):
    a = run_variance_experiment(tmp_path / "a", seed=3, plot=False, **SMALL)
    b = run_variance_experiment(tmp_path / "b", seed=3, plot=False, **SMALL)
    c = run_variance_experiment(None, seed=4, **SMALL)
    assert (tmp_path / "a" / "variance.csv").read_bytes() == (tmp_path / "b" / "variance.csv").read_bytes()
    assert a == b
    assert [r["variance"] for r in a] != [r["variance"] for r in c]


def test_bad_sizes_are_refused():
    with pytest.raises(InputError, match="enumeration cap.*--problem bigram"):
        run_variance_experiment(None, Ts=[30], vocab=4, problem="tabular")
    with pytest.raises(InputError, match="gammas"):
        run_variance_experiment(None, Ts=[2], gammas=[1.5])
    with pytest.raises(InputError, match="support_kl"):
        EstimatorSpec("support_kl", gamma=0.5)


def test_imbalanced_preset_runs_is_reproducible_and_tabular_preset_is_make_problem():
    from opdkit.analysis.variance import PROBLEM_PRESETS, variance_ratios

    small = dict(Ts=[3, 6], gammas=[0.0, 1.0], Ks=[], n_estimates=4, samples_per_estimate=50, plot=False)
    a = run_variance_experiment(None, seed=1, problem="imbalanced", **small)
    b = run_variance_experiment(None, seed=1, problem="imbalanced", **small)
    assert a == b
    assert len(a) == 2 * (2 + 2)  # 2 gammas + K = V = 2 renormalised or not, per horizon
    ratios = variance_ratios(a)
    assert set(ratios) == {3, 6} and all(v["exact"] > 1.0 for v in ratios.values())
    # the preset's own V (2) is used when vocab is not given
    assert all(r["K"] in (None, 2) for r in a)
    # the sampled-token rewards are mostly negative: the student puts its mass where the teacher does not
    imb = PROBLEM_PRESETS["imbalanced"].make(2, 6, seed=0)
    seqs = enumerate_sequences(2, 6)
    rows = prefix_rows(2, seqs)
    lp = torch.log_softmax(imb.student_logits_P_V, -1)[rows].gather(-1, seqs[..., None])[..., 0]
    lq = torch.log_softmax(imb.teacher_logits_P_V, -1)[rows].gather(-1, seqs[..., None])[..., 0]
    prob = lp.sum(-1).exp()
    assert float((prob[:, None] * (lq < lp).double()).sum() / 6) > 0.5
    # the tabular preset is make_problem's defaults (the default problem of earlier versions)
    d = PROBLEM_PRESETS["tabular"].make(3, 2, seed=5)
    m = make_problem(3, 2, seed=5)
    assert torch.equal(d.student_logits_P_V, m.student_logits_P_V)
    assert torch.equal(d.teacher_logits_P_V, m.teacher_logits_P_V)
    with pytest.raises(InputError, match="problem"):
        run_variance_experiment(None, problem="nope", **small)
