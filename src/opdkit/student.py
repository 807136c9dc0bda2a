"""The student's computations at response positions: the no-grad student pass, and the chunking of
full-vocabulary logits that it shares with the objectives.

Shapes: ``B`` sequences, ``L`` prompt + response columns, ``P`` padded prompt length, ``T`` response
positions, ``N`` scored positions (those of the response mask, flattened), ``H`` hidden size, ``V`` output
rows, ``K`` support slots.

Only positions inside the response mask are computed (padding costs nothing), ``chunk_size`` at a time,
so full logits never exceed ``[chunk_size, V]``. With gradients on, each chunk is recomputed in the
backward pass (activation checkpointing) instead of keeping its logits: memory stays O(chunk_size x V)
for the whole micro-batch. Every function here takes the *unwrapped* causal LM and runs inside the
prepared module's forward (see ``opdkit.train.build``), so DDP and FSDP see every student pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from opdkit.modeling import OutputHead, output_head, response_hidden
from opdkit.types import StudentPass

__all__ = ["map_positions", "scatter_positions", "student_pass"]


def map_positions(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    hidden_N_H: torch.Tensor,
    *args_N: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, ...]:
    """``fn(hidden_n_H, *args_n)`` over chunks of ``n <= chunk_size`` rows, outputs concatenated.

    ``fn`` returns a tuple of per-row tensors (first axis ``n``). When ``hidden_N_H`` requires grad, each
    chunk runs under non-reentrant activation checkpointing: its ``[n, V]`` intermediates are recomputed
    in the backward pass instead of stored.
    """
    N = hidden_N_H.shape[0]
    if N == 0:
        return tuple(t[:0] for t in fn(hidden_N_H, *args_N))
    grad = torch.is_grad_enabled() and hidden_N_H.requires_grad
    outs: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, N, chunk_size):
        chunk = (hidden_N_H[s : s + chunk_size], *(a[s : s + chunk_size] for a in args_N))
        outs.append(checkpoint(fn, *chunk, use_reentrant=False) if grad else fn(*chunk))
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def scatter_positions(values_N: torch.Tensor, idx_N: torch.Tensor, shape: tuple[int, ...], fill: float = 0.0):
    """Values at flattened positions ``idx_N`` back into a tensor of ``shape`` (``[B, T]`` or ``[B, T, K]``)."""
    B, T = shape[:2]
    out = values_N.new_full((B * T, *shape[2:]), fill)
    out = out.index_put((idx_N,), values_N)  # out-of-place: autograd flows into values_N
    return out.reshape(shape)


@torch.no_grad()
def student_pass(
    lm,
    input_ids_B_L: torch.Tensor,
    attention_mask_B_L: torch.Tensor,
    prompt_len: int,
    sampled_ids_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    *,
    temperature: float,
    topk: int = 0,
    chunk_size: int = 256,
    head: OutputHead | None = None,
) -> StudentPass:
    """One teacher-forced, no-grad pass of the student over its rollout (see :class:`StudentPass`).

    ``topk > 0`` also returns the student's top-K ids and log-probs at every position (the
    ``student_topk`` support source).
    """
    head = head or output_head(lm)
    hidden_B_T_H = response_hidden(lm, input_ids_B_L, attention_mask_B_L, prompt_len)
    B, T, H = hidden_B_T_H.shape
    idx = response_mask_B_T.reshape(-1).nonzero().squeeze(-1)
    hidden_N_H = hidden_B_T_H.reshape(B * T, H)[idx]
    sampled_N = sampled_ids_B_T.reshape(-1)[idx].long()

    def one_chunk(h_n_H, y_n):
        logits = head.logits(h_n_H) / temperature
        lse = torch.logsumexp(logits, dim=-1)
        lp = logits - lse.unsqueeze(-1)
        old = lp.gather(-1, y_n.unsqueeze(-1)).squeeze(-1)
        ent = -(lp.exp() * lp).nan_to_num().sum(-1)
        if topk:
            top_lp, top_ids = lp.topk(topk, dim=-1)
            return old, ent, lse, top_ids, top_lp
        return old, ent, lse

    outs = map_positions(one_chunk, hidden_N_H, sampled_N, chunk_size=chunk_size)
    old, ent, lse = (scatter_positions(o, idx, (B, T)) for o in outs[:3])
    top_ids = top_lp = None
    if topk:
        top_ids = scatter_positions(outs[3], idx, (B, T, topk), fill=0)
        top_lp = scatter_positions(outs[4], idx, (B, T, topk), fill=float("-inf"))
    return StudentPass(old, ent, lse, top_ids, top_lp)
