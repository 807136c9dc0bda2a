"""Evaluation throughput: grading answers per second (in this process, 1 and 2 worker processes), and the
split of an evaluation between generation and grading on the demo's teacher.

    .venv/bin/python benchmarks/eval_bench.py                      # builds the demo models if not cached
    .venv/bin/python benchmarks/eval_bench.py --answers 400 --problems 100 --n 2   # quicker

Part 1 grades the same list of (response, gold) pairs three ways, side by side in one run: serially in this
process (``grade_many(processes=0)``), in a ``GradingPool`` of 1 worker and of 2 workers (pool start-up, which
imports sympy in each worker, is timed separately). The pairs are MATH-style answers built from a seed:
fractions against decimals, roots, intervals, tuples, sets, percentages, π and text, half of them equivalent and
half near misses, each answer distinct so no cache helps. Part 2 evaluates the demo's teacher on the demo task
(``opdkit.eval.SamplingEvaluator.run``) and reports the seconds in generation and in grading, and the same
responses graded as if every one needed symbolic grading (the demo's integer answers take a fast path).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (response, gold) pairs of MATH-style answers; about half equivalent, half near misses."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b = rng.randint(1, 97), rng.randint(2, 89)
        b = b + 1 if b == a else b  # (a, b) and (b, a) must differ
        kind = i % 8
        right = i % 2 == 0
        if kind == 0:
            gold, ans = f"\\frac{{{a}}}{{{b}}}", f"{a / b:.12g}" if right else f"{a / b + 0.01:.6g}"
        elif kind == 1:
            gold, ans = f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}" if right else f"{a}\\sqrt{{{b + 1}}}"
        elif kind == 2:
            gold, ans = f"({a}, {a + b}]", f"({a},{a + b}]" if right else f"({a}, {a + b})"
        elif kind == 3:
            gold, ans = f"({a}, {b})", f"\\left( {a}, {b} \\right)" if right else f"({b}, {a})"
        elif kind == 4:
            gold, ans = f"\\{{{a}, {a + b}\\}}", f"\\{{{a + b}, {a}\\}}" if right else f"\\{{{a}, {a + b + 1}\\}}"
        elif kind == 5:
            gold, ans = f"{a}\\%", f"{a / 100:g}" if right else f"{a + 1}\\%"
        elif kind == 6:
            gold, ans = f"{a}\\pi", f"\\pi \\cdot {a}" if right else f"{a}\\pi^2"
        else:
            gold, ans = f"x^{{{a % 7 + 2}}} + {b}", f"{b} + x^{{{a % 7 + 2}}}" if right else f"x^{{{a % 7 + 3}}} + {b}"
        pairs.append((f"<think>working {i}</think> So the answer is $\\boxed{{{ans}}}$.", gold))
    return pairs


def bench_grading(n_answers: int, timeout_s: float) -> list[tuple[str, float, float, int]]:
    from opdkit.eval.grading import GradingPool, grade_many

    pairs = make_pairs(n_answers)
    rows = []
    grade_many(make_pairs(1, seed=1), processes=0)  # import math-verify and sympy here first, as a pool worker does
    t = time.perf_counter()
    serial = grade_many(pairs, processes=0, timeout_s=timeout_s)
    rows.append(("this process (serial)", 0.0, time.perf_counter() - t, sum(g.correct for g in serial)))
    for procs in (1, 2):
        t = time.perf_counter()
        pool = GradingPool(procs, timeout_s=timeout_s)
        pool.grade(pairs[:procs])  # start the workers (each imports math-verify and sympy)
        start = time.perf_counter() - t
        t = time.perf_counter()
        got = pool.grade(pairs)
        rows.append((f"pool of {procs}", start, time.perf_counter() - t, sum(g.correct for g in got)))
        pool.close()
        assert got == serial, "the pool graded differently from the serial path"
    return rows


def bench_split(problems: int, n: int, batch_size: int, cache_dir: str | None):
    import torch

    from opdkit.demo.cache import prepare_demo_models
    from opdkit.demo.models import load_demo_model, load_demo_tokenizer
    from opdkit.eval import EvalSettings, SamplingEvaluator
    from opdkit.eval.benchmarks import load_benchmark
    from opdkit.eval.grading import grade_many

    models = prepare_demo_models(cache_dir=cache_dir, log=lambda m: print(m, file=sys.stderr))
    model = load_demo_model(models.teacher_dir)
    tok = load_demo_tokenizer(models.tokenizer_dir)
    bench = load_benchmark("demo", max_problems=problems)
    ev = SamplingEvaluator([bench], EvalSettings(n_samples=n, max_new_tokens=models.settings.max_new_tokens,
                                                 batch_size=batch_size, grading_processes=2))
    timings: dict = {}
    t = time.perf_counter()
    samples = [s for b in ev.run(model, tok, ev.all_items(), timings=timings) for s in b]
    total = time.perf_counter() - t
    # the same responses against golds written as fractions (x/1): every grade goes through math-verify
    pairs = [(s.response, f"\\frac{{{int(s.gold) * 3}}}{{3}}") for s in samples]
    t = time.perf_counter()
    sym = grade_many(pairs, processes=2, min_parallel=1)
    sym_s = time.perf_counter() - t
    return {"samples": len(samples), "threads": torch.get_num_threads(), "total": total, **timings,
            "accuracy": sum(s.correct for s in samples) / len(samples), "symbolic_s": sym_s,
            "symbolic_agree": sum(g.correct == s.correct for g, s in zip(sym, samples)) / len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=1200, help="answers graded in part 1")
    ap.add_argument("--timeout", type=float, default=5.0, help="grading time limit per answer")
    ap.add_argument("--problems", type=int, default=200, help="demo problems in part 2 (0 = skip part 2)")
    ap.add_argument("--n", type=int, default=4, help="samples per problem in part 2")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--cache-dir", default=None, help="the demo's model cache (default ~/.cache/opdkit)")
    args = ap.parse_args()

    print(f"# grading {args.answers} MATH-style answers ({os.cpu_count()} CPUs)\n")
    rows = bench_grading(args.answers, args.timeout)
    base = rows[0][2]
    print("| grader | start-up s | grading s | answers/s | vs serial | correct |")
    print("|---|---|---|---|---|---|")
    for name, start, secs, correct in rows:
        print(f"| {name} | {start:.2f} | {secs:.2f} | {args.answers / secs:.0f} | {base / secs:.2f}x | {correct} |")
    if args.problems:
        r = bench_split(args.problems, args.n, args.batch_size, args.cache_dir)
        print(f"\n# demo teacher on the demo task: {args.problems} problems x {args.n} samples = {r['samples']} "
              f"answers, {r['threads']} torch threads, accuracy {r['accuracy']:.1%}\n")
        print("| part | seconds | share |")
        print("|---|---|---|")
        for name, key in (("generation", "generate_s"), ("grading (integer fast path)", "grade_s")):
            print(f"| {name} | {r[key]:.2f} | {r[key] / r['total']:.1%} |")
        print(f"| whole evaluation | {r['total']:.2f} | 100% |")
        print(f"| the same answers graded symbolically (pool of 2) | {r['symbolic_s']:.2f} | "
              f"{r['symbolic_s'] / (r['generate_s'] + r['symbolic_s']):.1%} of generation + it |")
        print(f"\nsymbolic and fast-path grades agree on {r['symbolic_agree']:.1%} of the answers")


if __name__ == "__main__":
    main()
