"""`opdkit experiment NAME`: every experiment end to end on a toy budget (tiny random models in place of the
demo's), the gradient probe that must not move the weights, the end-swapped teacher, and bad input."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from opdkit.cli import main
from opdkit.experiments import EXPERIMENTS
from opdkit.experiments.report import CSV_COLUMNS, accuracy_interval

TOY = {"optim.prompts_per_step": 2, "rollout.n_samples": 2, "rollout.max_new_tokens": 6,
       "optim.micro_batch_size": 4}


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    from opdkit.demo.settings import DemoSettings

    settings = DemoSettings()
    settings = SimpleNamespace(**{k: getattr(settings, k) for k in ("eval_top_p", "eval_temperature",
                                                                     "eval_batch_size")}, max_new_tokens=6,
                               eval_problems=4)
    return SimpleNamespace(student_dir=tiny_model_dirs["qwen2"], teacher_dir=tiny_model_dirs["llama"],
                           tokenizer_dir=tiny_model_dirs["qwen2"], settings=settings)


def _arms(name):
    arms = EXPERIMENTS[name].arms
    picked = [arms[0], arms[-1]]
    if name == "special_tokens":  # one arm with the end-swapped teacher and the mask
        picked = [a for a in arms if a.name in ("same_eos", "swapped_mask")]
    return [a.name for a in picked]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_runs_end_to_end_on_a_toy_budget(tmp_path, models, name):
    from opdkit.experiments.runner import run_experiment

    arms = _arms(name)
    summary = run_experiment(name, tmp_path, models=models, steps=1, probe_batches=2, arms=arms, extra=TOY,
                             eval_problems=4, log=lambda _m: None)
    assert list(summary["arms"]) == arms
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["arm"] for r in rows] == arms
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["accuracy_ci_low"]) <= float(r["accuracy"])
        if EXPERIMENTS[name].probe:  # K = 1 renormalised: a KL over one token is 0, and so is its gradient
            assert float(r["grad_variance"]) == 0.0 if r["arm"] == "K=1" else float(r["grad_variance"]) > 0
    md = (tmp_path / "results.md").read_text()
    assert EXPERIMENTS[name].claim in md and all(a in md for a in arms)
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == name
    if name == "k_sweep":
        assert 8 <= summary["arms"]["topp=0.9_min=8"]["support_size"] <= 64
    if name == "special_tokens":
        assert "eos_swapped_teacher_accuracy" in summary


def test_the_probe_does_not_move_the_weights(tmp_path, models):
    from safetensors.torch import load_file

    from opdkit.experiments.arms import Arm
    from opdkit.experiments.runner import _config, _probe_arm

    cfg = _config(Arm("a", "a"), models.student_dir, models.teacher_dir, 3, 0, TOY)
    stats = _probe_arm(Arm("a", "a"), cfg, tmp_path / "probe", 3)
    assert stats["probe_batches"] == 3 and stats["grad_variance"] > 0
    before = load_file(models.student_dir / "model.safetensors")
    after = load_file(tmp_path / "probe" / "final" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_end_swapped_teacher_swaps_only_its_output_rows(tmp_path, models):
    from opdkit.experiments.runner import eos_swapped_teacher
    from opdkit.hf import load_causal_lm, load_tokenizer

    out = eos_swapped_teacher(models.teacher_dir, tmp_path / "swapped")
    tok = load_tokenizer(models.teacher_dir)
    a, b = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    old, new = load_causal_lm(models.teacher_dir), load_causal_lm(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    lo, ln = old(ids).logits, new(ids).logits
    assert torch.equal(lo[..., a], ln[..., b]) and torch.equal(lo[..., b], ln[..., a])
    keep = [i for i in range(lo.shape[-1]) if i not in (a, b)]
    assert torch.equal(lo[..., keep], ln[..., keep])
    # the demo's tokenizer names <|endoftext|> its unknown token: still a token of the vocabulary
    import shutil

    teacher = tmp_path / "unk_teacher"
    shutil.copytree(models.teacher_dir, teacher)
    tok.unk_token = "<|endoftext|>"
    tok.save_pretrained(teacher)
    assert load_tokenizer(teacher).unk_token_id == b
    eos_swapped_teacher(teacher, tmp_path / "swapped_unk")


def test_bad_input_is_refused_before_any_work(tmp_path, capsys):
    assert main(["experiment", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "expected one of k_sweep" in capsys.readouterr().err
    assert main(["experiment", "k_sweep", "--arms", "K=3", "--out", str(tmp_path / "a")]) == 2
    assert "K=3: not arms of k_sweep" in capsys.readouterr().err
    assert main(["experiment", "k_sweep", "--probe-batches", "1", "--out", str(tmp_path / "a")]) == 2
    busy = tmp_path / "mine"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    from opdkit.errors import OpdkitError
    from opdkit.experiments.runner import run_experiment

    with pytest.raises(OpdkitError, match="holds other files"):
        run_experiment("renormalization", busy, models=object())
    assert not (tmp_path / "a").exists()
    assert main(["experiment", "list"]) == 0
    assert "reward_imbalance" in capsys.readouterr().out


def test_accuracy_interval():
    lo, hi = accuracy_interval(0.5, 200)
    assert 0.43 < lo < 0.5 < hi < 0.57
    assert accuracy_interval(0.0, 10)[0] == 0.0


def test_an_experiment_folder_is_not_reused_by_another_experiment(tmp_path):
    from opdkit.errors import OpdkitError
    from opdkit.experiments.runner import MARKER, run_experiment

    (tmp_path / MARKER).write_text("created by opdkit experiment k_sweep\n")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(OpdkitError, match="another experiment's results"):
        run_experiment("renormalization", tmp_path, models=object())


def test_arm_names_can_be_given_to_arms():
    # --arms splits on commas: no arm name may hold one
    assert not [a.name for e in EXPERIMENTS.values() for a in e.arms if "," in a.name]


def test_a_rerun_keeps_finished_arms_and_an_interrupted_experiment_continues(tmp_path, models, monkeypatch):
    from opdkit.errors import OpdkitError
    from opdkit.experiments import runner
    from opdkit.interrupt import Interrupted

    kw = dict(models=models, steps=1, probe_batches=0, extra=TOY, eval_problems=4, log=lambda _m: None)
    real = runner._run_arm
    calls = []

    def stop_at_second(arm, *a, **k):
        calls.append(arm.name)
        if len(calls) == 2:
            raise Interrupted("stopped")
        return real(arm, *a, **k)

    monkeypatch.setattr(runner, "_run_arm", stop_at_second)
    with pytest.raises(Interrupted, match=r"stopped during arm not_renormalized; finished arms \(renormalized\) "
                                          r"are saved.*Continue with the same command"):
        runner.run_experiment("renormalization", tmp_path, **kw)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["arms"]) == ["renormalized"]
    monkeypatch.setattr(runner, "_run_arm", real)
    first = saved["arms"]["renormalized"]
    summary = runner.run_experiment("renormalization", tmp_path, **kw)  # continues: only the second arm runs
    assert list(summary["arms"]) == ["renormalized", "not_renormalized"]
    assert summary["arms"]["renormalized"] == first
    assert "renormalized" in (tmp_path / "results.md").read_text()
    with pytest.raises(OpdkitError, match=r"at other settings \(steps 1 -> 2\).*--fresh"):
        runner.run_experiment("renormalization", tmp_path, **{**kw, "steps": 2})
    again = runner.run_experiment("renormalization", tmp_path, **{**kw, "steps": 2}, fresh=True,
                                  arms=["renormalized"])
    assert list(again["arms"]) == ["renormalized"] and again["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["renormalized"]  # the discarded run is gone
