"""pi_old recorded while sampling equals a teacher-forced pass of the student in float32 (so the trainer skips
that pass), and rollout.old_logprobs refuses the cases where it would not."""

from __future__ import annotations

import pytest
import torch

from opdkit.config import RolloutConfig, load_config
from opdkit.errors import OpdkitError
from opdkit.rollout.hf_sampler import HFSampler
from opdkit.student import student_pass

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a in range(3) for b in range(2)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_records_what_the_student_pass_computes(tiny_model_dirs, temperature):
    from opdkit.hf import load_causal_lm, load_tokenizer

    lm = load_causal_lm(tiny_model_dirs["qwen2"]).eval()
    tok = load_tokenizer(tiny_model_dirs["qwen2"])
    stop_ids = list(range(10, 90))  # many stop ids: responses of different lengths, so padding is tested too
    batch = HFSampler(lm, tok, RolloutConfig(temperature=temperature, top_p=0.9, max_new_tokens=12, n_samples=2,
                                             stop_ids=stop_ids)).sample(PROMPTS, seed=3)
    with torch.no_grad():
        sp = student_pass(lm, batch.input_ids_B_L, batch.attention_mask_B_L, batch.prompt_len,
                          batch.sampled_ids_B_T, batch.response_mask_B_T, temperature=temperature)
    m = batch.response_mask_B_T.bool()
    assert m.sum() > 20 and (~m).any()  # ragged responses: padding is part of the test
    # generate's incremental (KV-cache) float32 logits against one teacher-forced float32 pass: rounding only
    for ours, theirs in ((batch.old_logprobs_B_T, sp.old_logprobs_B_T), (batch.entropy_B_T, sp.entropy_B_T),
                         (batch.logsumexp_B_T, sp.logsumexp_B_T)):
        torch.testing.assert_close(ours[m], theirs[m], rtol=1e-4, atol=1e-4)
        assert bool((ours[~m] == 0).all())
    assert float((batch.entropy_B_T[m]).min()) > 0


def test_old_logprobs_setting_is_resolved_and_refused_where_it_cannot_hold(tmp_path, tiny_model_dirs):
    from opdkit.train import Trainer

    base = {"model.path": str(tiny_model_dirs["qwen2"]), "teacher.path": str(tiny_model_dirs["llama"]),
            "objective.top_k": 4, "rollout.max_new_tokens": 4, "optim.total_steps": 1, "run.tensorboard": False}
    prompts = PROMPTS
    for setting, expected in (("auto", True), ("recompute", False), ("sampler", True)):
        cfg = load_config(None, {**base, "rollout.old_logprobs": setting})
        t = Trainer(cfg, tmp_path / f"r-{setting}", prompts=prompts, progress=False)
        assert t.c.pi_old_from_sampler is expected, setting
    # the student's own top-K comes only from its pass: auto recomputes, sampler is refused
    topk = {**base, "objective.support": "student_topk"}
    assert not Trainer(load_config(None, topk), tmp_path / "s-auto", prompts=prompts,
                       progress=False).c.pi_old_from_sampler
    with pytest.raises(OpdkitError, match="rollout.old_logprobs=sampler: not possible here.*student_topk"):
        Trainer(load_config(None, {**topk, "rollout.old_logprobs": "sampler"}), tmp_path / "s-s", prompts=prompts,
                progress=False)
    with pytest.raises(OpdkitError, match="bf16"):
        Trainer(load_config(None, {**base, "rollout.old_logprobs": "sampler", "run.precision": "bf16"}),
                tmp_path / "b", prompts=prompts, progress=False)
