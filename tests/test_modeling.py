"""The modelling seam on real tiny Hugging Face models: π_old equals ``model(...).logits`` (output
transforms included), unknown transforms are refused, and heads the fused loss cannot express fall back."""

from __future__ import annotations

import pytest
import torch

from opdkit.losses import support_kl
from opdkit.modeling import ModelingError, output_head, response_hidden, verify_output_head
from opdkit.student import student_pass
from opdkit.tiny import build_tiny_model


def _model(tokenizer, arch):
    torch.manual_seed(0)
    if arch == "cohere":
        from transformers import CohereConfig, CohereForCausalLM

        cfg = CohereConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logit_scale=4.0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return CohereForCausalLM(cfg).eval()
    model = build_tiny_model(tokenizer, arch=arch, seed=3)
    if arch == "gemma2":
        with torch.no_grad():  # trained models have large logits: make the soft cap (2.0 here) bite
            model.lm_head.weight.mul_(40.0)
    return model


def _left_padded(tokenizer, rows, pad):
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad)
    att = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        att[b, P - len(r):] = 1
    return ids, att


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "cohere"])
def test_student_pass_equals_model_logits(tiny_tokenizer, arch):
    """π_old of the sampled tokens, on a left-padded batch, equals log_softmax(model(row).logits / τ)."""
    model = _model(tiny_tokenizer, arch)
    assert verify_output_head(model) < 1e-4
    g = torch.Generator().manual_seed(1)
    V = output_head(model).rows
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 9)]
    T = 6
    responses = torch.randint(3, V, (2, T), generator=g)
    p_ids, p_att = _left_padded(tiny_tokenizer, prompts, tiny_tokenizer.pad_token_id)
    ids = torch.cat([p_ids, responses], 1)
    att = torch.cat([p_att, torch.ones_like(responses)], 1)
    tau = 0.8
    sp = student_pass(model, ids, att, p_ids.shape[1], responses, torch.ones_like(responses), temperature=tau)
    for b, prompt in enumerate(prompts):
        row = torch.tensor(prompt + responses[b].tolist())[None]
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=row).logits[0].double() / tau, -1)
        ref = ref[len(prompt) - 1 : -1].gather(-1, responses[b, :, None])[:, 0]
        torch.testing.assert_close(sp.old_logprobs_B_T[b].double(), ref, atol=2e-5, rtol=0)
    if arch == "gemma2":  # the transform matters: without the soft cap the log-probs are far off
        with torch.no_grad():
            hidden = response_hidden(model, ids, att, p_ids.shape[1])
        raw = torch.log_softmax(model.lm_head(hidden).double() / tau, -1).gather(-1, responses[..., None])[..., 0]
        assert float((raw - sp.old_logprobs_B_T.double()).abs().max()) > 1.0


def test_an_unknown_output_transform_is_refused(tiny_tokenizer):
    from transformers import Qwen2ForCausalLM

    class Scaled(Qwen2ForCausalLM):  # an architecture that changes its logits in a way opdkit does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    base = build_tiny_model(tiny_tokenizer, arch="qwen2")
    model = Scaled(base.config).eval()
    model.load_state_dict(base.state_dict())
    with pytest.raises(ModelingError, match="cannot reproduce this model's output logits"):
        verify_output_head(model)


def test_heads_the_fused_loss_cannot_express(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    assert output_head(_model(tiny_tokenizer, "qwen2")).fused_weight is not None
    assert output_head(_model(tiny_tokenizer, "cohere")).fused_weight is not None  # a scale folds into τ
    assert "soft-caps" in output_head(_model(tiny_tokenizer, "gemma2")).unfused_reason
    lora = get_peft_model(_model(tiny_tokenizer, "qwen2"), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    head = output_head(lora)
    assert head.fused_weight is None and "LoRA" in head.unfused_reason
    biased = _model(tiny_tokenizer, "llama")
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(biased.lm_head.out_features))
    assert output_head(biased).unfused_reason == "the LM head has a bias"


@pytest.mark.parametrize("arch", ["cohere", "gemma2"])
def test_objective_matches_dense_logits_for_transformed_heads(tiny_tokenizer, arch):
    """SupportKL through the seam (fused with a folded scale for Cohere, dense fallback for Gemma-2) equals
    the public support_kl on ``model(...).logits``, in value and in gradient."""
    from opdkit.config import ObjectiveConfig
    from opdkit.objectives import LossInputs, SupportKL

    model = _model(tiny_tokenizer, arch).double()
    head = output_head(model)
    g = torch.Generator().manual_seed(2)
    B, T, K = 2, 5, 6
    V = head.rows
    ids = torch.randint(3, V, (B, 4 + T), generator=g)
    att = torch.ones_like(ids)
    support = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    teacher = torch.log_softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1) - 1.0
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -2:] = False
    x = LossInputs(mask, ids[:, 4:], torch.zeros(B, T), torch.zeros(B, T), support, teacher, torch.zeros(B, T))
    obj = SupportKL(ObjectiveConfig(top_k=K), temperature=0.9, chunk_size=3)
    hidden = response_hidden(model, ids, att, 4)
    per, _ = obj.per_token(head, hidden, x, ppo=False)
    grad = torch.autograd.grad(per.sum(), model.model.embed_tokens.weight)[0]
    logits = model(input_ids=ids).logits[:, 3:-1]
    ref = support_kl(logits, support, teacher, mask, temperature=0.9)
    ref_grad = torch.autograd.grad(ref.sum(), model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(per, ref, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-6)
    assert ("fused" in obj.describe(head)) == (arch == "cohere")
