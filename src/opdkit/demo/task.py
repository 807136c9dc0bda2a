"""The demo's task: short arithmetic word-free problems with a verifiable integer answer.

Every problem is a left-to-right chain of two operations on small integers, and its worked solution
writes one equation per operation inside ``<think>...</think>`` before the boxed answer, e.g.::

    What is 17 + 28 + 19?
    <think>17 + 28 = 45. 45 + 19 = 64.</think> The answer is \\boxed{64}.

The kinds are ``a + b + c`` and ``a * b + c`` (one-digit factors) by default; ``a + b - c`` and
``a - b + c`` (``b <= a``) can be added. Every intermediate value is a non-negative integer; the operand
range and the kinds are set by :class:`TaskSpec`. The tokenizer splits numbers digit by digit
(Qwen2's pre-tokenizer), so each equation is a few digit tokens that the model must get right.

Splits: a problem belongs to ``"eval"`` when a hash of its expression falls in the eval bucket
(``TaskSpec.eval_fraction`` of all expressions) and to ``"train"`` otherwise, so the two splits never
share an expression whatever the seeds, and ``make_problems`` is a pure function of its arguments.
Grading follows METHOD.md: the answer is the last ``\\boxed{...}`` of the text after ``</think>`` when
there is one (of the whole text otherwise), compared as an integer.

Only the standard library is imported here.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from opdkit.errors import InputError
from opdkit.eval.answers import extract_answer
from opdkit.eval.grading import grade

__all__ = [
    "TaskSpec",
    "Problem",
    "make_problems",
    "chat_messages",
    "chatml_text",
    "extract_answer",
    "is_correct",
    "accuracy",
    "corpus_for_tokenizer",
    "SPLITS",
    "KINDS",
]

SPLITS = ("train", "eval")
KINDS = ("add_add", "mul_add", "add_sub", "sub_add")
_PROMPTS = ("What is {expr}?", "Compute {expr}.", "Calculate {expr}.", "Evaluate {expr}.")


@dataclass(frozen=True)
class TaskSpec:
    """How hard the problems are (the demo's settings hold one; its fields enter the cache hash).

    Attributes:
        kinds: the problem kinds drawn (uniformly): ``"add_add"`` (``a + b + c``), ``"mul_add"``
            (``a * b + c``), ``"add_sub"`` (``a + b - c``), ``"sub_add"`` (``a - b + c``). The default
            leaves out the subtractions: borrows are much slower for a tiny model to learn.
        max_operand: additive operands are drawn from ``[min_operand, max_operand]``.
        min_operand: smallest additive operand.
        max_factor: the factors of ``a * b + c`` are drawn from ``[2, max_factor]``.
        eval_fraction: share of all expressions reserved for the eval split (by hash).
    """

    kinds: tuple[str, ...] = ("add_add", "mul_add")
    max_operand: int = 30
    min_operand: int = 1
    max_factor: int = 9
    eval_fraction: float = 0.1

    def __post_init__(self):
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise InputError(f"task.kinds: expected a non-empty subset of {KINDS}, got {self.kinds!r}")
        if not 0 <= self.min_operand <= self.max_operand:
            raise InputError(
                f"task: expected 0 <= min_operand <= max_operand, got {self.min_operand}, {self.max_operand}"
            )
        if self.max_factor < 2:
            raise InputError(f"task.max_factor: expected >= 2, got {self.max_factor}")
        if not 0 < self.eval_fraction < 1:
            raise InputError(f"task.eval_fraction: expected a number in (0, 1), got {self.eval_fraction}")


DEFAULT_TASK = TaskSpec()


@dataclass(frozen=True)
class Problem:
    """One problem: the user prompt, the answer (an integer as a string), and a worked solution.

    ``expression`` (e.g. ``"17 + 28 + 19"``) identifies the problem and decides its split.
    """

    prompt: str
    answer: str
    solution: str
    expression: str


def _split_of(expression: str, spec: TaskSpec) -> str:
    digest = hashlib.sha256(expression.encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if bucket < spec.eval_fraction else "train"


def _draw(rng: random.Random, spec: TaskSpec) -> tuple[str, list[str], int]:
    """``(expression, equations, answer)`` of one random problem."""
    lo, hi = spec.min_operand, spec.max_operand
    kind = rng.choice(spec.kinds)
    if kind == "mul_add":
        a, b, c = rng.randint(2, spec.max_factor), rng.randint(2, spec.max_factor), rng.randint(lo, hi)
        ab = a * b
        return f"{a} * {b} + {c}", [f"{a} * {b} = {ab}", f"{ab} + {c} = {ab + c}"], ab + c
    a, b, c = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi)
    if kind == "sub_add":
        a, b = max(a, b), min(a, b)
        ab = a - b
        return f"{a} - {b} + {c}", [f"{a} - {b} = {ab}", f"{ab} + {c} = {ab + c}"], ab + c
    ab = a + b
    if kind == "add_add":
        return f"{a} + {b} + {c}", [f"{a} + {b} = {ab}", f"{ab} + {c} = {ab + c}"], ab + c
    c = min(c, ab)  # keep the answer non-negative
    return f"{a} + {b} - {c}", [f"{a} + {b} = {ab}", f"{ab} - {c} = {ab - c}"], ab - c


def make_problems(n: int, seed: int = 0, split: str = "train", spec: TaskSpec = DEFAULT_TASK) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "eval"), a pure function of the arguments."""
    if split not in SPLITS:
        raise InputError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InputError(f"n: expected an integer >= 0, got {n!r}")
    rng = random.Random(f"opdkit-demo-task/{split}/{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise InputError(f"n: the task has too few distinct {split} problems for n={n} (widen the TaskSpec)")
        expression, equations, value = _draw(rng, spec)
        if expression in seen or _split_of(expression, spec) != split:
            continue
        seen.add(expression)
        prompt = rng.choice(_PROMPTS).format(expr=expression)
        solution = f"<think>{'. '.join(equations)}.</think> The answer is \\boxed{{{value}}}."
        out.append(Problem(prompt=prompt, answer=str(value), solution=solution, expression=expression))
    return out


def chat_messages(problem: Problem) -> list[dict[str, str]]:
    """The chat prompt of ``problem``: a single user message."""
    return [{"role": "user", "content": problem.prompt}]


def chatml_text(problem: Problem, *, with_solution: bool = True) -> str:
    """``problem`` rendered in ChatML (as the demo tokenizer's template does), with its solution if asked."""
    text = f"<|im_start|>user\n{problem.prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text + f"{problem.solution}<|im_end|>\n" if with_solution else text


def is_correct(text: str, answer: str) -> bool:
    """Whether the answer extracted from ``text`` equals ``answer`` (``opdkit.eval.grade``)."""
    return grade(text, answer)


def accuracy(texts: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of ``texts`` whose answer is correct (0.0 for no texts)."""
    if len(texts) != len(answers):
        raise InputError(f"accuracy: got {len(texts)} texts but {len(answers)} answers")
    if not texts:
        return 0.0
    return sum(is_correct(t, a) for t, a in zip(texts, answers)) / len(texts)


# ------------------------------------------------------------------------------------------ tokenizer text
# Filler English so that the BPE learns a few hundred merges beyond the task's own (whole words), which
# makes the vocabulary large enough that a top-16 support set is a real truncation of the distribution.
_NOUNS = (
    "river mountain teacher student garden window kitchen market village forest winter summer morning "
    "evening number letter question answer problem system method result history picture doctor farmer "
    "city country island ocean bridge castle engine machine animal flower paper pencil school station "
    "friend family mother father brother sister child people water energy light sound music story "
    "planet rocket table chair house street train market bottle basket kettle candle blanket pocket"
).split()
_VERBS = (
    "finds carries builds counts reads writes paints opens closes moves watches follows explains "
    "measures checks solves adds divides learns teaches remembers forgets shares visits crosses lifts "
    "pushes pulls throws catches gathers collects prepares discovers describes compares"
).split()
_ADJS = (
    "small large quiet bright dark heavy light quick slow careful simple strange ancient modern green "
    "golden silver narrow wide gentle happy clever honest famous distant early late warm cold"
).split()
_ADVS = "slowly quickly carefully quietly happily often never always again together already".split()
_PREPS = "near under over behind beside across through inside around before after between".split()


def _sentence(rng: random.Random) -> str:
    def np_() -> str:
        det = rng.choice(("the", "a", "every", "one", "that", "this"))
        adj = f"{rng.choice(_ADJS)} " if rng.random() < 0.5 else ""
        return f"{det} {adj}{rng.choice(_NOUNS)}"

    s = f"{np_()} {rng.choice(_VERBS)} {np_()}"
    if rng.random() < 0.5:
        s += f" {rng.choice(_PREPS)} {np_()}"
    if rng.random() < 0.3:
        s += f" {rng.choice(_ADVS)}"
    if rng.random() < 0.3:
        s += f", and {rng.randint(2, 99)} {rng.choice(_NOUNS)}s are left"
    return s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?"))


def corpus_for_tokenizer(n: int, seed: int = 0, spec: TaskSpec = DEFAULT_TASK) -> list[str]:
    """``n`` training texts for the demo tokenizer: half task dialogues in ChatML, half filler English."""
    rng = random.Random(f"opdkit-demo-corpus/{seed}")
    n_task = n // 2
    texts = [chatml_text(p) for p in make_problems(n_task, seed=seed, split="train", spec=spec)]
    for _ in range(n - n_task):
        texts.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))))
    rng.shuffle(texts)
    return texts
