"""The trainer on real tiny Hugging Face models: every objective, resume, NaN handling, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opdkit.config import load_config
from opdkit.errors import OpdkitError
from opdkit.train import Trainer, TrainingAborted
from opdkit.train.metrics import METRICS, read_metrics
from opdkit.train.run_dir import RunDirError

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a in range(4) for b in range(4)]

TIMING_KEYS = {k for k in METRICS if k.startswith("time_")} | {"tokens_per_s"}


def _flat(cfg):
    from opdkit.config import config_to_dict

    return {f"{sec}.{k}": v for sec, fields in config_to_dict(cfg).items() for k, v in fields.items()}


def _cfg(dirs, **over):
    base = {
        "model.path": str(dirs["qwen2"]),
        "teacher.path": str(dirs["llama"]),
        "objective.top_k": 8,
        "rollout.max_new_tokens": 8,
        "rollout.n_samples": 2,
        "optim.prompts_per_step": 2,
        "optim.total_steps": 2,
        "optim.micro_batch_size": 3,
        "optim.mini_batches": 1,
        "optim.lr": 1e-2,
        "run.save_every": 1,
        "run.tensorboard": False,
    }
    base.update(over)
    if base.get("objective.kind") == "full_reverse_kl":  # its support is the whole vocabulary: no K
        base.pop("objective.top_k")
    return load_config(None, base)


def _params(path):
    from opdkit.hf import load_causal_lm

    return {n: p.detach().clone() for n, p in load_causal_lm(path).named_parameters()}


OBJECTIVES = [
    {"objective.kind": "support_kl"},
    {"objective.kind": "support_kl", "objective.fused": False},
    {"objective.kind": "support_kl", "objective.support": "student_topk"},
    {"objective.kind": "support_kl", "objective.support": "teacher_topk_plus_sampled"},
    {"objective.kind": "support_kl", "objective.renormalize": False},
    {"objective.kind": "support_kl", "objective.renormalize": False, "objective.tail_bucket": True},
    {"objective.kind": "support_kl", "objective.divergence": "forward_kl"},
    {"objective.kind": "support_kl", "objective.divergence": "jsd", "objective.jsd_beta": 0.3},
    {"objective.kind": "sampled_token", "objective.gamma": 0.0},
    {"objective.kind": "sampled_token", "objective.gamma": 1.0, "optim.mini_batches": 2},
    {"objective.kind": "full_reverse_kl"},
]


@pytest.mark.parametrize("over", OBJECTIVES, ids=lambda o: "-".join(f"{k.split('.')[-1]}={v}" for k, v in o.items()))
def test_two_steps_of_every_objective(tmp_path, tiny_model_dirs, over):
    before = _params(tiny_model_dirs["qwen2"])
    result = Trainer(_cfg(tiny_model_dirs, **over), tmp_path / "run", prompts=PROMPTS, progress=False).run()
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["skipped"] == 0
        keys = ["negative_reward_frac", "reward_skew", "k1", "entropy", "response_length", "truncation_rate",
                "tokens_per_s", "time_student_s", "special_masked_frac", "lr"]
        if over["objective.kind"] != "full_reverse_kl":  # its support is the whole vocabulary
            keys += ["teacher_support_mass", "student_support_mass", "sampled_outside_support_frac"]
        for key in keys:
            assert key in r and r[key] is not None, key
        assert set(r) <= set(METRICS), set(r) - set(METRICS)  # every logged name is declared once
    after = _params(result.final_dir)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (result.run_dir / "config.yaml").exists()


def test_resume_after_interruption_gives_identical_metrics(tmp_path, tiny_model_dirs):
    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 4, "run.save_every": 2, "run.tensorboard": True})
    Trainer(cfg, tmp_path / "straight", prompts=PROMPTS, progress=False).run()

    class Kill(Exception):
        pass

    def kill_after_three(step, metrics, trainer):
        if step == 3:  # after step 3 was logged, before its checkpoint would matter: the last one is step 2
            raise Kill

    with pytest.raises(Kill):
        Trainer(cfg, tmp_path / "killed", prompts=PROMPTS, progress=False).run(on_step=kill_after_three)
    assert len(read_metrics(tmp_path / "killed")) == 3
    resumed = Trainer(cfg, tmp_path / "killed", prompts=PROMPTS, resume=True, progress=False).run()
    a = read_metrics(tmp_path / "straight")
    b = read_metrics(resumed.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in a], [
        {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in b
    ]
    assert strip[0] == strip[1]
    # and the weights are the same
    pa, pb = _params(tmp_path / "straight" / "final"), _params(resumed.final_dir)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    # TensorBoard shows each step once: step 3, logged before the kill, was purged on resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "killed" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_nan_teacher_signal_is_skipped_and_counted_then_aborts(tmp_path, tiny_model_dirs):
    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 8, "optim.max_skipped_steps": 2, "run.save_every": 1})
    trainer = Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False)
    weight = trainer.teacher.model.get_output_embeddings().weight
    clean = weight.detach().clone()

    def poison(step, metrics, tr):
        with torch.no_grad():  # a real NaN in the teacher's weights from step 2 (inclusive) on
            if step == 1:
                weight[5, 0] = float("nan")

    with pytest.raises(TrainingAborted) as err:
        trainer.run(on_step=poison)
    msg = str(err.value)
    assert "step 4" in msg and "3 steps in a row" in msg and "step-000001" in msg
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [0, 1, 1, 1]
    assert rows[-1]["skipped_steps"] == 3
    assert rows[1]["skip_reason"] == "teacher_nan" and rows[1]["loss"] is None
    assert torch.isnan(weight).any() and not torch.isnan(clean).any()


def test_exported_model_reloads_and_generates(tmp_path, tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = Trainer(_cfg(tiny_model_dirs), tmp_path / "run", prompts=PROMPTS, progress=False).run()
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    ids = tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_run_directory_holding_a_run_is_refused(tmp_path, tiny_model_dirs):
    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 1})
    Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False).run()
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False)
    Trainer(cfg, tmp_path / "run", prompts=PROMPTS, overwrite=True, progress=False)  # allowed when asked
    with pytest.raises(RunDirError, match="no such run directory"):
        Trainer(cfg, tmp_path / "empty", prompts=PROMPTS, resume=True, progress=False)


def test_warmup_counts_training_steps(tmp_path, tiny_model_dirs):
    """optim.warmup_steps counts rollout batches: with 2 mini-batches per step, 2 warm-up steps are 4
    optimizer steps, so the lr after step 1 is half the base lr and full after step 2."""
    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 3, "optim.warmup_steps": 2, "optim.mini_batches": 2,
                                   "optim.lr": 1e-3, "run.save_every": 0})
    rows = read_metrics(Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False).run().run_dir)
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_an_error(tmp_path, tiny_model_dirs):
    with pytest.raises(OpdkitError, match="run.device: 'cuda' was asked for"):
        Trainer(_cfg(tiny_model_dirs, **{"run.device": "cuda"}), tmp_path / "run", prompts=PROMPTS, progress=False)
    assert not (tmp_path / "run").exists()


def test_missing_model_path_is_named(tmp_path, tiny_model_dirs):
    from opdkit.hf import ModelLoadError

    cfg = _cfg(tiny_model_dirs, **{"model.path": str(tmp_path / "nope")})
    with pytest.raises(ModelLoadError, match="nope"):
        Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False)
    with pytest.raises(OpdkitError, match="data.train_path"):
        Trainer(_cfg(tiny_model_dirs), tmp_path / "run2", progress=False)


def test_half_written_checkpoint_is_never_picked_up(tmp_path, tiny_model_dirs):
    from opdkit.train.checkpoint import latest_checkpoint

    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 2, "run.save_every": 1})
    run = Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False).run().run_dir
    ckpts = run / "checkpoints"
    # a save killed mid-way leaves a temporary directory, and a directory without its COMPLETE marker
    (ckpts / ".tmp-abc").mkdir()
    (ckpts / ".tmp-abc" / "model.safetensors").write_bytes(b"half")
    broken = ckpts / "step-000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(run).step == 2
    assert json.loads((ckpts / "step-000002" / "trainer_state.json").read_text())["step"] == 2


def test_lora_trains_only_adapters_and_exports_a_merged_model(tmp_path, tiny_model_dirs):
    cfg = _cfg(tiny_model_dirs, **{"model.lora_r": 4, "model.lora_target_modules": ["q_proj", "v_proj"]})
    trainer = Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    result = trainer.run()
    before, after = _params(tiny_model_dirs["qwen2"]), _params(result.final_dir)
    assert set(before) == set(after)  # a plain model: adapters merged, no lora_ names
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)


def test_lora_runs_are_reproducible(tmp_path, tiny_model_dirs):
    """The adapters' random initialisation is seeded by run.seed: two runs give the same weights."""
    cfg = _cfg(tiny_model_dirs, **{"model.lora_r": 4, "model.lora_target_modules": ["q_proj", "v_proj"]})
    a = Trainer(cfg, tmp_path / "a", prompts=PROMPTS, progress=False).run()
    b = Trainer(cfg, tmp_path / "b", prompts=PROMPTS, progress=False).run()
    pa, pb = _params(a.final_dir), _params(b.final_dir)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_student_support_mass_is_a_probability_with_several_mini_batches(tmp_path, tiny_model_dirs):
    """With the whole vocabulary as the support the student's mass on it is 1, also for the fused loss
    with two optimizer steps per batch (it is measured where the weights are still pi_old's)."""
    from opdkit.hf import load_causal_lm

    rows = load_causal_lm(tiny_model_dirs["qwen2"]).get_output_embeddings().weight.shape[0]
    for fused in (True, False):
        cfg = _cfg(tiny_model_dirs, **{"objective.top_k": rows, "optim.mini_batches": 2, "optim.total_steps": 3,
                                       "objective.fused": fused, "run.save_every": 0})
        result = Trainer(cfg, tmp_path / f"run{fused}", prompts=PROMPTS, progress=False).run()
        masses = [r["student_support_mass"] for r in read_metrics(result.run_dir)]
        assert masses == pytest.approx([1.0] * 3, abs=1e-5), (fused, masses)


def test_eval_settings_without_an_eval_set_are_refused(tmp_path, tiny_model_dirs):
    with pytest.raises(OpdkitError, match="eval.every_steps, eval.n_samples: set, but there is nothing to evaluate"):
        Trainer(_cfg(tiny_model_dirs, **{"eval.every_steps": 5, "eval.n_samples": 4}), tmp_path / "run",
                prompts=PROMPTS, progress=False)


def test_evaluation_steps_are_logged_whatever_log_every(tmp_path, tiny_model_dirs):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(3)))
    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 4, "run.log_every": 3, "eval.every_steps": 2,
                                   "data.eval_path": str(data), "eval.max_new_tokens": 4, "run.save_every": 0})
    rows = read_metrics(Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False).run().run_dir)
    assert [r["step"] for r in rows] == [2, 3, 4]
    assert [r.get("eval_accuracy") is not None for r in rows] == [True, False, True]
    # eval.at_start: the curve starts at step 0, before any update (the same answers as the model loaded)
    cfg = load_config(None, {**{k: v for k, v in _flat(cfg).items()}, "eval.at_start": True})
    rows = read_metrics(Trainer(cfg, tmp_path / "run0", prompts=PROMPTS, progress=False).run().run_dir)
    assert [r["step"] for r in rows] == [0, 2, 3, 4]
    assert set(rows[0]) == {"step", "eval_accuracy", "eval_response_length", "eval_truncation_rate",
                            "eval_no_answer_rate", "time_eval_s"}


def test_lora_on_the_lm_head_trains_the_adapter(tmp_path, tiny_model_dirs):
    """With LoRA on lm_head the fused loss cannot read the head's weight: the dense path trains the adapter."""
    cfg = _cfg(tiny_model_dirs, **{"model.lora_r": 4, "model.lora_target_modules": ["lm_head", "q_proj"]})
    trainer = Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False)
    assert "dense" in trainer.c.head_description and "LoRA" in trainer.c.head_description
    head_b = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if "lm_head.lora_B" in n}
    assert head_b and all(float(p.abs().max()) == 0 for p in head_b.values())  # peft starts B at zero
    result = trainer.run()
    after = dict(trainer.student.named_parameters())
    assert all(float(after[n].detach().abs().max()) > 0 for n in head_b)  # the adapter received gradient
    before, merged = _params(tiny_model_dirs["qwen2"]), _params(result.final_dir)
    assert not torch.equal(before["lm_head.weight"], merged["lm_head.weight"])


def test_train_command_line(tmp_path, tiny_model_dirs):
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p[0]["content"], "answer": "0"}) + "\n" for p in PROMPTS))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model:\n  path: {tiny_model_dirs['qwen2']}\nteacher:\n  path: {tiny_model_dirs['llama']}\n"
        f"data:\n  train_path: {data}\nrun:\n  out_dir: {tmp_path / 'run'}\n  tensorboard: true\n"
    )
    exe = str(Path(sys.executable).parent / "opdkit")
    over = ["optim.total_steps=1", "rollout.max_new_tokens=6", "rollout.n_samples=2", "optim.prompts_per_step=2",
            "objective.top_k=4"]
    r = subprocess.run([exe, "train", str(cfg), *over], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    again = subprocess.run([exe, "train", str(cfg), *over], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    resumed = subprocess.run([exe, "train", "--resume", str(tmp_path / "run")], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    data.write_text('{"prompt": "ok"}\n{not json}\n')
    bad = subprocess.run([exe, "train", str(cfg), *over, "run.overwrite=true"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and f"{data} line 2" in bad.stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dirs):
    """A real kill -9 of `opdkit train` at an arbitrary moment; the resumed run ends where a clean one does."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p[0]["content"]}) + "\n" for p in PROMPTS))
    exe = str(Path(sys.executable).parent / "opdkit")
    common = [f"model.path={tiny_model_dirs['qwen2']}", f"teacher.path={tiny_model_dirs['llama']}",
              f"data.train_path={data}", "optim.total_steps=6", "run.save_every=2", "rollout.max_new_tokens=8",
              "rollout.n_samples=2", "optim.prompts_per_step=2", "objective.top_k=4", "optim.lr=1e-2",
              "run.tensorboard=false"]
    clean = subprocess.run([exe, "train", *common, f"run.out_dir={tmp_path / 'clean'}"], capture_output=True,
                           text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([exe, "train", *common, f"run.out_dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(run)) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(read_metrics(run)) < 6
    resumed = subprocess.run([exe, "train", "--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert strip(read_metrics(run)) == strip(read_metrics(tmp_path / "clean"))
    pa, pb = _params(tmp_path / "clean" / "final"), _params(run / "final")
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
