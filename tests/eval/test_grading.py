"""Grading with time limits: in this process, from threads, in worker processes, and a pool that kills a
stuck worker. Extraction fall-backs. (The equivalence table itself is test_grading_table.py.)"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest

from opdkit.eval import extract_answer, grade
from opdkit.eval.grading import GradingPool, grade_answer, grade_many

# sympy tries to evaluate the tower: without a time limit this comparison does not finish
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"

CASES = [
    ("\\boxed{\\frac12}", "0.5", True),
    ("\\boxed{0.49}", "\\frac{1}{2}", False),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{(1,2)}", "(1,2]", False),
    ("\\boxed{(1,2]}", "(1,2]", True),
    ("The answer is 3.", "3", False),
    ("<think>\\boxed{3}", "3", False),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", True),
]


def test_a_pathological_answer_times_out_and_counts_as_wrong():
    t = time.perf_counter()
    g = grade_answer(extract_answer(PATHOLOGICAL), "3", timeout_s=0.5)
    assert g.status == "timeout" and g.correct is False
    assert time.perf_counter() - t < 10
    assert grade(PATHOLOGICAL, "3", timeout_s=0.5) is False
    # the interval timer is released: a later grade works and no alarm is left pending
    assert grade("\\boxed{2}", "2") is True
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_grading_from_threads_is_safe_and_bounded():
    """math-verify's own limits use signals (main thread only); from a thread opdkit grades in a worker
    process, so the answers agree with the main thread's and the time limit still holds."""
    expected = [grade(r, g) for r, g, _ in CASES]
    assert expected == [e for _, _, e in CASES]
    results: dict[int, list] = {}

    def work(i):
        results[i] = [grade(r, g) for r, g, _ in CASES]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert all(results[i] == expected for i in range(4))
    out = []
    th = threading.Thread(target=lambda: out.append(grade_answer("9^{9^{9^{9}}}", "3", timeout_s=0.5)))
    th.start()
    th.join(timeout=60)
    assert out and out[0].status == "timeout"


def _grade_in_worker(pairs):
    return [grade(r, g, timeout_s=0.5) for r, g in pairs]


def test_grading_inside_worker_processes():
    pairs = [(r, g) for r, g, _ in CASES] + [(PATHOLOGICAL, "3")]
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        got = list(ex.map(_grade_in_worker, [pairs, pairs]))
    assert got == [[e for _, _, e in CASES] + [False]] * 2


def test_pool_results_do_not_depend_on_the_number_of_processes():
    items = [(r, g) for r, g, _ in CASES] * 3 + [(PATHOLOGICAL, "3")]
    one = grade_many(items, processes=1, timeout_s=0.5, min_parallel=1)
    two = grade_many(items, processes=2, timeout_s=0.5, min_parallel=1)
    serial = grade_many(items, processes=0, timeout_s=0.5)
    assert one == two == serial
    assert [g.correct for g in one[:-1]] == [e for _, _, e in CASES] * 3
    assert one[-1].status == "timeout"
    assert [g.status for g in one[:8]] == ["correct", "wrong", "correct", "wrong", "correct", "no_answer",
                                            "no_answer", "correct"]


def test_pool_kills_a_worker_that_no_signal_can_stop():
    """A worker stopped outright (as one stuck in C code would be) misses the parent's hard deadline: it is
    killed and replaced, its answer counts as a timeout, and the other answers are graded."""
    with GradingPool(1, timeout_s=0.3) as pool:
        assert [g.correct for g in pool.grade([("\\boxed{1}", "1")])] == [True]  # the worker is up
        worker = pool._workers[0].proc
        os.kill(worker.pid, signal.SIGSTOP)
        t = time.perf_counter()
        got = pool.grade([("\\boxed{5}", "5"), ("\\boxed{6}", "6"), ("\\boxed{7}", "8")])
        assert time.perf_counter() - t < 30
        assert [g.status for g in got] == ["timeout", "correct", "wrong"]
        assert pool.replaced == 1 and worker.poll() is not None
        assert pool._workers[0].proc.pid != worker.pid


@pytest.mark.parametrize(
    "response, fallbacks, expected",
    [
        ("The final answer is $\\frac{1}{2}$.", ("answer_is",), "\\frac{1}{2}"),
        ("so the answer is 42\nthanks", ("answer_is",), "42"),
        ("work...\nAnswer: 17", ("answer_colon",), "17"),
        ("**Final Answer:** 9", ("answer_colon",), "9"),
        ("Natalia sold 48 clips.\n#### 72", ("hash",), "72"),
        ("it costs 1,250 dollars and then 3.5", ("last_number",), "3.5"),
        ("it costs 1,250 dollars", ("last_number",), "1250"),
        ("Answer: 17 but \\boxed{18}", ("answer_colon",), "18"),  # a box wins over every fall-back
        ("The answer is 5.", (), None),  # no fall-backs by default: the paper's rule
        ("<think>The answer is 5.", ("answer_is",), None),  # unfinished reasoning has no answer
        ("<think>hmm</think> The answer is 6.", ("answer_is",), "6"),
        ("nothing here", ("answer_is", "answer_colon", "hash"), None),
    ],
)
def test_answer_fallbacks(response, fallbacks, expected):
    assert extract_answer(response, fallbacks) == expected


def test_unknown_fallback_is_refused():
    with pytest.raises(ValueError, match="answer_iss"):
        extract_answer("x", ("answer_iss",))
    with pytest.raises(ValueError):
        GradingPool(0)


def test_threads_grading_at_once_do_not_wait_for_each_other():
    """A pathological grade in one thread does not hold up easy grades in others (each call has a worker)."""
    slow_done = threading.Event()
    slow = threading.Thread(target=lambda: (grade(PATHOLOGICAL, "3", timeout_s=30), slow_done.set()))
    slow.start()
    results = []
    easy = [threading.Thread(target=lambda: results.append(grade("\\boxed{\\frac12}", "0.5"))) for _ in range(3)]
    for th in easy:
        th.start()
    for th in easy:
        th.join(timeout=25)
    assert results == [True, True, True] and not slow_done.is_set()
    slow.join(timeout=60)
