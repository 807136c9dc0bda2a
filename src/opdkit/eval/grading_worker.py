"""A grading worker process (see :class:`opdkit.eval.grading.GradingPool`): reads ``[task, answer, gold]``
JSON lines on stdin, writes ``[task, status]`` lines on stdout, each grade bounded by its own interval
timer. Started as ``python -m opdkit.eval.grading_worker TIMEOUT_S``; it imports math-verify, never torch."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from opdkit.eval import equivalence
    from opdkit.eval.grading import _compare_here

    timeout_s = float(sys.argv[1])
    # import math-verify and sympy, and parse once, now: before the first deadline runs
    equivalence.equivalent("\\frac{1}{2}", "0.5")
    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        task, answer, gold = json.loads(line)
        out.write(json.dumps([task, _compare_here(answer, gold, timeout_s)]) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
