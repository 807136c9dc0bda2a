"""The precision policy: float32 master weights under bf16 compute, one autocast for every student pass."""

from __future__ import annotations

import torch

from opdkit.config import load_config
from opdkit.train import Trainer

PROMPTS = [[{"role": "user", "content": f"What is {a} - {b}?"}] for a in range(4) for b in range(4)]


def _cfg(dirs, **over):
    base = {
        "model.path": str(dirs["qwen2"]), "teacher.path": str(dirs["llama"]), "objective.top_k": 8,
        "rollout.max_new_tokens": 8, "rollout.n_samples": 2, "optim.prompts_per_step": 4, "optim.total_steps": 1,
        "optim.mini_batches": 1, "optim.micro_batch_size": 8, "run.save_every": 0, "run.tensorboard": False,
    }
    base.update(over)
    return load_config(None, base)


def test_bf16_updates_move_the_float32_master_weights(tmp_path, tiny_model_dirs):
    """One step at the paper's lr 2e-6 with a bf16 model: the trained weights are float32 and nearly every
    weight that has a gradient moves; the same update applied to bf16 weights would round away for most.
    (Weights without a gradient, such as LM-head rows outside every support set, cannot move at all.)"""
    from opdkit.hf import load_causal_lm
    from tests.train.dist_worker import observe_first_grads

    cfg = _cfg(tiny_model_dirs, **{"model.dtype": "bfloat16", "run.precision": "bf16", "optim.lr": 2e-6,
                                   "optim.weight_decay": 0.0})
    said = []
    trainer = Trainer(cfg, tmp_path / "run", prompts=PROMPTS, progress=False, log=said.append)
    assert any("bf16 on a CPU" in m for m in said)  # the cost is said
    start = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    assert all(p.dtype == torch.float32 for p in start.values())
    bf16 = {n: p for n, p in load_causal_lm(tiny_model_dirs["qwen2"], dtype="bfloat16").named_parameters()}
    assert all(torch.equal(start[n], bf16[n].float()) for n in start)  # the master copy starts from the bf16 weights
    grads = observe_first_grads(trainer)
    result = trainer.run()
    from safetensors.torch import load_file

    exported = load_file(str(result.final_dir / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}  # exported in the dtype it was loaded in
    import json

    assert json.loads((result.final_dir / "config.json").read_text())["dtype"] == "bfloat16"  # and says so
    moved = changed_in_bf16 = total = 0
    for n, p in trainer.student.named_parameters():
        has_grad = grads[n] != 0
        after = p.detach()[has_grad]
        moved += int((after != start[n][has_grad]).sum())
        changed_in_bf16 += int((after.bfloat16() != start[n][has_grad].bfloat16()).sum())
        total += after.numel()
    assert total > 0.5 * sum(p.numel() for p in start.values())
    assert moved / total >= 0.95, moved / total
    assert changed_in_bf16 / total < 0.2, changed_in_bf16 / total  # why master weights: bf16 would drop them


def test_sampler_and_student_pass_agree_under_bf16(tmp_path, tiny_model_dirs):
    """Rollout, π_old and loss run under the same autocast: their log-probs differ only by bf16 rounding of
    two different kernels (incremental vs teacher-forced), not by a policy mismatch."""
    seen = {}
    trainer = Trainer(_cfg(tiny_model_dirs, **{"run.precision": "bf16"}), tmp_path / "run", prompts=PROMPTS,
                      progress=False, log=lambda _m: None)
    trainer.run(on_step=lambda s, m, tr: seen.update(rec=tr.last_step))
    rec = seen["rec"]
    mask = rec.batch.response_mask_B_T.bool()
    diff = (rec.batch.old_logprobs_B_T - rec.student.old_logprobs_B_T)[mask].abs()
    assert float(diff.max()) < 0.05, float(diff.max())
    # and the fp32 pass of the same weights is further from the bf16 rollout than the bf16 pass is
    from opdkit.student import student_pass

    with torch.no_grad():
        fp32 = student_pass(trainer.student, rec.batch.input_ids_B_L, rec.batch.attention_mask_B_L,
                            rec.batch.prompt_len, rec.batch.sampled_ids_B_T, rec.batch.response_mask_B_T,
                            temperature=1.0)
    assert float(diff.mean()) <= float((rec.batch.old_logprobs_B_T - fp32.old_logprobs_B_T)[mask].abs().mean())


def test_the_teacher_dtype_follows_the_runs_precision(tmp_path, tiny_model_dirs):
    """teacher.dtype=run (the default): float32 on a CPU (bf16 there is several times slower); an explicit
    bfloat16 on a CPU is honoured with a one-line warning."""
    said = []
    t = Trainer(_cfg(tiny_model_dirs), tmp_path / "a", prompts=PROMPTS, progress=False, log=said.append)
    assert next(t.c.teacher.model.parameters()).dtype == torch.float32
    assert not any("teacher.dtype" in m for m in said)
    t = Trainer(_cfg(tiny_model_dirs, **{"teacher.dtype": "bfloat16"}), tmp_path / "b", prompts=PROMPTS,
                progress=False, log=said.append)
    assert next(t.c.teacher.model.parameters()).dtype == torch.bfloat16
    assert sum("teacher.dtype=bfloat16 on a CPU" in m for m in said) == 1
    # outside a run (LocalTeacher.from_config, build_teacher without a loaded model): the same resolution
    from opdkit.train.precision import teacher_load_dtype

    assert teacher_load_dtype("run") == "float32"
    assert teacher_load_dtype("run", "bf16") == "bfloat16"
    assert teacher_load_dtype("float16", "bf16") == "float16"


def test_adamw_is_fused_and_reads_its_eps(tmp_path, tiny_model_dirs):
    """optim.eps reaches AdamW, which uses torch's fused kernel on a CPU."""
    t = Trainer(_cfg(tiny_model_dirs, **{"optim.eps": 1e-3}), tmp_path / "r", prompts=PROMPTS, progress=False,
                log=lambda _m: None)
    groups = t.c.optimizer.param_groups
    assert groups and all(g["eps"] == 1e-3 and g["fused"] for g in groups)
