"""Whether an extracted answer equals a reference answer: symbolic equivalence through math-verify.

:func:`equivalent` is the comparison, with no time limit of its own (callers bound it, see
:mod:`opdkit.eval.grading`). It tries, in order:

1. the same text after removing what never changes a value (spaces, ``\\left``/``\\right``, thin spaces,
   ``\\dfrac``/``\\tfrac``, surrounding ``$``) -> equal;
2. two integers -> compared as integers (decisive, no parsing);
3. math-verify: both sides wrapped as ``$\\boxed{...}$`` and parsed as LaTeX, then ``verify(gold, answer)``.
   The wrapping matters: math-verify reads a bare ``2\\sqrt{2}`` as ``2`` and cannot parse a bare
   ``(1,2]``; inside a box it reads the whole expression. A reference that already holds ``\\boxed{}``
   or ``$...$`` is unwrapped first;
4. when math-verify parses neither side (plain words, multiple-choice letters), the normalised texts with
   ``\\text{...}`` unwrapped are compared, ignoring case.

math-verify is called with its own signal-based time limits switched off (they only work in a main thread),
which is what makes this function safe in threads and worker processes.
"""

from __future__ import annotations

import logging
import re

__all__ = ["equivalent", "load", "normalise", "wrap_latex"]

_SPACING = re.compile(r"\\[,;:! ]|\\left\b|\\right\b|\\displaystyle\b|\s+")
_INT = re.compile(r"[+-]?\d+")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
_quiet = False


def normalise(s: str) -> str:
    """Remove what never changes a value: spacing commands, spaces, sizing, ``$`` around, a final period."""
    s = _SPACING.sub("", s.strip())
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].rstrip(".")
    return s


def _unwrap(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : -len(right)].strip()
    return s


def wrap_latex(s: str) -> str:
    """``s`` as math-verify should read it: one boxed LaTeX expression, ``$\\boxed{s}$``."""
    from opdkit.eval.answers import _last_boxed

    s = _unwrap(s)
    if "\\boxed{" in s or "\\fbox{" in s:
        s = _last_boxed(s) or s
    return "$\\boxed{" + s + "}$"


def load() -> None:
    """Import math-verify (and sympy) now, so that an import never runs inside a grade's time limit."""
    import math_verify  # noqa: F401
    import math_verify.parser  # noqa: F401

    _quiet_math_verify()


def _quiet_math_verify() -> None:
    # It logs a warning when its own time limits are off (we apply ours) and one per failed parse.
    global _quiet
    if not _quiet:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _quiet = True


def _parse(s: str):
    from math_verify import parse
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    return parse(wrap_latex(s), extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)


def equivalent(answer: str, gold: str) -> bool:
    """Whether ``answer`` (an extracted final answer) equals ``gold`` (a reference answer, bare LaTeX or
    text, as benchmark files give it). No time limit: see :func:`opdkit.eval.grading.grade_answer`."""
    a, g = normalise(answer), normalise(_unwrap(str(gold)))
    if not a or not g:
        return False
    if a == g:
        return True
    if _INT.fullmatch(a) and _INT.fullmatch(g):
        return int(a) == int(g)
    from math_verify import verify

    _quiet_math_verify()
    parsed_gold, parsed_answer = _parse(g), _parse(a)
    if parsed_gold and parsed_answer:
        return bool(verify(parsed_gold, parsed_answer, timeout_seconds=None))

    def plain(s: str) -> str:
        return _TEXT.sub(r"\1", s).replace("{", "").replace("}", "").lower()

    return plain(a) == plain(g)
