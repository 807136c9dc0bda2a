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


def test_every_eval_setting_reaches_the_evaluator(tmp_path):
    """Each eval.* field (and data.eval_path's list form) changes what the trainer's evaluator does."""
    import json

    from opdkit.config import EvalConfig, load_config
    from opdkit.train.build import eval_benchmarks, eval_settings

    f = tmp_path / "b.jsonl"
    f.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(5)))
    base = {"data.eval_path": [f"one={f}", "demo"]}
    default = eval_settings(load_config(None, base))
    changed = {"n_samples": 3, "temperature": 0.7, "top_p": 0.5, "max_new_tokens": 9, "batch_size": 5,
               "answer_fallbacks": ["hash"], "grading_processes": 0, "grading_timeout_s": 1.5}
    for key, value in changed.items():
        s = eval_settings(load_config(None, {**base, f"eval.{key}": value}))
        attr = {"answer_fallbacks": "fallbacks", "grading_timeout_s": "grading_timeout_s"}.get(key, key)
        assert getattr(s, attr) != getattr(default, attr), key
    assert eval_settings(load_config(None, {**base, "eval.greedy": True})).rollout().top_k == 1
    assert eval_settings(load_config(None, {**base, "run.seed": 4})).seed == 4
    cfg = load_config(None, {**base, "eval.max_problems": 2, "eval.prompt_template": "Q {problem}"})
    benches = eval_benchmarks(cfg)
    assert [b.name for b in benches] == ["one", "demo"] and [len(b.problems) for b in benches] == [2, 2]
    assert benches[0].problems[0].messages[0]["content"] == "Q 0+1?"
    # eval.every_steps and eval.at_start are the loop's (tests/train); every field is covered here or there
    assert set(changed) | {"greedy", "max_problems", "prompt_template", "every_steps", "at_start"} == set(
        vars(EvalConfig()))


def test_plot_draws_each_benchmarks_accuracy(tmp_path):
    import json

    from opdkit.train.plots import plot_run

    rows = [{"step": s, "loss": 1.0 / s, "eval_accuracy": 0.1 * s, "eval_aime_accuracy": 0.05 * s,
             "eval_gsm8k_accuracy": 0.15 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.pyplot as plt

    drawn = []
    real = plt.subplots

    def spy(n, *a, **k):
        drawn.append(n)
        return real(n, *a, **k)

    plt.subplots = spy
    try:
        paths = plot_run(tmp_path)
    finally:
        plt.subplots = real
    assert any(p.name == "accuracy.png" for p in paths)
    assert 3 in drawn  # eval_accuracy and the two benchmarks' panels
