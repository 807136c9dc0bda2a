"""Answer extraction, grading, and the sampling evaluator (avg@n, sharding over processes)."""

from __future__ import annotations

import pytest

from opdkit.data import PromptRecord
from opdkit.eval import EvalSettings, SamplingEvaluator, extract_answer, grade


@pytest.mark.parametrize(
    "response, answer",
    [
        ("<think>2+2</think> The answer is \\boxed{4}.", "4"),
        ("\\boxed{1} first, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("<think>\\boxed{7}</think> so \\fbox{8}", "8"),  # after </think> only
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_grade():
    assert grade("\\boxed{ 042 }", "42") and grade("\\boxed{$x+1$.}", "x + 1")
    assert not grade("\\boxed{41}", "42") and not grade("nothing", "42")


def _problems(n):
    return [PromptRecord(({"role": "user", "content": f"What is {i} + {i}?"},), str(2 * i)) for i in range(n)]


def test_sampling_evaluator_is_avg_at_n_and_shards_exactly(tiny_model_dirs):
    from opdkit.hf import load_causal_lm, load_tokenizer

    model = load_causal_lm(tiny_model_dirs["qwen2"])
    tok = load_tokenizer(tiny_model_dirs["qwen2"])
    problems = _problems(5)
    graded = []

    def grader(text, answer):  # every third answer "correct", deterministic in the text
        graded.append((text, answer))
        return len(text) % 3 == 0

    settings = EvalSettings(n_samples=2, max_new_tokens=6, batch_size=4, seed=3)
    whole = SamplingEvaluator(problems, settings, grader=grader).evaluate(model, tok)
    assert len(graded) == 10
    expected = sum(len(t) % 3 == 0 for t, _ in graded) / 10
    assert whole["eval_accuracy"] == pytest.approx(expected)
    # two "processes": each grades its share; summed counts give exactly the one-process numbers
    shares = []
    for rank in (0, 1):
        graded.clear()
        shares.append(SamplingEvaluator(problems, settings, grader=grader, rank=rank, world=2).evaluate(model, tok))
    # (without a reduce_sum, each share is its own count over all 10 answers: the shares add up)
    for key in ("eval_accuracy", "eval_response_length", "eval_truncation_rate"):
        assert shares[0][key] + shares[1][key] == pytest.approx(whole[key]), key


def test_evaluator_refuses_problems_without_answers():
    from opdkit.errors import InputError

    with pytest.raises(InputError, match="reference answer"):
        SamplingEvaluator([PromptRecord(({"role": "user", "content": "hi"},), None, source="f line 1")])
