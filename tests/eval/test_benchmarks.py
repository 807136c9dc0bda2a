"""Benchmark loaders on small fixture files in each public release's schema (tests/eval/fixtures/, described
in SCHEMAS.md), the training format, field mappings, built-in tasks, and errors naming file and record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdkit.data import DataError
from opdkit.eval.benchmarks import DEFAULT_TEMPLATE, load_benchmark, load_benchmarks, parse_benchmark_spec

FIX = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "name, file, golds, problem_start",
    [
        ("math500", "math500.jsonl", ["49", "[2,3]", "\\frac{1}{9}"], "What is the value of $3^4 - 2^5$?"),
        ("aime24", "aime24.parquet", ["400", "060", "403"], "Find the number of positive integers"),
        ("aime24", "aime24_maxwell.json", ["91", "8", "1"], "Positive reals $x,y$ satisfy"),
        ("aime25", "aime25.jsonl", ["31", "101", "144"], "Find the sum of all integers $b > 8$"),
        ("aime25", "aime25_opencompass.jsonl", ["31", "405", "432"], "Find the sum of all integers $b > 8$"),
        ("minerva", "minerva.jsonl", ["0.73", "347", "3 e^{-2 t}"], "A telescope has an effective focal"),
        # Qwen2.5-Math's copy has no answer column: the last \boxed{} of the solution (record 1 has two)
        ("minerva", "minerva_qwen.jsonl", ["0.73", "347", "3 e^{-2 t}"], "A telescope has an effective focal"),
        # final_answer is a list; "$...$" stripped; several answers stay comma-joined
        ("olympiadbench", "olympiadbench.jsonl", ["66", "-2,3", "2"], "Compute the number of positive integers"),
        # the worked solution's "#### 8,750" line gives the reference, commas removed
        ("gsm8k", "gsm8k.jsonl", ["33", "162", "8750"], "Maria buys 4 boxes of pencils."),
        ("gsm8k", "gsm8k.parquet", ["33", "162", "8750"], "Maria buys 4 boxes of pencils."),
    ],
)
def test_public_schemas_load(name, file, golds, problem_start):
    bench = load_benchmark(f"{name}={FIX / file}")
    assert bench.name == name and bench.grader is None
    assert [p.answer for p in bench.problems] == golds
    first = bench.problems[0]
    assert len(first.messages) == 1 and first.messages[0]["role"] == "user"
    text = first.messages[0]["content"]
    assert text.startswith(problem_start)
    assert text.endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    assert str(FIX / file) in first.source


def test_golds_grade_as_the_field_grades():
    """The references as loaded grade equal to the answers a model would box (AIME's zero padding included)."""
    from opdkit.eval import grade

    aime = load_benchmark(f"aime24={FIX / 'aime24.parquet'}")
    assert grade("\\boxed{60}", aime.problems[1].answer)
    oly = load_benchmark(f"olympiadbench={FIX / 'olympiadbench.jsonl'}")
    assert grade("\\boxed{-2, 3}", oly.problems[1].answer)
    math = load_benchmark(f"math500={FIX / 'math500.jsonl'}")
    assert grade("\\boxed{\\dfrac19}", math.problems[2].answer) and not grade("\\boxed{(2,3)}", "[2,3]")


def test_the_training_format_is_a_benchmark(tmp_path):
    f = tmp_path / "train.jsonl"
    rows = [{"prompt": "What is 2+2?", "answer": 4},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
             "answer": "2"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = load_benchmark(str(f))
    assert bench.name == "train"
    assert bench.problems[0].messages == ({"role": "user", "content": "What is 2+2?"},)  # used as it is
    assert bench.problems[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert [p.answer for p in bench.problems] == ["4", "2"]


def test_field_mapping_template_and_system(tmp_path):
    f = tmp_path / "custom.json"
    f.write_text(json.dumps({"data": [{"q": "Add 1 and 2.", "gold": "3", "label": "x"}]}))
    bench = load_benchmark(f"c={f}#prompt=q,answer=label", template="Q: {problem}\nA:", system="You are careful.")
    assert bench.problems[0].messages == ({"role": "system", "content": "You are careful."},
                                          {"role": "user", "content": "Q: Add 1 and 2.\nA:"})
    assert bench.problems[0].answer == "x"
    assert load_benchmark(f"c={f}", fields={"prompt": "q"}).problems[0].answer == "3"  # "gold" is known
    assert load_benchmark(f"c={f}", fields={"prompt": "q"}, max_problems=1).problems[0].source.endswith(
        "record 0 (0-based)")
    assert load_benchmark(f"c={f}#answer=label", fields={"prompt": "q", "answer": "gold"}).problems[0].answer == "x"
    with pytest.raises(DataError, match="mapped twice"):
        load_benchmark(f"c={f}#prompt=q,prompt=r")
    with pytest.raises(DataError, match="expected prompt=COLUMN"):
        load_benchmark(f"c={f}#solution=q")
    with pytest.raises(DataError, match="not to demo"):
        load_benchmark("d=demo#prompt=q")


def test_references_from_solutions_lists_and_json_lines(tmp_path):
    f = tmp_path / "sol.jsonl"  # an answer column that holds a worked solution: its last box
    f.write_text(json.dumps({"problem": "x", "sol": "so $\\boxed{2}$ then \\boxed{\\frac{1}{2}}."}) + "\n")
    assert load_benchmark(f"s={f}#answer=sol").problems[0].answer == "\\frac{1}{2}"
    f = tmp_path / "ob.jsonl"
    f.write_text(json.dumps({"question": "q", "final_answer": ["$1$, $2$"]}) + "\n")
    assert load_benchmark(f"o={f}").problems[0].answer == "1, 2"
    f = tmp_path / "gsm8k.jsonl"  # a benchmark named gsm8k needs its "#### N" line
    f.write_text(json.dumps({"question": "q", "answer": "no hash here"}) + "\n")
    with pytest.raises(DataError, match="line 1: field 'answer' has no '#### N' line"):
        load_benchmark(str(f))
    f = tmp_path / "lines.json"  # JSON Lines in a .json file, as some releases ship
    f.write_text(json.dumps({"problem": "a", "answer": "1"}) + "\n" + json.dumps({"problem": "b", "answer": "2"}))
    assert [p.answer for p in load_benchmark(str(f)).problems] == ["1", "2"]


def test_the_config_default_template_is_the_loaders():
    from opdkit.config import EvalConfig

    assert EvalConfig().prompt_template == DEFAULT_TEMPLATE


@pytest.mark.parametrize(
    "content, suffix, fields, message",
    [
        ('{"problem": "x"}\n{"question": "y", "answer": "1"}\n', ".jsonl", None, "line 1: no reference answer"),
        ('{"answer": "1"}\n', ".jsonl", None, "line 1: no problem field"),
        ('{"q": "x", "answer": "1"}\n', ".jsonl", {"prompt": "question"}, "no problem field ('question'"),
        ('[{"problem": "x", "answer": "1"}, {"problem": "y", "answer": ""}]', ".json", None,
         "record 1 (0-based): field 'answer' is empty"),
        ('[{"problem": "x", "answer": "1"}, 3]', ".json", None, "record 1 (0-based): expected a JSON object"),
        ('{"problem": "x", "answer": true}\n', ".jsonl", None, "'answer' must be text or a number, got bool"),
        ('{"problem": "x", "answer": {"v": 1}}\n', ".jsonl", None, "'answer' must be text or a number, got dict"),
        ('{"problem": "x", "answer": NaN}\n', ".jsonl", None, "'answer' is nan"),
        ('{"problem": {"x": 1}, "answer": "1"}\n', ".jsonl", None, "'problem' must be the problem's text, got dict"),
        ('{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": "1"}\n',
         ".jsonl", None, "ends with an assistant message"),
        ('{"problem": "x", "answer": "see \\\\boxed{"}\n', ".jsonl", None, "empty or never closed"),
        ('{"a": [], "b": []}', ".json", None, "exactly one array"),
        ('[{"problem": "x",\n "answer": }]', ".json", None, "line 2: not valid JSON"),
        ('{"problem": "", "answer": "1"}\n', ".jsonl", None, "empty problem"),
        ('{"problem": "x", "final_answer": []}\n', ".jsonl", None, "empty list"),
        ("problem,answer\n", ".csv", None, "unknown format '.csv'"),
        ("", ".jsonl", None, "holds no problems"),
        ("\x00\x01binary", ".parquet", None, "not a readable Parquet file"),
    ],
)
def test_bad_files_name_the_file_and_record(tmp_path, content, suffix, fields, message):
    f = tmp_path / f"bench{suffix}"
    f.write_text(content)
    with pytest.raises(DataError) as err:
        load_benchmark(f"b={f}", fields=fields)
    assert message in str(err.value) and str(f) in str(err.value)


def test_bad_specs_and_names(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_benchmark(f"b={tmp_path / 'missing.jsonl'}")
    with pytest.raises(DataError, match="no file or dataset"):
        load_benchmark("b=")
    with pytest.raises(DataError, match="must be letters"):
        parse_benchmark_spec("my bench=x.jsonl")
    with pytest.raises(DataError, match="must contain \\{problem\\}"):
        load_benchmark(f"m={FIX / 'math500.jsonl'}", template="no placeholder")
    with pytest.raises(DataError, match="unknown field mapping"):
        load_benchmark(f"m={FIX / 'math500.jsonl'}", fields={"solution": "x"})
    with pytest.raises(DataError, match="is reserved"):
        parse_benchmark_spec("average=x.jsonl")
    with pytest.raises(DataError, match="the built-ins are demo and rg:TASK"):
        load_benchmark("dmeo")
    with pytest.raises(DataError, match="two benchmarks are named m"):
        load_benchmarks([f"m={FIX / 'math500.jsonl'}", f"m={FIX / 'gsm8k.jsonl'}"])
    assert parse_benchmark_spec("rg:chain_sum") == ("chain_sum", "rg:chain_sum")
    assert parse_benchmark_spec("data/aime.parquet") == ("aime", "data/aime.parquet")


def test_datasets_by_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load dataset 'nobody/no-such-dataset' split 'test'.*local file"):
        load_benchmark("x=hf:nobody/no-such-dataset")


def test_builtin_demo_task():
    bench = load_benchmark("demo", max_problems=5)
    assert bench.name == "demo" and len(bench.problems) == 5
    from opdkit.demo.task import make_problems

    assert [p.answer for p in bench.problems] == [p.answer for p in make_problems(5, 0, "eval")]


def test_builtin_reasoning_gym_task_uses_its_own_verifier():
    bench = load_benchmark("arith=rg:chain_sum", max_problems=4, seed=3)
    assert bench.name == "arith" and len(bench.problems) == 4 and bench.grader is not None
    gold = bench.problems[0].answer
    assert bench.grader(f"<think>adding</think> \\boxed{{{gold}}}", 0)
    assert not bench.grader(f"\\boxed{{{int(gold) + 1}}}", 0)
    assert not bench.grader("no answer", 0)
    assert "\\boxed{}" in bench.problems[0].messages[0]["content"]
    again = load_benchmark("arith=rg:chain_sum", max_problems=4, seed=3)
    assert [p.messages for p in again.problems] == [p.messages for p in bench.problems]  # procedural, seeded
    with pytest.raises(DataError, match="did you mean chain_sum"):
        load_benchmark("rg:chain_summ")
