"""Answer extraction (METHOD.md, "Evaluation protocol"): which part of a response is its final answer.

The searched text is what follows the last ``</think>``; a response that opens ``<think>`` and never
closes it has no answer (its reasoning is unfinished, and an answer inside reasoning does not count);
a response without either tag is searched whole. The answer is the content of the last complete
``\\boxed{...}`` or ``\\fbox{...}`` in that text, braces nested (or of a bare ``\\boxed 5``, as MATH's
solutions write one-token answers). When there is none, the named
fall-backs are tried in the order given (none by default, the paper's protocol):

- ``answer_is``: "The (final) answer is X" (last occurrence; X up to the end of the line or sentence);
- ``answer_colon``: a line "Answer: X" / "Final answer: X" (last occurrence);
- ``hash``: "#### X", GSM8K's answer line;
- ``last_number``: the last number in the text.

Only the standard library is imported here.
"""

from __future__ import annotations

import re

__all__ = ["FALLBACKS", "extract_answer", "searched_text", "check_fallbacks"]

_BOXED = ("\\boxed{", "\\fbox{")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"

_STRIP_MATH = re.compile(r"^\s*(?:\$+|\\\(|\\\[)\s*|\s*(?:\$+|\\\)|\\\])\s*$")

FALLBACKS: dict[str, re.Pattern] = {
    # "The final answer is $x$." -> x ; stops at a newline, or at a period followed by space/end.
    "answer_is": re.compile(r"(?i)the\s+(?:final\s+)?answer\s+is\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.M),
    "answer_colon": re.compile(r"(?im)^\s*\**\s*(?:final\s+)?answer\s*\**\s*:\s*\**\s*(.+?)\s*\**\s*$"),
    "hash": re.compile(r"(?m)^\s*####\s*(.+?)\s*$"),
    "last_number": re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?"),
}


def check_fallbacks(fallbacks) -> tuple[str, ...]:
    """The fall-back names as a tuple; ``ValueError`` naming the unknown ones."""
    names = (fallbacks,) if isinstance(fallbacks, str) else tuple(fallbacks or ())
    unknown = [f for f in names if f not in FALLBACKS]
    if unknown:
        raise ValueError(f"unknown answer fall-back {', '.join(map(repr, unknown))}: expected any of "
                         f"{', '.join(FALLBACKS)}")
    return names


def searched_text(response: str) -> str | None:
    """The part of ``response`` an answer is taken from: after the last ``</think>``; None when a
    ``<think>`` is left open (before any ``</think>``, or reopened after the last one); else the whole
    response."""
    text = response.rsplit(_THINK_CLOSE, 1)[1] if _THINK_CLOSE in response else response
    return None if _THINK_OPEN in text else text


_BARE_BOX = re.compile(r"\\boxed +([^\s${}\\]+)")  # MATH's "\boxed 5": one token, no braces


def _last_boxed(text: str) -> str | None:
    found: tuple[int, str] | None = None
    for m in _BARE_BOX.finditer(text):
        found = (m.start(), m.group(1))
    for opener in _BOXED:
        start = text.find(opener)
        while start != -1:
            i = start + len(opener)
            depth, j = 1, i
            while j < len(text) and depth:
                c = text[j]
                if c == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
                    j += 2  # an escaped brace (\{ of a set) does not open or close the box
                    continue
                depth += 1 if c == "{" else -1 if c == "}" else 0
                j += 1
            if depth == 0 and (found is None or start > found[0]):
                found = (start, text[i : j - 1].strip())
            start = text.find(opener, start + 1)
    return None if found is None else found[1]


def _clean(answer: str) -> str:
    answer = _STRIP_MATH.sub("", answer.strip())
    return answer.strip().rstrip(".").strip()


def extract_answer(response: str, fallbacks=()) -> str | None:
    """The final answer of ``response`` (see the module docstring), or None when it has none.

    Args:
        response: the model's text (special tokens removed).
        fallbacks: names from :data:`FALLBACKS`, tried in order when there is no box.

    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; an unclosed ``\\boxed{`` and an empty box give no
    answer from the box.
    """
    if not isinstance(response, str):
        return None
    text = searched_text(response)
    if text is None:
        return None
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    for name in check_fallbacks(fallbacks):
        matches = FALLBACKS[name].findall(text)
        if matches:
            got = _clean(matches[-1])
            if name == "last_number":
                got = got.replace(",", "")
            if got:
                return got
    return None
