"""Answer extraction and grading (METHOD.md, "Evaluation protocol").

The answer of a response is the last complete ``\\boxed{...}`` of the text after ``</think>`` when there is
one (of the whole text otherwise). :func:`grade` compares it with the reference after normalising
whitespace, a trailing period and surrounding ``$``, as integers when both are integers, else as strings.
Symbolic equivalence (fractions, intervals, LaTeX variants) is not attempted by this grader.

Only the standard library is imported here.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "grade"]

_BOXED = ("\\boxed{", "\\fbox{")


def extract_answer(response: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) after ``</think>`` (whole text
    if there is no ``</think>``), else None.

    Braces nest: ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. An unclosed ``\\boxed{`` is ignored.
    """
    if not isinstance(response, str):
        return None
    text = response.rsplit("</think>", 1)[1] if "</think>" in response else response
    found: tuple[int, str] | None = None
    for opener in _BOXED:
        start = text.find(opener)
        while start != -1:
            i = start + len(opener)
            depth, j = 1, i
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth == 0 and (found is None or start > found[0]):
                found = (start, text[i : j - 1].strip())
            start = text.find(opener, start + 1)
    return None if found is None else found[1]


_INT = re.compile(r"[+-]?\d+")


def _normalise(s: str) -> str:
    s = re.sub(r"\s+", "", s).rstrip(".")
    if s.startswith("$") and s.endswith("$") and len(s) >= 2:
        s = s[1:-1]
    return s


def grade(response: str, gold: str) -> bool:
    """Whether the answer extracted from ``response`` equals ``gold`` (as integers when both are)."""
    got = extract_answer(response)
    if got is None:
        return False
    got, want = _normalise(got), _normalise(str(gold))
    if _INT.fullmatch(got) and _INT.fullmatch(want):
        return int(got) == int(want)
    return got == want
