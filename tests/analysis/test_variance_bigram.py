"""The bigram problem: exact KL and gradient from the chain's marginals, per-sample gradients with shared
rows, Monte Carlo against enumeration, and the variance ratio's growth with T on the default problem."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from opdkit.analysis.estimators import bigram_exact_mean
from opdkit.analysis.toy import bigram_row_visits, bigram_rows, enumerated_reverse_kl
from opdkit.analysis.variance import (
    CSV_COLUMNS,
    DEFAULT_PROBLEM,
    Enumeration,
    EstimatorSpec,
    enumerate_sequences,
    estimate,
    exact_kl_gradient,
    exact_moments,
    make_problem,
    per_sample_gradients,
    run_variance_experiment,
    sample_sequences,
    sequence_reverse_kl,
    variance_ratios,
)
from opdkit.analysis.variance_report import ratio_slope
from tests.analysis.test_variance import autograd_through_the_table

SPECS = [
    EstimatorSpec("sampled_token", gamma=0.0),
    EstimatorSpec("sampled_token", gamma=0.6),
    EstimatorSpec("sampled_token", gamma=1.0),
    EstimatorSpec("support_kl", K=2, renormalize=True),
    EstimatorSpec("support_kl", K=2, renormalize=False),
]


def test_default_problem_is_the_bigram():
    assert DEFAULT_PROBLEM == "bigram"


def test_bigram_rows_are_the_start_row_then_the_previous_token():
    seqs = torch.tensor([[2, 0, 1], [1, 1, 0]])
    assert bigram_rows(3, seqs).tolist() == [[3, 2, 0], [3, 1, 1]]


def test_marginal_kl_and_gradient_equal_enumeration_and_finite_differences():
    problem = make_problem(3, 5, seed=11, structure="bigram")
    assert problem.student_logits_P_V.shape == (4, 3)
    torch.testing.assert_close(sequence_reverse_kl(problem), enumerated_reverse_kl(problem), rtol=1e-12, atol=0)
    theta = problem.student_logits_P_V.clone().requires_grad_(True)
    (by_enumeration,) = torch.autograd.grad(enumerated_reverse_kl(problem, theta), theta)
    exact = exact_kl_gradient(problem)
    torch.testing.assert_close(exact, by_enumeration, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    for i, j in [(0, 0), (3, 2), (1, 1)]:
        plus, minus = problem.student_logits_P_V.clone(), problem.student_logits_P_V.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = (sequence_reverse_kl(problem, plus) - sequence_reverse_kl(problem, minus)) / (2 * eps)
        assert abs(float(fd) - float(exact[i, j])) < 1e-7 * max(1.0, abs(float(fd)))
    # visits: the start row once, the token rows T − 1 times in all
    visits = bigram_row_visits(problem)
    assert float(visits[3]) == 1.0 and abs(float(visits[:3].sum()) - 4.0) < 1e-12


def test_sampling_follows_the_chain():
    problem = make_problem(3, 2, seed=12, structure="bigram")
    seqs = sample_sequences(problem, 40_000, torch.Generator().manual_seed(0))
    en = Enumeration.of(problem)
    codes = seqs[:, 0] * 3 + seqs[:, 1]
    freq = torch.bincount(codes, minlength=9).double() / seqs.shape[0]
    # enumeration order is lexicographic, i.e. code order; 4.5 standard errors
    se = (en.prob_S * (1 - en.prob_S) / seqs.shape[0]).sqrt()
    assert float(((freq - en.prob_S).abs() / se).max()) < 4.5


def _autograd_per_sample(problem, seqs, spec):
    """Reference: one sample at a time, autograd w.r.t. the whole [V+1, V] table, flattened."""
    return autograd_through_the_table(problem, seqs, spec).reshape(seqs.shape[0], -1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_moments_with_repeated_rows_match_a_per_sample_reference(spec):
    """The shared-row (dense) path of estimate/exact_moments against a per-sample autograd reference."""
    problem = make_problem(3, 4, seed=13, structure="bigram")
    seqs = enumerate_sequences(3, 4)
    ref_S_D = _autograd_per_sample(problem, seqs, spec)
    # bigram trajectories revisit rows: the reference adds the parts of repeated rows
    rows, grad = per_sample_gradients(problem, seqs, spec)
    assert bool((rows[:, 1:].unsqueeze(2) == rows[:, 1:].unsqueeze(1)).sum((1, 2)).gt(3).any())
    en = Enumeration.of(problem)
    mean_ref = (en.prob_S[:, None] * ref_S_D).sum(0)
    var_ref = float((en.prob_S * (ref_S_D - mean_ref).square().sum(-1)).sum())
    mean, var = exact_moments(problem, spec)
    torch.testing.assert_close(mean.reshape(-1), mean_ref, rtol=1e-9, atol=1e-12)
    assert abs(var - var_ref) <= 1e-9 * max(1.0, var_ref)
    # Monte Carlo on 4 groups of all 81 sequences with their own weights is not possible; instead the
    # plain Monte Carlo statistics on a fixed sample equal those of the reference per-sample gradients
    sample = sample_sequences(problem, 6 * 5, torch.Generator().manual_seed(1))
    stats = estimate(problem, spec, sample, 5)
    ref = _autograd_per_sample(problem, sample, spec).reshape(6, 5, -1)
    centred = ref - ref.mean(1, keepdim=True)
    group_var = centred.square().sum(-1).sum(-1) / 4
    torch.testing.assert_close(stats.group_variances, group_var, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.mean_P_V.reshape(-1), ref.reshape(30, -1).mean(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_exact_means_from_the_marginals_equal_enumeration(spec):
    problem = make_problem(3, 5, seed=14, structure="bigram")
    mean, _ = exact_moments(problem, spec)
    by_marginals = bigram_exact_mean(problem, spec)
    if spec.estimator == "sampled_token" and spec.gamma not in (0.0, 1.0):
        assert by_marginals is None  # couples positions: left to Monte Carlo
        return
    torch.testing.assert_close(by_marginals, mean, rtol=1e-9, atol=1e-12)
    assert bigram_exact_mean(make_problem(3, 2, seed=0), spec) is None  # tabular: enumeration does it


def test_monte_carlo_variance_agrees_with_enumeration_within_the_bootstrap_interval():
    problem = make_problem(4, 6, seed=15, structure="bigram")
    seqs = sample_sequences(problem, 60 * 100, torch.Generator().manual_seed(2))
    en = Enumeration.of(problem)
    for spec in (SPECS[0], SPECS[2], SPECS[3]):
        stats = estimate(problem, spec, seqs, 100, bootstrap_seed=3)
        _, exact_var = exact_moments(problem, spec, enumeration=en)
        lo, hi = stats.variance_ci
        assert lo <= exact_var <= hi, (spec.label, lo, exact_var, hi)


def test_default_problem_ratio_grows_with_T_beyond_enumeration(tmp_path):
    Ts = [4, 16, 64]
    results = run_variance_experiment(
        tmp_path, Ts=Ts, gammas=[0.0, 1.0], Ks=[2], n_estimates=20, samples_per_estimate=40, seed=0
    )
    ratios = variance_ratios(results)
    assert list(ratios) == Ts
    for a, b in zip(Ts, Ts[1:]):
        assert ratios[b]["ci_low"] > ratios[a]["ci_high"], ratios  # strictly, beyond the noise
    assert ratios[64]["mc"] > 100
    assert ratios[4]["ci_low"] <= ratios[4]["mc"] <= ratios[4]["ci_high"]
    # V^T = 8^4 is enumerable: exact figures there; 8^16 is not: NaN, while ∇J is still exact
    assert not math.isnan(ratios[4]["exact"]) and math.isnan(ratios[16]["exact"])
    by = {(r["estimator"], r["T"], r["gamma"], r["K"], r["renormalize"]): r for r in results}
    assert by[("sampled_token", 64, 1.0, None, None)]["bias_rel_exact"] < 1e-10
    assert 0.05 < by[("sampled_token", 64, 0.0, None, None)]["bias_rel_exact"] < 2
    assert math.isnan(by[("sampled_token", 64, 1.0, None, None)]["variance_exact"])
    # the CSV keeps its columns; the markdown reports the ratio's growth
    with open(tmp_path / "variance.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == CSV_COLUMNS
    md = (tmp_path / "variance.md").read_text()
    assert "Growth: the ratio rises as T^" in md and "| 64 |" in md
    assert (tmp_path / "variance.png").read_bytes()[:4] == b"\x89PNG"


def test_ratio_slope_reads_a_power_law():
    ratios = {T: {"mc": 3.0 * T**2} for T in (2, 4, 8, 16, 32, 64)}
    assert abs(ratio_slope(ratios) - 2.0) < 1e-12
    assert math.isnan(ratio_slope({8: {"mc": 5.0}}))


def test_top_p_rollouts_and_their_corrections_against_enumeration():
    import dataclasses

    problem = dataclasses.replace(make_problem(3, 3, seed=21), top_p=0.7)
    probs = problem.rollout_probs()
    full = torch.softmax(problem.student_logits_P_V, -1)
    kept = probs > 0
    assert bool((kept.sum(-1) < 3).any())  # the nucleus drops tokens
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0], dtype=torch.float64))
    # every kept token keeps its relative probability
    Z = (full * kept).sum(-1, keepdim=True)
    torch.testing.assert_close(torch.where(kept, full / Z, torch.zeros_like(full)), probs)
    # sampling follows the truncated rows: no dropped token is ever drawn
    seqs = sample_sequences(problem, 4000, torch.Generator().manual_seed(0))
    rows = problem.rows(seqs)
    assert bool(kept[rows, seqs].all())
    # the sequence-weighted estimator's mean is the untruncated estimator's mean over the nucleus sequences
    seq_spec = EstimatorSpec("sampled_token", gamma=1.0, correction="sequence")
    mean_seq, _ = exact_moments(problem, seq_spec)
    untruncated = dataclasses.replace(problem, top_p=1.0)
    en = Enumeration.of(untruncated)
    inside = kept[en.rows_S_T, en.seqs_S_T].all(-1)
    r, g = per_sample_gradients(untruncated, en.seqs_S_T, EstimatorSpec("sampled_token", gamma=1.0))
    want = torch.zeros_like(mean_seq)
    w = (en.prob_S * inside)[:, None, None] * g
    want.index_add_(0, r.reshape(-1), w.reshape(-1, 3))
    torch.testing.assert_close(mean_seq, want, rtol=1e-9, atol=1e-12)
    # Monte Carlo agrees with the exact moments for each correction
    for correction in (None, "token", "sequence"):
        spec = EstimatorSpec("sampled_token", gamma=0.0, correction=correction)
        stats = estimate(problem, spec, seqs, 100, bootstrap_seed=1)
        _, var = exact_moments(problem, spec)
        lo, hi = stats.variance_ci
        assert lo <= var <= hi, (correction, lo, var, hi)
    with pytest.raises(Exception, match="support_kl: set K and renormalize only"):
        EstimatorSpec("support_kl", K=2, renormalize=True, correction="token")


def test_the_command_line_names_its_flags_and_guards_its_folder(tmp_path, capsys):
    from opdkit.cli import main

    base = ["analyze", "variance", "--gammas", "0,1", "--K", "2", "--no-plot"]
    assert main([*base, "--T", "2,2", "--out", str(tmp_path / "a")]) == 2
    assert "--T: a horizon given twice" in capsys.readouterr().err
    assert main([*base, "--T", "2", "--rollout-top-p", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--rollout-top-p: expected a number in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--T", "2", "--K", "0", "--out", str(tmp_path / "a")]) == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert main([*base, "--T", "2", "--out", str(mine)]) == 2
    assert "holds other files" in capsys.readouterr().err
    afile = tmp_path / "f"
    afile.write_text("x")
    assert main([*base, "--problem", "demo", "--cache-dir", str(afile), "--out", str(tmp_path / "b")]) == 2
    assert "--cache-dir" in capsys.readouterr().err and not (tmp_path / "b" / "variance.csv").exists()
    assert main([*base, "--T", "2", "--n-estimates", "2", "--samples-per-estimate", "4", "--out",
                 str(tmp_path / "c")]) == 0
    assert main([*base, "--T", "3", "--n-estimates", "2", "--samples-per-estimate", "4", "--out",
                 str(tmp_path / "c")]) == 0  # its own folder again
    assert main([*base, "--T", "2", "--reference-factor", "2", "--out", str(tmp_path / "d")]) == 2
    assert "--reference-factor: only with --problem demo or lm" in capsys.readouterr().err


def test_bad_lists_and_sizes_name_their_flag_and_a_rerun_leaves_no_stale_figure(tmp_path, capsys):
    import csv

    from opdkit.cli import main

    base = ["analyze", "variance", "--gammas", "0,1", "--K", "2", "--T", "2"]
    with pytest.raises(SystemExit):
        main([*base[:-2], "--T", "4,x", "--out", str(tmp_path / "a")])
    assert "argument --T: expected comma-separated integers, got '4,x'" in capsys.readouterr().err
    assert main([*base, "--K", "100", "--out", str(tmp_path / "a")]) == 2
    assert "--K: support sizes above the vocabulary V=8: 100" in capsys.readouterr().err
    assert main([*base, "--gammas", "0,0", "--out", str(tmp_path / "a")]) == 2
    assert "--gammas: a discount given twice" in capsys.readouterr().err
    assert main([*base, "--n-estimates", "1", "--out", str(tmp_path / "a")]) == 2
    assert "--n-estimates: expected >= 2 groups, got 1" in capsys.readouterr().err
    assert main([*base, "--out", ""]) == 2
    assert "--out: expected a folder" in capsys.readouterr().err
    out = tmp_path / "v"
    small = ["--n-estimates", "4", "--samples-per-estimate", "8", "--out", str(out)]
    assert main([*base, *small]) == 0 and (out / "variance.png").is_file()
    assert "bootstrap intervals over fewer than 30 groups are rough" in capsys.readouterr().out
    assert "Only 4 groups: the intervals are rough" in (out / "variance.md").read_text()
    assert main([*base, *small, "--no-plot", "--rollout-top-p", "0.9"]) == 0
    assert not (out / "variance.png").exists()  # the figure of the first run is gone with its table
    assert "rollouts top-p 0.9" in capsys.readouterr().out
    with open(out / "variance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["rollout_top_p"] for r in rows} == {"0.9"}
    assert {"sampled_token_token_is", "sampled_token_sequence_is"} <= {r["estimator"] for r in rows}


def test_deterministic_rollouts_give_zero_variance_and_an_undefined_ratio(tmp_path, capsys):
    from opdkit.cli import main

    # a two-token vocabulary whose nucleus at p = 0.6 is one token: every rollout is the same sequence
    assert main(["analyze", "variance", "--problem", "imbalanced", "--rollout-top-p", "0.6", "--T", "4",
                 "--gammas", "0,1", "--n-estimates", "4", "--samples-per-estimate", "8", "--no-plot",
                 "--out", str(tmp_path / "v")]) == 0
    assert "T=4: variance(gamma=1)/variance(gamma=0) undefined: variance(gamma=0) is 0" in capsys.readouterr().out
    import csv

    with open(tmp_path / "v" / "variance.csv", newline="") as f:
        variances = [float(r["variance"]) for r in csv.DictReader(f)]
    assert min(variances) == 0.0  # 0, not a rounding -4e-16
    # the bigram at p = 0.01: one token per row, every estimator deterministic; its rounding noise (±1e-15)
    # is not a variance, and no ratio of two such noises is printed
    assert main(["analyze", "variance", "--rollout-top-p", "0.01", "--T", "2,4", "--gammas", "0,1",
                 "--n-estimates", "4", "--samples-per-estimate", "8", "--no-plot", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "T=2: variance(gamma=1)/variance(gamma=0) undefined" in printed
    assert "T=4: variance(gamma=1)/variance(gamma=0) undefined" in printed
    with open(tmp_path / "d" / "variance.csv", newline="") as f:
        assert {float(r["variance"]) for r in csv.DictReader(f)} == {0.0}
