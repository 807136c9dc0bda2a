"""The student side of one update: forward pass on a micro-batch and the configured objective.

Shapes: ``B`` sequences of the micro-batch, ``L`` prompt + response columns, ``P`` padded prompt
length, ``T`` response positions, ``H`` hidden size, ``V`` vocabulary, ``K`` support slots.

The student's transformer body runs over prompt + response once; the hidden states that predict the
response tokens are columns ``P-1 .. L-2``. The support-set objectives then go through
``support_kl_from_hidden`` (only the K support rows of the LM head; no ``[B, T, V]`` logits) when the
head has no bias and ``objective.fused`` is on; the sampled-token objective needs ``log π_θ(y_t)``, and
so the full normaliser, which it computes from full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdkit.config import ObjectiveConfig
from opdkit.losses import (
    aggregate,
    policy_gradient_loss,
    sampled_token_advantages,
    support_kl,
    support_kl_from_hidden,
)
from opdkit.teacher.local import position_ids_from_mask

__all__ = [
    "MicroBatch",
    "response_hidden",
    "sampled_logprobs",
    "micro_batch_loss",
    "student_statistics",
]


@dataclass(frozen=True)
class MicroBatch:
    """The slice of a rollout batch and its teacher signal that one forward pass sees."""

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    prompt_len: int
    loss_mask_B_T: torch.Tensor  # response mask with special tokens removed
    sampled_ids_B_T: torch.Tensor
    old_logprobs_B_T: torch.Tensor  # log π_old(y_t), recomputed teacher-forced (see trainer)
    support_ids_B_T_K: torch.Tensor
    teacher_logprobs_B_T_K: torch.Tensor
    teacher_sampled_logprobs_B_T: torch.Tensor


def _body_and_head(model):
    if hasattr(model, "get_base_model"):  # a peft model: the causal LM inside, with the adapters injected
        model = model.get_base_model()
    body = model.base_model if getattr(model, "base_model", None) is not model else None
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise TypeError(f"{type(model).__name__}: expected a Hugging Face *ForCausalLM with base_model and an LM head")
    return body, head


def response_hidden(model, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor, prompt_len: int):
    """``(hidden_B_T_H, lm_head)``: final hidden states that predict each response token."""
    body, head = _body_and_head(model)
    out = body(
        input_ids=input_ids_B_L,
        attention_mask=attention_mask_B_L,
        position_ids=position_ids_from_mask(attention_mask_B_L),
        use_cache=False,
    )
    hidden_B_L_H = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden_B_L_H[:, prompt_len - 1 : -1], head


def _logits(head, hidden_B_T_H: torch.Tensor) -> torch.Tensor:
    return head(hidden_B_T_H).float()


def sampled_logprobs(
    head, hidden_B_T_H: torch.Tensor, sampled_ids_B_T: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``log π(y_t)`` at temperature ``temperature`` from full logits (float32)."""
    logits_B_T_V = _logits(head, hidden_B_T_H) / temperature
    return torch.log_softmax(logits_B_T_V, dim=-1).gather(-1, sampled_ids_B_T.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def student_statistics(
    model,
    input_ids_B_L: torch.Tensor,
    attention_mask_B_L: torch.Tensor,
    prompt_len: int,
    sampled_ids_B_T: torch.Tensor,
    support_ids_B_T_K: torch.Tensor | None,
    *,
    temperature: float,
    topk: int = 0,
    chunk_size: int = 256,
) -> dict[str, torch.Tensor]:
    """One no-grad teacher-forced pass of the student, full logits ``chunk_size`` positions at a time.

    Returns ``old_logprobs_B_T`` (log π_old of the sampled tokens, consistent with the training forward
    pass, unlike the incremental logits of ``generate``), ``entropy_B_T``, and when asked
    ``support_logprobs_B_T_K`` (full-vocab student log-probs on the support, for the mass diagnostic)
    and ``topk_ids_B_T_K`` / ``topk_logprobs_B_T_K`` (the ``student_topk`` support source and the
    student's log-probs there). Memory O(chunk_size x V).
    """
    hidden_B_T_H, head = response_hidden(model, input_ids_B_L, attention_mask_B_L, prompt_len)
    B, T, H = hidden_B_T_H.shape
    flat = hidden_B_T_H.reshape(B * T, H)
    sampled = sampled_ids_B_T.reshape(B * T)
    support = None if support_ids_B_T_K is None else support_ids_B_T_K.reshape(B * T, -1).clamp(min=0)
    out = {
        "old_logprobs_B_T": [],
        "entropy_B_T": [],
        "support_logprobs_B_T_K": [],
        "topk_ids_B_T_K": [],
        "topk_logprobs_B_T_K": [],
    }
    for s in range(0, B * T, chunk_size):
        lp = torch.log_softmax(_logits(head, flat[s : s + chunk_size]) / temperature, dim=-1)
        out["old_logprobs_B_T"].append(lp.gather(-1, sampled[s : s + chunk_size, None]).squeeze(-1))
        out["entropy_B_T"].append(-(lp.exp() * lp).nan_to_num().sum(-1))
        if support is not None:
            out["support_logprobs_B_T_K"].append(lp.gather(-1, support[s : s + chunk_size]))
        if topk:
            values, ids = lp.topk(topk, dim=-1)
            out["topk_ids_B_T_K"].append(ids)
            out["topk_logprobs_B_T_K"].append(values)
    result = {}
    for key, parts in out.items():
        if parts:
            cat = torch.cat(parts)
            result[key] = cat.reshape(B, T, *cat.shape[1:])
    return result


def micro_batch_loss(
    model,
    mb: MicroBatch,
    obj: ObjectiveConfig,
    *,
    temperature: float,
    denominator: float,
    ppo_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per_token_B_T)`` of one micro-batch; ``loss`` is already divided by ``denominator``.

    ``denominator`` is the count of the whole mini-batch (tokens for token-mean, sequences for the
    seq-mean modes), so that summing the micro-batch losses gives the mini-batch loss exactly.
    """
    hidden, head = response_hidden(model, mb.input_ids_B_L, mb.attention_mask_B_L, mb.prompt_len)
    mask = mb.loss_mask_B_T
    if obj.kind in ("support_kl", "full_reverse_kl"):
        opts = dict(
            renormalize=obj.renormalize if obj.kind == "support_kl" else True,
            divergence=obj.divergence if obj.kind == "support_kl" else "reverse_kl",
            beta=obj.jsd_beta,
            tail_bucket=obj.tail_bucket if obj.kind == "support_kl" else False,
            temperature=temperature,
        )
        if obj.fused and getattr(head, "bias", None) is None:
            per_token = support_kl_from_hidden(
                hidden, head.weight, mb.support_ids_B_T_K, mb.teacher_logprobs_B_T_K, mask, **opts
            )
        else:
            per_token = support_kl(_logits(head, hidden), mb.support_ids_B_T_K, mb.teacher_logprobs_B_T_K, mask, **opts)
    elif obj.kind == "sampled_token":
        logprobs = sampled_logprobs(head, hidden, mb.sampled_ids_B_T, temperature)
        adv = sampled_token_advantages(
            mb.teacher_sampled_logprobs_B_T, mb.old_logprobs_B_T, mask, gamma=obj.gamma, clip=obj.reward_clip
        )
        per_token = policy_gradient_loss(
            logprobs, mb.old_logprobs_B_T, adv, mask, clip_eps=obj.ppo_clip_eps if ppo_clip else None
        )
    else:  # the config validates kind; this guards programmatic use
        raise ValueError(f"objective.kind: unknown {obj.kind!r}")
    loss = aggregate(per_token, mask, obj.aggregation, denominator=denominator) * obj.loss_coef
    return loss, per_token.detach()
