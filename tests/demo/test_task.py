"""The demo task: deterministic disjoint splits, answer extraction and grading, tokenizer coverage."""

from __future__ import annotations

import re

import pytest

from opdkit.demo.task import (
    KINDS,
    TaskSpec,
    accuracy,
    chat_messages,
    chatml_text,
    corpus_for_tokenizer,
    extract_answer,
    is_correct,
    make_problems,
)
from opdkit.errors import InputError


def _evaluate(expression: str) -> int:
    assert re.fullmatch(r"[\d +*-]+", expression)
    return eval(expression)  # noqa: S307 - digits and + - * only, checked above


def test_problems_are_deterministic_and_distinct():
    a = make_problems(300, seed=3)
    assert a == make_problems(300, seed=3)
    assert a != make_problems(300, seed=4)
    assert len({p.expression for p in a}) == 300
    assert make_problems(50, seed=3) == a[:50]  # a prefix of a longer draw


def test_splits_are_disjoint_whatever_the_seeds():
    train = {p.expression for s in range(3) for p in make_problems(2000, seed=s, split="train")}
    evals = {p.expression for s in range(3) for p in make_problems(300, seed=s, split="eval")}
    assert train.isdisjoint(evals)


@pytest.mark.parametrize("spec", [TaskSpec(), TaskSpec(kinds=KINDS, max_operand=60)])
def test_solutions_are_right_and_well_formed(spec):
    problems = make_problems(500, seed=0, spec=spec) + make_problems(200, seed=0, split="eval", spec=spec)
    kinds = {re.sub(r"\d+", "n", p.expression) for p in problems}
    assert len(kinds) == len(spec.kinds)
    for p in problems:
        value = _evaluate(p.expression)
        assert p.answer == str(value) and value >= 0
        assert p.expression in p.prompt
        assert p.solution.startswith("<think>") and p.solution.endswith(f"</think> The answer is \\boxed{{{value}}}.")
        for lhs, rhs in re.findall(r"(\d+ [-+*] \d+) = (\d+)", p.solution):
            assert _evaluate(lhs) == int(rhs)
        assert extract_answer(p.solution) == p.answer and is_correct(p.solution, p.answer)


def test_chat_messages_and_chatml():
    p = make_problems(1, seed=0)[0]
    assert chat_messages(p) == [{"role": "user", "content": p.prompt}]
    assert chatml_text(p) == (
        f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n{p.solution}<|im_end|>\n"
    )


def test_bad_arguments_fail_loudly():
    with pytest.raises(InputError, match="split"):
        make_problems(3, split="test")
    with pytest.raises(InputError, match="n:"):
        make_problems(-1)
    with pytest.raises(InputError, match="too few"):
        make_problems(100, split="eval", spec=TaskSpec(max_operand=2, min_operand=1, max_factor=2))
    with pytest.raises(InputError):
        TaskSpec(eval_fraction=0.0)
    with pytest.raises(InputError, match="kinds"):
        TaskSpec(kinds=("add_add", "divide"))
    with pytest.raises(InputError, match="texts"):
        accuracy(["a"], [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>2 + 2 = 4.</think> The answer is \\boxed{4}.", "4"),
        ("<think>maybe \\boxed{3}</think> The answer is \\boxed{4}.", "4"),  # boxed inside the thinking is ignored
        ("<think>only \\boxed{3} here</think> no box after", None),  # </think> present: look after it only
        ("\\boxed{1} then \\boxed{ 2 }", "2"),  # last box, stripped
        ("no box at all", None),
        ("", None),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{5} and an unclosed \\boxed{6", "5"),
        ("<think>unfinished thinking \\boxed{7}", None),  # unfinished reasoning: no answer
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_and_accuracy():
    assert is_correct("</think> The answer is \\boxed{66}.", "66")
    assert is_correct("\\boxed{066}", "66")  # compared as integers
    assert is_correct("\\boxed{ 66. }", "66")
    assert not is_correct("\\boxed{67}", "66")
    assert not is_correct("The answer is 66.", "66")  # unboxed answers do not count
    assert not is_correct("<think>\\boxed{66}</think> I am not sure.", "66")
    assert is_correct("\\boxed{x+1}", "x + 1")  # non-integers: compared without whitespace
    assert accuracy(["\\boxed{1}", "\\boxed{2}", "nothing", "\\boxed{4}"], ["1", "2", "3", "5"]) == 0.5
    assert accuracy([], []) == 0.0


def test_tokenizer_corpus_is_mixed_and_deterministic():
    texts = corpus_for_tokenizer(200, seed=0)
    assert texts == corpus_for_tokenizer(200, seed=0) and len(texts) == 200
    dialogues = [t for t in texts if t.startswith("<|im_start|>user\n")]
    assert len(dialogues) == 100
    assert len({w for t in texts if t not in dialogues for w in t.split()}) > 150  # varied filler English


@pytest.fixture(scope="module")
def demo_tokenizer():
    from opdkit.demo.models import DemoSettings
    from opdkit.tiny import train_tokenizer

    s = DemoSettings()
    return train_tokenizer(corpus_for_tokenizer(s.tokenizer_texts, seed=0, spec=s.task), s.vocab_size)


def test_demo_tokenizer_covers_the_task(demo_tokenizer):
    tok = demo_tokenizer
    assert len(tok) >= 500  # so that a top-16 support set is a real truncation
    problems = make_problems(300, seed=5) + make_problems(100, seed=5, split="eval")
    for p in problems:
        for text in (p.prompt, p.solution, chatml_text(p)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert tok.unk_token_id is None or tok.unk_token_id not in ids
    prompt = tok.apply_chat_template(chat_messages(problems[0]), tokenize=False, add_generation_prompt=True)
    assert prompt == chatml_text(problems[0], with_solution=False)
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    # the digits are single tokens (Qwen2's pre-tokenizer), so answers are written digit by digit
    assert len(tok("1234", add_special_tokens=False)["input_ids"]) == 4
