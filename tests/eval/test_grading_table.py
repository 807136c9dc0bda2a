"""A grading table for ``opdkit.eval.grade(response, gold) -> bool``.

This table was written from the *specification* of ``grade`` only, independently of its implementation
(the code under ``src/opdkit/eval/`` was deliberately not read while writing it). The contract it checks:

* Answer extraction: if the response contains ``</think>``, only the text after the LAST ``</think>`` is
  searched; a ``<think>`` without any ``</think>`` (unfinished reasoning) has no answer. The answer is the
  content of the LAST complete ``\\boxed{...}`` or ``\\fbox{...}`` (braces nest). With default settings there
  are no fall-backs: a response without a box has no answer and grades False.
* Grading is symbolic equivalence as the math-reasoning field grades it (HF math-verify; MATH/Minerva
  normalisation conventions): fractions vs decimals, percentages, roots, pi, intervals, sets, tuples,
  units and degrees, text answers, LaTeX spacing, thousands separators, ``x = 3`` vs ``3``, equivalent
  algebraic forms, negatives, infinity.
* Gold answers are bare LaTeX as in MATH500 (no dollars, no box); a few come with ``$...$`` or ``\\boxed{}``.

Only clear-cut cases are listed (ones where math-verify and the MATH/Minerva conventions agree). Each row is
``(response, gold, expected, why)``; ``why`` is the test id.
"""

from __future__ import annotations

import pytest

from opdkit.eval import grade

# ---------------------------------------------------------------------------------------------------------
# Realistic, longer responses (Qwen-style "reason step by step", DeepSeek-R1-style <think> ... </think>).
# ---------------------------------------------------------------------------------------------------------

QWEN_QUADRATIC = (
    "To solve the equation $x^2 - 5x + 6 = 0$, we factor the quadratic.\n\n"
    "Step 1: We look for two numbers whose product is $6$ and whose sum is $-5$. These are $-2$ and $-3$.\n\n"
    "Step 2: So $x^2 - 5x + 6 = (x-2)(x-3)$.\n\n"
    "Step 3: Setting each factor to zero gives $x = 2$ or $x = 3$.\n\n"
    "The problem asks for the sum of the squares of the roots, so we compute $2^2 + 3^2 = 4 + 9 = 13$.\n\n"
    "Therefore, the final answer is $\\boxed{13}$."
)

QWEN_PROBABILITY = (
    "Let's reason step by step.\n\n"
    "There are $\\binom{6}{2} = 15$ ways to choose two of the six marbles. "
    "The number of ways to choose two red marbles is $\\binom{3}{2} = 3$.\n\n"
    "So the probability is\n\\[\n\\frac{3}{15} = \\frac{1}{5}.\n\\]\n\n"
    "The final answer is $\\boxed{\\dfrac{1}{5}}$."
)

QWEN_PROBABILITY_WRONG = (
    "Let's reason step by step.\n\n"
    "There are $6 \\cdot 5 = 30$ ordered ways to draw two marbles, and $3 \\cdot 2 = 6$ of them are both red.\n\n"
    "I will (incorrectly) divide by the unordered count: $\\frac{6}{15} = \\frac{2}{5}$.\n\n"
    "The final answer is $\\boxed{\\frac{2}{5}}$."
)

QWEN_GEOMETRY = (
    "The diagonal of a square with side length $s$ is $s\\sqrt{2}$ by the Pythagorean theorem, since\n"
    "$$d^2 = s^2 + s^2 = 2s^2 \\implies d = \\sqrt{2s^2} = s\\sqrt{2}.$$\n"
    "With $s = 2$ we get $d = 2\\sqrt{2}$, which can also be written $\\sqrt{8}$.\n\n"
    "**Final Answer**\n\\[\n\\boxed{\\sqrt{8}}\n\\]"
)

QWEN_INTERVAL = (
    "We need $x - 1 > 0$ for the logarithm and $2 - x \\ge 0$ for the square root.\n"
    "The first gives $x > 1$, the second gives $x \\le 2$.\n"
    "Combining, the domain is $1 < x \\le 2$, i.e. the interval $\\left(1, 2\\right]$.\n\n"
    "The answer is $\\boxed{\\left(1,2\\right]}$."
)

QWEN_INTERVAL_OPEN = (
    "We need $x - 1 > 0$ for the logarithm and $2 - x > 0$ for the denominator.\n"
    "So $1 < x < 2$.\n\n"
    "The answer is $\\boxed{(1,2)}$."
)

R1_AREA = (
    "<think>\n"
    "Okay, so I need the area of a right triangle with legs 6 and 8. Area = (1/2)*6*8 = 24. "
    "Wait, let me double check: the hypotenuse is sqrt(36+64) = 10, and 6*8/2 = 24. Maybe \\boxed{48}? "
    "No, 48 is the product without halving. It is 24.\n"
    "</think>\n\n"
    "The legs are $6$ and $8$, so the area is $\\frac{1}{2} \\cdot 6 \\cdot 8 = 24$.\n\n"
    "\\[\n\\boxed{24}\n\\]"
)

R1_POLAR = (
    "<think>\n"
    "Convert (0,3) to polar. r = sqrt(0 + 9) = 3. The point is on the positive y-axis, so theta = pi/2.\n"
    "</think>\n\n"
    "**Solution.** We have $r = \\sqrt{0^2 + 3^2} = 3$ and $\\theta = \\frac{\\pi}{2}$, so the polar coordinates "
    "are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$."
)

R1_SUMMARY_WRONG = (
    "<think>\n"
    "We need 7 * 8 = 56. So the answer is \\boxed{56}. Hmm, but the question asks for 7 * 8 + 1.\n"
    "Let me recompute... I'll go with 58.\n"
    "</think>\n\n"
    "Computing, $7 \\cdot 8 + 1 = 58$.\n\n$\\boxed{58}$"
)

R1_ANSWER_ONLY_IN_THINK = "<think>\nLet me compute 2 + 3 = 5, so the answer is \\boxed{5}.\n</think>\n\nI am not sure."

R1_UNFINISHED = (
    "<think>\n"
    "Let me compute 2 + 3. That is 5, so \\boxed{5}. But wait, maybe I should check the problem statement again, "
    "because it might ask for something else. Let me reread it carefully"
)

R1_MULTIPLE_THINK_CLOSE = (
    "<think>\nFirst pass: the answer is \\boxed{9}.\n</think>\n"
    "Hmm, wait.</think>\n"
    "After re-checking, $3^2 = 9$ and we need $3^3 = 27$.\n\n\\boxed{27}"
)

LONG_CHAIN = (
    "We are told that $a + b = 10$ and $ab = 21$.\n\n"
    "First, $(a+b)^2 = a^2 + 2ab + b^2$, so $a^2 + b^2 = (a+b)^2 - 2ab = 100 - 42 = 58$.\n\n"
    "Next, $a^3 + b^3 = (a+b)(a^2 - ab + b^2) = 10 \\cdot (58 - 21) = 10 \\cdot 37 = 370$.\n\n"
    "Finally, we want $\\frac{a^3 + b^3}{a^2 + b^2} = \\frac{370}{58} = \\frac{185}{29}$.\n\n"
    "Thus the answer is $\\boxed{\\frac{185}{29}}$."
)

# (response, gold, expected, why)
CASES: list[tuple[str, str, bool, str]] = [
    # --- plain numbers -----------------------------------------------------------------------------------
    ("\\boxed{5}", "5", True, "plain integer matches"),
    ("The answer is \\boxed{ 42 }.", "42", True, "whitespace inside the box is ignored"),
    ("\\boxed{17}", "42", False, "different numbers entirely"),
    ("\\boxed{1000}", "100", False, "off by a factor of ten"),
    ("\\boxed{-7}", "-7", True, "negative integer matches"),
    ("\\boxed{-5}", "5", False, "wrong sign (negative answer, positive gold)"),
    ("\\boxed{5}", "-5", False, "wrong sign (positive answer, negative gold)"),
    ("\\boxed{2}", "2.0", True, "integer vs trailing-zero decimal"),
    ("\\boxed{2^{10}}", "1024", True, "power evaluates to the gold"),
    ("\\boxed{3 \\cdot 4}", "12", True, "product evaluates to the gold"),
    # --- fractions and decimals --------------------------------------------------------------------------
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5", True, "fraction answer, decimal gold"),
    ("\\boxed{0.5}", "\\frac12", True, "decimal answer, unbraced frac gold"),
    ("\\boxed{0.49}", "\\frac12", False, "near miss 0.49 vs one half"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "dfrac equals frac"),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", True, "tfrac equals decimal"),
    ("\\boxed{\\frac{5}{10}}", "\\frac12", True, "unreduced fraction equals reduced"),
    ("\\boxed{1/3}", "\\frac13", True, "slash fraction equals frac"),
    ("\\boxed{0.25}", "\\frac{1}{4}", True, "quarter as decimal"),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac12", True, "sign in numerator vs in front"),
    ("\\boxed{-\\frac{3}{2}}", "-1.5", True, "negative fraction vs negative decimal"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{4}{3}", False, "reciprocal is wrong"),
    ("\\boxed{\\frac{1}{3}}", "0.33", False, "one third vs a two-digit truncation"),
    ("\\boxed{\\frac{1}{2}}", "-\\frac{1}{2}", False, "fraction with wrong sign"),
    ("\\boxed{0.5}", "\\frac{1}{3}", False, "one half is not one third"),
    ("\\boxed{10^{-3}}", "0.01", False, "wrong power of ten"),
    # --- percentages ------------------------------------------------------------------------------------
    ("\\boxed{50\\%}", "50", True, "percent sign dropped against bare number"),
    ("\\boxed{50}", "50\\%", True, "bare number against percent gold"),
    ("\\boxed{0.5}", "50\\%", True, "decimal fraction against percent gold"),
    ("\\boxed{40\\%}", "50\\%", False, "different percentages"),
    ("\\boxed{0.5}", "5\\%", False, "one half is not five percent"),
    # --- roots ------------------------------------------------------------------------------------------
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True, "2 sqrt 2 equals sqrt 8"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True, "sqrt 8 equals 2 sqrt 2"),
    ("\\boxed{3\\sqrt{3}}", "\\sqrt{27}", True, "3 sqrt 3 equals sqrt 27"),
    ("\\boxed{\\sqrt{2}\\cdot\\sqrt{3}}", "\\sqrt6", True, "product of roots"),
    ("\\boxed{\\frac{1}{2}\\sqrt{3}}", "\\frac{\\sqrt3}{2}", True, "half root three in two forms"),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", True, "rationalised denominator"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True, "slash vs frac with a root"),
    ("\\boxed{2}", "2\\sqrt{2}", False, "dropped the root factor"),
    ("\\boxed{\\sqrt{2}}", "2", False, "root two is not two"),
    ("\\boxed{2\\sqrt{3}}", "3\\sqrt{2}", False, "swapped coefficient and radicand"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{2}}{2}", False, "wrong radicand"),
    ("\\boxed{\\sqrt{3}}", "3", False, "root three is not three"),
    ("\\boxed{-2\\sqrt{2}}", "2\\sqrt{2}", False, "root expression with wrong sign"),
    ("\\boxed{1.41}", "\\sqrt{2}", False, "1.41 is not root two"),
    # --- pi and other constants -------------------------------------------------------------------------
    ("\\boxed{\\pi \\cdot 2}", "2\\pi", True, "pi times two commutes"),
    ("\\boxed{\\frac{\\pi}{6}}", "\\frac{\\pi}{6}", True, "fraction of pi matches"),
    ("\\boxed{3.14}", "\\pi", False, "3.14 is not pi"),
    ("\\boxed{2\\pi}", "\\pi", False, "two pi is not pi"),
    ("\\boxed{2.718}", "e", False, "2.718 is not e"),
    ("\\boxed{\\frac{22}{7}}", "\\pi", False, "22/7 is not pi"),
    ("\\boxed{\\frac{\\pi}{3}}", "\\frac{\\pi}{6}", False, "wrong fraction of pi"),
    # --- infinity and intervals -------------------------------------------------------------------------
    ("\\boxed{\\infty}", "\\infty", True, "infinity matches"),
    ("\\boxed{-\\infty}", "\\infty", False, "minus infinity is not infinity"),
    ("\\boxed{(1,2]}", "(1,2]", True, "half-open interval matches"),
    ("\\boxed{(1,2)}", "(1,2]", False, "open vs half-open interval"),
    ("\\boxed{[1,2]}", "(1,2)", False, "closed vs open interval"),
    ("\\boxed{[0,1)}", "[0,1]", False, "half-open vs closed interval"),
    ("\\boxed{[0, 1]}", "[0,1]", True, "closed interval with spacing"),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", True, "interval to minus infinity"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty, 3)", False, "closed vs open endpoint at 3"),
    ("\\boxed{(0,\\infty)}", "[0,\\infty)", False, "open vs closed endpoint at 0"),
    ("\\boxed{\\left(1, 2\\right]}", "(1,2]", True, "left/right delimiters around an interval"),
    # --- sets and tuples --------------------------------------------------------------------------------
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", True, "sets are unordered"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,1,2\\}", True, "three-element set in another order"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", False, "set missing an element"),
    ("\\boxed{\\{1,2\\}}", "\\{1,3\\}", False, "set with a wrong element"),
    ("\\boxed{(1,2,3)}", "(1,2)", False, "tuple of the wrong length"),
    ("\\boxed{(2,1)}", "(1,2)", False, "tuples are ordered"),
    ("\\boxed{\\left(-2, \\frac{1}{2}\\right)}", "(-2,\\tfrac12)", True, "tuple with left/right and tfrac"),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True, "MATH500 polar tuple"),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False, "polar tuple with wrong angle"),
    # --- units, degrees, money, thousands ---------------------------------------------------------------
    ("\\boxed{30^\\circ}", "30", True, "degree sign dropped"),
    ("\\boxed{90^\\circ}", "45", False, "different angle"),
    ("\\boxed{10\\text{ cm}}", "10", True, "unit text dropped"),
    ("\\boxed{10\\text{ cm}}", "100", False, "unit dropped but wrong number"),
    ("\\boxed{\\$18.90}", "18.90", True, "dollar sign on money dropped"),
    ("\\boxed{1000}", "1,000", True, "thousands separator in the gold"),
    ("\\boxed{1,000}", "1000", True, "thousands separator in the answer"),
    ("\\boxed{1001}", "1,000", False, "near miss against a thousands-separated gold"),
    # --- text and multiple choice -----------------------------------------------------------------------
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True, "text answer matches"),
    ("\\boxed{Evelyn}", "\\text{Evelyn}", True, "bare word vs text-wrapped gold"),
    ("\\boxed{\\text{Alice}}", "\\text{Evelyn}", False, "different name"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True, "multiple-choice letter matches"),
    ("\\boxed{(C)}", "\\text{(C)}", True, "choice letter without text wrapper"),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", False, "wrong multiple-choice letter"),
    # --- equations and algebra --------------------------------------------------------------------------
    ("\\boxed{x = 3}", "3", True, "x = 3 against bare gold 3"),
    ("\\boxed{x = 4}", "3", False, "x = 4 against gold 3"),
    ("\\boxed{x = -3}", "3", False, "x = -3 against gold 3"),
    ("\\boxed{x^2}", "x^2", True, "identical polynomial"),
    ("\\boxed{x^3}", "x^2", False, "wrong exponent"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True, "expanded vs factored square"),
    ("\\boxed{x^2+1}", "(x+1)^2", False, "missing cross term"),
    ("\\boxed{y}", "x", False, "different variable"),
    ("\\boxed{2x+1}", "2x-1", False, "wrong sign of a term"),
    # --- LaTeX spacing ----------------------------------------------------------------------------------
    ("\\boxed{\\frac{1}{\\,2\\,}}", "\\frac12", True, "thin spaces inside a fraction"),
    ("\\boxed{\\!-\\!7}", "-7", True, "negative thin spaces around a sign"),
    ("\\[ \\boxed{\\frac{7}{2}} \\]", "3.5", True, "box inside display math"),
    # --- gold given with dollars or already boxed -------------------------------------------------------
    ("\\boxed{0.75}", "$\\frac{3}{4}$", True, "gold wrapped in dollars"),
    ("\\boxed{\\sqrt{8}}", "$2\\sqrt{2}$", True, "gold in dollars with a root"),
    ("\\boxed{12}", "$13$", False, "gold in dollars, wrong answer"),
    ("\\boxed{12}", "\\boxed{12}", True, "gold already boxed"),
    ("\\boxed{12}", "\\boxed{13}", False, "gold already boxed, wrong answer"),
    # --- extraction: which box counts -------------------------------------------------------------------
    ("\\fbox{12}", "12", True, "fbox is a box"),
    ("\\boxed{3}. Wait, actually \\boxed{4}", "4", True, "last box counts (later box right)"),
    ("\\boxed{5}. Hmm, no: \\boxed{6}", "5", False, "earlier correct box then later wrong box"),
    ("\\boxed{8}, or rather \\fbox{7}", "7", True, "last box counts across boxed and fbox"),
    ("\\fbox{7}, or rather \\boxed{8}", "7", False, "fbox then later wrong boxed"),
    ("\\boxed{}", "5", False, "empty box has no answer"),
    ("\\fbox{}", "5", False, "empty fbox has no answer"),
    ("\\boxed{5", "5", False, "unclosed box has no answer"),
    ("The answer is 5.", "5", False, "no box, answer in words only"),
    ("The answer is $5$.", "5", False, "no box, answer in dollars only"),
    ("**Final answer:** 5", "5", False, "no box, bold final answer only"),
    ("<think>2 + 3 = 5</think> So the answer is \\boxed{5}.", "5", True, "box after the think block"),
    ("<think>\\boxed{4}</think> The answer is \\boxed{5}.", "5", True, "box after think wins over box inside"),
    ("<think>\\boxed{5}</think>", "5", False, "box only in reasoning, nothing after"),
    (R1_ANSWER_ONLY_IN_THINK, "5", False, "R1 answer only inside the reasoning"),
    (R1_UNFINISHED, "5", False, "unfinished think with a box inside"),
    ("<think>So \\boxed{5} is it", "5", False, "unfinished think, short"),
    (R1_MULTIPLE_THINK_CLOSE, "27", True, "only text after the last think-close is searched"),
    (R1_MULTIPLE_THINK_CLOSE, "9", False, "box before the last think-close is ignored"),
    # --- realistic responses ----------------------------------------------------------------------------
    (QWEN_QUADRATIC, "13", True, "Qwen step-by-step, integer answer"),
    (QWEN_QUADRATIC, "5", False, "Qwen step-by-step, intermediate value is not the answer"),
    (QWEN_PROBABILITY, "\\frac{1}{5}", True, "Qwen probability with dfrac"),
    (QWEN_PROBABILITY, "0.2", True, "Qwen probability against decimal gold"),
    (QWEN_PROBABILITY_WRONG, "\\frac{1}{5}", False, "Qwen probability, wrong final box"),
    (QWEN_GEOMETRY, "2\\sqrt{2}", True, "Qwen geometry, root in another form"),
    (QWEN_INTERVAL, "(1,2]", True, "Qwen domain as half-open interval"),
    (QWEN_INTERVAL_OPEN, "(1,2]", False, "Qwen domain, open interval against half-open gold"),
    (LONG_CHAIN, "\\frac{185}{29}", True, "long chain of equations, fraction answer"),
    (LONG_CHAIN, "\\frac{370}{58}", True, "long chain, unreduced gold"),
    (LONG_CHAIN, "370", False, "long chain, intermediate value is not the answer"),
    (R1_AREA, "24", True, "R1 think then boxed summary"),
    (R1_AREA, "48", False, "R1 wrong candidate only inside the reasoning"),
    (R1_POLAR, "\\left( 3, \\frac{\\pi}{2} \\right)", True, "R1 polar coordinates tuple"),
    (R1_SUMMARY_WRONG, "56", False, "R1 correct box in reasoning, different box in summary"),
    (R1_SUMMARY_WRONG, "58", True, "R1 summary box counts"),
]


@pytest.mark.parametrize(
    "response, gold, expected",
    [pytest.param(r, g, e, id=why) for r, g, e, why in CASES],
)
def test_grading_table(response: str, gold: str, expected: bool) -> None:
    assert grade(response, gold) is expected


def test_grading_table_is_well_formed() -> None:
    whys = [why for *_, why in CASES]
    assert len(whys) == len(set(whys)), "ids must be unique"
    assert len(CASES) >= 90
    n_true = sum(e for _, _, e, _ in CASES)
    assert 0.35 <= n_true / len(CASES) <= 0.65, "keep the table roughly balanced"


# (response, gold, expected or None when only "returns a bool, does not raise" is specified)
ROBUSTNESS: list[tuple[str, str, bool | None, str]] = [
    ("\\boxed{5}", "5", True, "bool for a correct answer"),
    ("\\boxed{6}", "5", False, "bool for a wrong answer"),
    ("no box", "5", False, "bool for a missing answer"),
    ("\\boxed{\\frac{1}{2}}", "0.5", True, "bool for an equivalent form"),
    ("", "5", False, "empty response"),
    ("", "", False, "empty response and empty gold"),
    ("\\boxed{", "5", False, "only an opening box"),
    ("\\boxed{}", "", False, "empty box against empty gold"),
    ("\\boxed{5}", "", False, "empty gold grades False"),
    ("\\boxed{0}", "", False, "empty gold grades False even for zero"),
    ("Let me think about this carefully. " * 600 + "\\boxed{7}", "7", True, "20,000-character response"),
    ("x" * 20_000, "7", False, "20,000 characters without a box"),
    ("\\boxed{" + "1+" * 2_000 + "1}", "2001", None, "4,000-character box content"),
    ("答案是 \\boxed{５}。", "5", None, "unicode text and a full-width digit"),
    ("Die Lösung ist \\boxed{\\text{Größe}} — ✓ 🎉", "\\text{Größe}", None, "unicode inside a text answer"),
    ("\\boxed{α + β}", "α + β", None, "greek unicode letters"),
    ("\\boxed{\\frac{1}{0}}", "1", None, "division by zero in the answer"),
    ("\\boxed{5}", "\\frac{1}{0}", None, "division by zero in the gold"),
    ("\\boxed{}}}}{{{", "5", None, "unbalanced braces"),
    ("\\boxed{\\boxed{\\boxed{", "5", None, "nested unclosed boxes"),
    ("\\boxed{\\undefinedmacro{3}}", "3", None, "unknown LaTeX macro"),
    ("\\boxed{$$}", "5", None, "stray dollars in the box"),
    ("</think>", "5", False, "only a think-close"),
    ("<think>", "5", False, "only a think-open"),
    ("\x00\\boxed{5}\x00", "5", None, "NUL bytes around the box"),
    ("\\boxed{5}", "\\boxed{", None, "gold is an unclosed box"),
]


@pytest.mark.parametrize(
    "response, gold, expected",
    [pytest.param(r, g, e, id=why) for r, g, e, why in ROBUSTNESS],
)
def test_grade_returns_bool_and_never_raises(response: str, gold: str, expected: bool | None) -> None:
    result = grade(response, gold)
    assert type(result) is bool
    if expected is not None:
        assert result is expected
