"""Evaluation metrics: avg@n, the unbiased pass@k estimator, confidence intervals, and their summary.

For a problem with ``n`` samples of which ``c`` are correct:

- avg@n = c / n (mean correctness; equal to the unbiased pass@1);
- pass@k = 1 - C(n - c, k) / C(n, k) for k <= n (Chen et al. 2021, "Evaluating Large Language Models
  Trained on Code"): the probability that at least one of k samples drawn without replacement from the n
  is correct, an unbiased estimate of the model's pass@k. Computed as a product, never with large binomials.

A benchmark's score is the mean over its P problems; its 95% confidence interval is the Wilson score
interval of that mean over P trials (z = 1.959964): it stays inside [0, 1] and keeps a width at 0% and
100% (a normal interval would read "100.0 (100.0–100.0)" from 20 problems). The problems are the sample.
With n = 1 each problem is a Bernoulli trial and this is the textbook Wilson interval; with n > 1 a
problem's score c/n lies in [0, 1], so its variance is at most mean·(1 − mean) and the interval is
conservative (the n samples per problem make each score less noisy, which it does not credit).
The average over benchmarks is the plain mean of the benchmark scores (each counts once, as papers
report it); its interval treats the benchmarks as independent: mean ± z·sqrt(Σ se_b²)/B, with se_b each
benchmark's Wilson half-width divided by z, clipped to [0, 1].

Only the standard library is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Z95", "default_ks", "pass_at_k", "summarise_benchmark", "summarise_average", "wilson"]

Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct of ``n`` samples (``1 <= k <= n``, ``0 <= c <= n``)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k: n, c, k must be integers, got {n!r}, {c!r}, {k!r}")
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: expected 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_ks(n: int) -> list[int]:
    """The k reported by default: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def wilson(mean: float, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``mean`` observed over ``trials`` trials."""
    if trials < 1:
        raise ValueError(f"wilson: expected trials >= 1, got {trials}")
    if not 0 <= mean <= 1:
        raise ValueError(f"wilson: expected 0 <= mean <= 1, got {mean}")
    z2 = z * z / trials
    center = (mean + z2 / 2) / (1 + z2)
    half = z / (1 + z2) * math.sqrt(mean * (1 - mean) / trials + z2 / (4 * trials))
    return max(0.0, center - half), min(1.0, center + half)


def summarise_benchmark(name: str, correct: Sequence[Sequence[bool]], *, ks: Sequence[int] | None = None,
                        lengths: Sequence[int] = (), truncated: Sequence[bool] = (),
                        statuses: Sequence[str] = ()) -> dict:
    """One benchmark's summary from ``correct[p][j]`` (problem p, sample j; every problem has the same n).

    Returns ``{"benchmark", "problems", "n", "avg@n", "avg@n_ci", "pass@k": {k: value}, "pass@k_ci": {k: [lo, hi]},
    "response_length", "truncation_rate", "no_answer_rate", "timeouts"}`` (intervals: Wilson over problems,
    see the module docstring); the per-sample lists
    (``lengths``, ``truncated``, ``statuses``) may be empty.
    """
    if not correct:
        raise ValueError(f"benchmark {name!r}: no problems to summarise")
    n = len(correct[0])
    if n == 0 or any(len(row) != n for row in correct):
        raise ValueError(f"benchmark {name!r}: every problem needs the same number (>= 1) of samples")
    ks = sorted({k for k in (ks or default_ks(n)) if 1 <= k <= n})
    counts = [sum(bool(x) for x in row) for row in correct]
    P = len(correct)
    avg = sum(counts) / (n * P)
    lo, hi = wilson(avg, P)
    out: dict = {"benchmark": name, "problems": P, "n": n, "avg@n": avg, "avg@n_ci": [lo, hi],
                 "pass@k": {}, "pass@k_ci": {}, "avg@n_se": (hi - lo) / (2 * Z95)}
    for k in ks:
        m = sum(pass_at_k(n, c, k) for c in counts) / P
        out["pass@k"][str(k)] = m
        out["pass@k_ci"][str(k)] = list(wilson(m, P))
    samples = len(correct) * n
    out["response_length"] = sum(lengths) / len(lengths) if lengths else None
    out["truncation_rate"] = sum(map(bool, truncated)) / len(truncated) if truncated else None
    out["no_answer_rate"] = sum(s == "no_answer" for s in statuses) / samples if statuses else None
    out["timeouts"] = sum(s == "timeout" for s in statuses) if statuses else None
    return out


def summarise_average(summaries: Sequence[dict]) -> dict:
    """The mean of the benchmarks' avg@n (each benchmark counts once) with its 95% interval."""
    b = len(summaries)
    if b == 0:
        raise ValueError("no benchmarks to average")
    mean = sum(s["avg@n"] for s in summaries) / b
    se = math.sqrt(sum(s["avg@n_se"] ** 2 for s in summaries)) / b
    return {"benchmarks": b, "avg@n": mean, "avg@n_ci": [max(0.0, mean - Z95 * se), min(1.0, mean + Z95 * se)]}
