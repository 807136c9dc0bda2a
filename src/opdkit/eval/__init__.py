"""Evaluation: answer extraction, grading, benchmarks, metrics, and the evaluator the trainer calls.

Public, stable: ``opdkit.eval.extract_answer(response) -> str | None`` and
``opdkit.eval.grade(response, gold) -> bool`` (extraction plus symbolic grading, as ``opdkit eval`` uses them).
Importing this package is light: math-verify and torch are imported by the functions that need them.
"""

from opdkit.eval.answers import FALLBACKS, extract_answer
from opdkit.eval.grading import Grade, GradingPool, grade, grade_answer, grade_many

__all__ = [
    "FALLBACKS",
    "EvalSettings",
    "Evaluator",
    "Grade",
    "GradingPool",
    "SamplingEvaluator",
    "extract_answer",
    "grade",
    "grade_answer",
    "grade_many",
]


def __getattr__(name):
    if name in ("EvalSettings", "Evaluator", "SamplingEvaluator"):
        from opdkit.eval import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module 'opdkit.eval' has no attribute {name!r}")
