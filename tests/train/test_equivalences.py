"""The trainer's numbers against independent computations, in one process.

- the gradient of a fixed batch does not depend on the micro-batch size;
- the fused support KL and the dense one train to the same weights;
- the logged loss equals the loss library recomputed from ``model(...).logits`` on the step's own batch;
- the sampler's recorded log-probs agree with the student pass's π_old.
"""

from __future__ import annotations

import pytest
import torch

from opdkit.config import load_config
from opdkit.losses import aggregate, support_kl
from opdkit.train import Trainer
from opdkit.train.metrics import read_metrics
from tests.train.dist_worker import observe_first_grads

PROMPTS = [[{"role": "user", "content": f"What is {a} * {b}?"}] for a in range(4) for b in range(4)]


def _cfg(dirs, **over):
    base = {
        "model.path": str(dirs["qwen2"]), "teacher.path": str(dirs["llama"]), "objective.top_k": 8,
        "rollout.max_new_tokens": 10, "rollout.n_samples": 2, "optim.prompts_per_step": 4,
        "optim.total_steps": 2, "optim.mini_batches": 1, "optim.micro_batch_size": 8, "optim.lr": 1e-2,
        "run.save_every": 0, "run.tensorboard": False,
    }
    base.update(over)
    if base.get("objective.kind") == "full_reverse_kl":  # its support is the whole vocabulary: no K
        base.pop("objective.top_k")
    return load_config(None, base)


def _train(tmp_path, name, cfg, **kw):
    trainer = Trainer(cfg, tmp_path / name, prompts=PROMPTS, progress=False, log=lambda _m: None)
    grads = observe_first_grads(trainer)
    result = trainer.run(**kw)
    return trainer, grads, result


@pytest.mark.parametrize("kind", ["support_kl", "sampled_token", "full_reverse_kl"])
def test_gradient_does_not_depend_on_the_micro_batch_size(tmp_path, tiny_model_dirs, kind):
    over = {"objective.kind": kind, "optim.total_steps": 1}
    _, g8, _ = _train(tmp_path, "mb8", _cfg(tiny_model_dirs, **over, **{"optim.micro_batch_size": 8}))
    _, g1, _ = _train(tmp_path, "mb1", _cfg(tiny_model_dirs, **over, **{"optim.micro_batch_size": 1}))
    _, g3, _ = _train(tmp_path, "mb3", _cfg(tiny_model_dirs, **over, **{"optim.micro_batch_size": 3}))
    assert g8.keys() == g1.keys() == g3.keys() and g8
    assert max(float(g.abs().max()) for g in g8.values()) > 1e-4
    for k in g8:
        torch.testing.assert_close(g1[k], g8[k], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(g3[k], g8[k], rtol=1e-4, atol=1e-8)


def test_fused_and_dense_support_kl_reach_the_same_weights(tmp_path, tiny_model_dirs):
    # AdamW's step g / (sqrt(v) + eps) turns the float32 rounding of gradients smaller than eps (the two paths
    # sum in different orders) into differences of a sizeable part of a step; eps 1e-6 keeps the elements
    # with |g| ~ 1e-9 out of that regime, so the weights compare the paths, not the optimizer's conditioning.
    eps = {"optim.eps": 1e-6}
    a, ga, ra = _train(tmp_path, "fused", _cfg(tiny_model_dirs, **{"objective.fused": True}, **eps))
    b, gb, rb = _train(tmp_path, "dense", _cfg(tiny_model_dirs, **{"objective.fused": False}, **eps))
    assert "fused" in a.c.head_description and "dense" in b.c.head_description
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-8)
    wa, wb = dict(a.student.named_parameters()), dict(b.student.named_parameters())
    assert max(float((wa[k] - wb[k]).detach().abs().max()) for k in wa) < 1e-5
    la = [r["loss"] for r in read_metrics(ra.run_dir)]
    lb = [r["loss"] for r in read_metrics(rb.run_dir)]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_logged_loss_equals_the_loss_library_on_the_saved_batch(tmp_path, tiny_model_dirs, renormalize):
    """Independent recomputation: the student's full logits from ``model(...)`` on each unpadded row, the
    public ``support_kl`` and ``aggregate`` on the batch the step sampled and the teacher scored."""
    from opdkit.hf import load_causal_lm

    seen = {}
    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 1, "objective.renormalize": renormalize})
    _train(tmp_path, "run", cfg, on_step=lambda step, m, tr: seen.update(metrics=m, record=tr.last_step))
    rec, logged = seen["record"], seen["metrics"]["loss"]
    model = load_causal_lm(tiny_model_dirs["qwen2"]).double()
    batch, P = rec.batch, rec.batch.prompt_len
    logits = []
    for b in range(batch.batch_size):
        keep = batch.attention_mask_B_L[b].bool()
        ids = batch.input_ids_B_L[b][keep]
        n_prompt = int(batch.attention_mask_B_L[b, :P].sum())
        with torch.no_grad():
            z = model(input_ids=ids[None]).logits[0]
        row = torch.zeros(batch.response_len, z.shape[-1], dtype=torch.float64)
        n_resp = int(batch.response_mask_B_T[b].sum())
        row[:n_resp] = z[n_prompt - 1 : n_prompt - 1 + n_resp]
        logits.append(row)
    logits = torch.stack(logits)
    per_token = support_kl(logits, rec.signal.support_ids_B_T_K, rec.signal.teacher_logprobs_B_T_K.double(),
                           rec.loss_mask_B_T, renormalize=renormalize)
    expected = float(aggregate(per_token, rec.loss_mask_B_T, "token-mean"))
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_sampler_logprobs_agree_with_the_student_pass(tmp_path, tiny_model_dirs):
    seen = {}
    cfg = _cfg(tiny_model_dirs, **{"optim.total_steps": 1, "rollout.temperature": 0.7})
    _train(tmp_path, "run", cfg, on_step=lambda step, m, tr: seen.update(record=tr.last_step))
    rec = seen["record"]
    m = rec.batch.response_mask_B_T.bool()
    diff = (rec.batch.old_logprobs_B_T - rec.student.old_logprobs_B_T)[m].abs().max()
    assert float(diff) < 1e-4  # fp32: incremental (KV cache) and teacher-forced passes agree


def test_sampled_token_logprobs_by_chunks_equal_one_dense_pass(tmp_path, tiny_model_dirs):
    """log π(y_t) needs the log-sum-exp over V: computed over chunks of 2 positions (never [N, V] logits,
    recomputed in the backward pass) it gives the gradient of one pass over all positions."""
    over = {"objective.kind": "sampled_token", "optim.total_steps": 1}
    _, g_small, _ = _train(tmp_path, "c2", _cfg(tiny_model_dirs, **over, **{"model.logits_chunk_size": 2}))
    _, g_whole, _ = _train(tmp_path, "c4096", _cfg(tiny_model_dirs, **over, **{"model.logits_chunk_size": 4096}))
    assert g_small.keys() == g_whole.keys() and max(float(g.abs().max()) for g in g_whole.values()) > 1e-4
    for k in g_whole:
        torch.testing.assert_close(g_small[k], g_whole[k], rtol=1e-4, atol=1e-8)  # float32 summation order
