"""`opdkit eval` end to end on a tiny real model: samples, summary, table; continuation after an interruption
(a cut file, and a real SIGINT) equals an uninterrupted run; bad input refused before anything is written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opdkit.cli import main

EXE = str(Path(sys.executable).parent / "opdkit")
KEYS = {"benchmark", "problem", "sample", "prompt", "response", "answer", "gold", "correct", "status", "tokens",
        "truncated"}


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(4)))
    return path


def _args(model, bench, out, *extra):
    return ["eval", "--model", str(model), "--benchmark", f"sums={bench}", "--benchmark", "demo",
            "--max-problems", "3", "--out", str(out), "--max-new-tokens", "8", "--batch-size", "5", "--no-progress",
            *extra]


def _samples(out):
    return {(r["benchmark"], r["problem"], r["sample"]): r
            for r in map(json.loads, (Path(out) / "samples.jsonl").read_text().splitlines())}


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.out, cap.err


def test_eval_end_to_end_and_continuation(tmp_path, tiny_model_dirs, bench, capsys):
    model = tiny_model_dirs["qwen2"]
    out = tmp_path / "ev"
    code, stdout, _ = _run(capsys, _args(model, bench, out, "--n", "2"))
    assert code == 0
    assert "avg@n" in stdout and "sums" in stdout and "demo" in stdout and "average" in stdout
    samples = _samples(out)
    assert len(samples) == (3 + 3) * 2 and all(set(r) == KEYS for r in samples.values())
    first = samples[("sums", 0, 0)]
    assert "What is 0 + 0?" in first["prompt"] and "<|im_start|>" in first["prompt"] and first["gold"] == "0"
    summary = json.loads((out / "summary.json").read_text())
    for b in summary["benchmarks"]:
        rows = [r for r in samples.values() if r["benchmark"] == b["benchmark"]]
        assert b["problems"] == 3 and b["n"] == 2
        assert b["avg@n"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        assert set(b["pass@k"]) == {"1", "2"}
        assert b["response_length"] == pytest.approx(sum(r["tokens"] for r in rows) / len(rows))
    assert "| sums | 3 | 2 |" in (out / "summary.md").read_text()
    assert summary["seconds"]["samples"] == 12

    # a larger --n continues: the samples already drawn are kept, the new ones are those of a fresh --n 4 run
    code, _, err = _run(capsys, _args(model, bench, out, "--n", "4"))
    assert code == 0 and "12 samples already there, 12 to go" in err
    more = _samples(out)
    assert len(more) == 24 and all(more[k] == v for k, v in samples.items())
    fresh = tmp_path / "fresh"
    assert _run(capsys, _args(model, bench, fresh, "--n", "4"))[0] == 0
    assert _samples(fresh) == more  # identical lines, whatever the path to them
    assert json.loads((fresh / "summary.json").read_text())["benchmarks"] == json.loads(
        (out / "summary.json").read_text())["benchmarks"]

    # a file cut by a kill (half a line at the end) continues to the same samples
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in (".opdkit-eval", "eval.json"):
        (cut / name).write_bytes((fresh / name).read_bytes())
    lines = (fresh / "samples.jsonl").read_text().splitlines(keepends=True)
    (cut / "samples.jsonl").write_text("".join(lines[:7]) + lines[7][:30])
    assert _run(capsys, _args(model, bench, cut, "--n", "4"))[0] == 0
    assert _samples(cut) == more
    assert len((cut / "samples.jsonl").read_text().splitlines()) == 24  # no duplicate, no broken line

    # anything else that changes the samples already drawn is refused, and nothing is touched
    before = (out / "samples.jsonl").read_bytes()
    code, _, err = _run(capsys, _args(model, bench, out, "--n", "4", "--temperature", "0.5"))
    assert code == 2 and "changed: temperature (1.0 -> 0.5)" in err
    code, _, err = _run(capsys, _args(model, bench, out, "--n", "4", "--prompt-template", "Q: {problem}"))
    assert code == 2 and "benchmark sums's problems" in err
    assert (out / "samples.jsonl").read_bytes() == before


def test_sigint_keeps_the_samples_and_the_same_command_continues(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs["qwen2"]
    # enough problems that the signal always lands mid-run (the sampler answers a batch in ~0.1 s)
    args = ["eval", "--model", str(model), "--benchmark", "rg:chain_sum", "--max-problems", "200", "--n", "2",
            "--max-new-tokens", "24", "--batch-size", "4", "--no-progress", "--grading-processes", "0"]
    out = tmp_path / "ev"
    proc = subprocess.Popen([EXE, *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    samples = out / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not samples.exists() or len(samples.read_text().splitlines()) < 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "Run the same command to continue" in err and "Traceback" not in err
    kept = len(samples.read_text().splitlines())
    assert 8 <= kept < 400
    r = subprocess.run([EXE, *args, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{kept} samples already there" in r.stderr
    done = _samples(out)
    assert len(done) == 400 and len(samples.read_text().splitlines()) == 400
    assert {(p, j) for _, p, j in done} == {(p, j) for p in range(200) for j in range(2)}


def test_bad_input_is_refused_before_anything_is_written(tmp_path, tiny_model_dirs, bench, capsys):
    model = tiny_model_dirs["qwen2"]
    out = tmp_path / "ev"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{"problem": "y"}\n')
    code, _, err = _run(capsys, ["eval", "--model", str(model), "--benchmark", f"b={bad}", "--out", str(out)])
    assert code == 2 and f"{bad} line 2: no reference answer" in err
    assert not out.exists()
    code, _, err = _run(capsys, _args(tmp_path / "nomodel", bench, out))
    assert code == 2 and "nomodel" in err and not out.exists()
    code, _, err = _run(capsys, _args(model, bench, out, "--greedy", "--n", "2"))
    assert code == 2 and "greedy" in err and not out.exists()
    code, _, err = _run(capsys, _args(model, bench, out, "--n", "2", "--k", "3"))
    assert code == 2 and "--k 3" in err and not out.exists()
    code, _, err = _run(capsys, _args(model, bench, out, "--field", "solution=x"))
    assert code == 2 and "--field 'solution=x'" in err
    # a folder with the user's files is never written to
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = _run(capsys, _args(model, bench, mine))
    assert code == 2 and "not an opdkit evaluation" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, _args(model, bench, tmp_path / "afile"))
    assert code == 2 and "not a directory" in err


def test_greedy_is_deterministic(tmp_path, tiny_model_dirs, bench, capsys):
    model = tiny_model_dirs["qwen2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(capsys, _args(model, bench, a, "--greedy", "--seed", "1"))[0] == 0
    assert _run(capsys, _args(model, bench, b, "--greedy", "--seed", "2"))[0] == 0
    ra, rb = _samples(a), _samples(b)
    assert [r["response"] for r in ra.values()] == [r["response"] for r in rb.values()]


def test_one_evaluation_per_directory_and_recorded_precision(tmp_path, tiny_model_dirs, bench, capsys):
    import fcntl

    model = tiny_model_dirs["qwen2"]
    out = tmp_path / "ev"
    code, _, err = _run(capsys, _args(model, bench, out))
    assert code == 0 and "hit --max-new-tokens 8" in err  # a tiny random model runs to the budget: said
    settings = json.loads((out / "eval.json").read_text())["settings"]
    assert settings["precision"] == "fp32" and settings["device"] == "cpu"
    code, _, err = _run(capsys, _args(model, bench, out, "--precision", "bf16"))
    assert code == 2 and "precision ('fp32' -> 'bf16')" in err
    with open(out / ".opdkit-eval.lock", "a") as held:  # another process evaluating into the same --out
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _run(capsys, _args(model, bench, out, "--n", "2"))
    assert code == 2 and "another opdkit eval is writing to it" in err
    assert len(_samples(out)) == 6  # untouched


def test_prompts_longer_than_the_context_and_run_directories(tmp_path, tiny_model_dirs, capsys):
    model = tiny_model_dirs["qwen2"]
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n"
                    + json.dumps({"problem": "1 + " * context, "answer": "1"}) + "\n")
    code, _, err = _run(capsys, ["eval", "--model", str(model), "--benchmark", f"l={long}", "--out",
                                 str(tmp_path / "ev")])
    assert code == 2 and f"benchmark l, {long} line 2: the prompt is" in err and "model's context" in err
    assert not (tmp_path / "ev").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".opdkit-run").touch()
    (run / "final").mkdir()
    code, _, err = _run(capsys, ["eval", "--model", str(run), "--benchmark", "demo", "--out", str(tmp_path / "e")])
    assert code == 2 and f"--model {run / 'final'}" in err


def test_samples_lines_never_contain_characters_read_as_line_breaks():
    """A model's response may hold U+0085 / U+2028 / U+2029: str.splitlines() and some JSON Lines readers
    split there, so samples.jsonl escapes them (found when a random model's response broke a line)."""
    from opdkit.eval.run import _jsonl_line

    row = {"response": "a\u2028b\x85c\u2029d é ✓", "answer": None}
    line = _jsonl_line(row)
    assert line.endswith("\n") and len(line.splitlines()) == 1 and "é ✓" in line
    assert json.loads(line) == row
