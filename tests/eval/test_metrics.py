"""avg@n, the unbiased pass@k estimator (against a brute-force count over all subsets), intervals, summaries."""

from __future__ import annotations

import itertools
import math

import pytest

from opdkit.eval.metrics import Z95, default_ks, pass_at_k, summarise_average, summarise_benchmark, wilson


def _brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The fraction of all k-subsets of the n samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_equals_the_count_over_every_subset(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(outcomes, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_avg_and_large_n_is_stable():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    # C(1000, 500) overflows a float; the product form does not
    value = pass_at_k(1000, 3, 500)
    assert 0 < value < 1 and math.isfinite(value)
    exact = 1 - math.comb(997, 500) / math.comb(1000, 500)  # exact integers, then one division
    assert value == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_refuses_bad_arguments():
    for args in [(4, 5, 1), (4, 2, 0), (4, 2, 5), (0, 0, 1), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 2, 1)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]


def test_summary_of_a_benchmark():
    correct = [[True, True, False, False], [False, False, False, False], [True, True, True, True]]
    s = summarise_benchmark("b", correct, lengths=[10] * 12, truncated=[False] * 11 + [True],
                            statuses=["correct"] * 6 + ["wrong"] * 4 + ["no_answer", "timeout"])
    assert s["problems"] == 3 and s["n"] == 4
    assert s["avg@n"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["pass@k"]["1"] == pytest.approx(s["avg@n"])
    assert s["pass@k"]["4"] == pytest.approx(2 / 3)
    assert s["pass@k"]["2"] == pytest.approx((_brute_pass_at_k(correct[0], 2) + 0 + 1) / 3)
    assert s["truncation_rate"] == pytest.approx(1 / 12)
    assert s["no_answer_rate"] == pytest.approx(1 / 12) and s["timeouts"] == 1
    lo, hi = s["avg@n_ci"]
    assert lo < s["avg@n"] < hi and (lo, hi) == wilson(0.5, 3)
    with pytest.raises(ValueError):
        summarise_benchmark("ragged", [[True], [True, False]])


def test_wilson_interval():
    # textbook values: 0 of 20 -> [0, 0.1611]; 20 of 20 -> [0.8389, 1]; 5 of 10 -> [0.2366, 0.7634]
    assert wilson(0.0, 20) == pytest.approx((0.0, 0.16112), abs=1e-5)
    assert wilson(1.0, 20) == pytest.approx((0.83888, 1.0), abs=1e-5)
    assert wilson(0.5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    for m in (0.0, 0.01, 0.5, 0.99, 1.0):  # inside [0, 1], never empty
        lo, hi = wilson(m, 3)
        assert 0 <= lo <= m <= hi <= 1 and hi - lo > 0.1


def test_average_weighs_each_benchmark_once():
    a = summarise_benchmark("a", [[True]] * 10)  # 1.0 on 10 problems
    b = summarise_benchmark("b", [[False], [True]])  # 0.5 on 2 problems
    avg = summarise_average([a, b])
    assert avg["avg@n"] == pytest.approx(0.75)
    se_a, se_b = [(s["avg@n_ci"][1] - s["avg@n_ci"][0]) / (2 * Z95) for s in (a, b)]
    se = math.sqrt(se_a**2 + se_b**2) / 2
    assert avg["avg@n_ci"] == pytest.approx([0.75 - Z95 * se, min(1.0, 0.75 + Z95 * se)], rel=1e-6)
    assert 0 <= avg["avg@n_ci"][0] and avg["avg@n_ci"][1] <= 1
