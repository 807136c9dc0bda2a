"""Evaluation: answer extraction and grading, and the evaluator seam the trainer calls.

``opdkit.eval.extract_answer(response) -> str | None`` and ``opdkit.eval.grade(response, gold) -> bool``
are the public grading functions; :class:`SamplingEvaluator` measures avg@n on a problem set.
"""

from opdkit.eval.answers import extract_answer, grade
from opdkit.eval.evaluator import EvalSettings, Evaluator, SamplingEvaluator

__all__ = ["EvalSettings", "Evaluator", "SamplingEvaluator", "extract_answer", "grade"]
