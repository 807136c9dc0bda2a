"""The support-set objective straight from hidden states, without ever forming ``[..., V]`` logits.

Notation: ``N`` flattened positions, ``H`` hidden size, ``V`` vocabulary, ``K`` support slots.

With renormalisation inside the support, the loss at a position depends only on the K student
logits ``h · W[S_t]`` (the full normaliser cancels), so the output layer's K support rows are all
that is needed: ``O(N·K·H)`` work instead of ``O(N·V·H)``, and no ``N × V`` buffer. The positions are
processed in chunks inside a custom autograd function: the forward pass keeps nothing but its inputs,
and the backward pass recomputes each chunk, differentiates it with autograd and scatters the row
gradients into ``grad_weight`` with ``index_add_``. Peak extra memory is one chunk's ``[n, K, H]``
gathered rows plus the ``[V, H]`` weight gradient that any autograd op would return.

``renormalize=False`` (and the tail bucket) needs the full student normaliser; it is offered on the
same interface by computing full logits one chunk at a time (memory ``O(chunk · V)``, no saving in
compute), so that a trainer can use one call for every support objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdkit.errors import InputError
from opdkit.losses._checks import check_float, check_no_nan, result_dtype
from opdkit.losses.divergences import (
    Divergence,
    check_support_inputs,
    check_support_options,
    support_divergence_from_logits,
)

__all__ = ["support_kl_from_hidden"]


@dataclass(frozen=True)
class _Options:
    renormalize: bool
    divergence: str
    beta: float
    tail_bucket: bool
    temperature: float
    chunk_size: int
    dtype: torch.dtype


def _chunk_loss(
    hidden_n_H: torch.Tensor,
    weight_or_rows: torch.Tensor,
    ids_n_K: torch.Tensor,
    teacher_n_K: torch.Tensor,
    mask_n: torch.Tensor,
    opts: _Options,
) -> torch.Tensor:
    """Per-position loss of one chunk. ``weight_or_rows`` is ``[n, K, H]`` rows (renormalised) or ``[V, H]``."""
    h = hidden_n_H.to(opts.dtype)
    if opts.renormalize:
        rows_n_K_H = weight_or_rows.to(opts.dtype)
        student_n_K = torch.bmm(rows_n_K_H, h.unsqueeze(-1)).squeeze(-1) / opts.temperature
    else:
        logits_n_V = (h @ weight_or_rows.to(opts.dtype).T) / opts.temperature
        student_n_K = torch.log_softmax(logits_n_V, dim=-1).gather(-1, ids_n_K)
    per = support_divergence_from_logits(
        student_n_K,
        teacher_n_K.to(opts.dtype),
        renormalize=opts.renormalize,
        divergence=opts.divergence,
        beta=opts.beta,
        tail_bucket=opts.tail_bucket,
    )
    return torch.where(mask_n, per, torch.zeros_like(per))


class _SupportFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, ids_N_K, teacher_N_K, mask_N, opts: _Options):  # noqa: D401
        out_N = torch.empty(hidden_N_H.shape[0], dtype=opts.dtype, device=hidden_N_H.device)
        # Autocast off in both passes: the forward runs inside the caller's autocast region and the backward
        # outside it, and a loss whose value and gradient come from different precisions is wrong.
        with torch.no_grad(), torch.autocast(device_type=hidden_N_H.device.type, enabled=False):
            for s in range(0, hidden_N_H.shape[0], opts.chunk_size):
                e = s + opts.chunk_size
                source = weight_V_H[ids_N_K[s:e]] if opts.renormalize else weight_V_H
                out_N[s:e] = _chunk_loss(hidden_N_H[s:e], source, ids_N_K[s:e], teacher_N_K[s:e], mask_N[s:e], opts)
        ctx.save_for_backward(hidden_N_H, weight_V_H, ids_N_K, teacher_N_K, mask_N)
        ctx.opts = opts
        return out_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_N_H, weight_V_H, ids_N_K, teacher_N_K, mask_N = ctx.saved_tensors
        opts: _Options = ctx.opts
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden_N_H) if need_h else None
        # Accumulate the weight gradient in float32 at least: many chunks add into the same rows.
        acc_dtype = torch.promote_types(weight_V_H.dtype, torch.float32)
        grad_w = torch.zeros(weight_V_H.shape, dtype=acc_dtype, device=weight_V_H.device) if need_w else None
        H = hidden_N_H.shape[-1]
        for s in range(0, hidden_N_H.shape[0], opts.chunk_size):
            e = s + opts.chunk_size
            with torch.enable_grad(), torch.autocast(device_type=hidden_N_H.device.type, enabled=False):
                h = hidden_N_H[s:e].detach().requires_grad_(need_h)
                if opts.renormalize:
                    source = weight_V_H.detach()[ids_N_K[s:e]].requires_grad_(need_w)
                else:
                    source = weight_V_H.detach().requires_grad_(need_w)
                per = _chunk_loss(h, source, ids_N_K[s:e], teacher_N_K[s:e], mask_N[s:e], opts)
                wrt = [t for t, need in ((h, need_h), (source, need_w)) if need]
                grads = torch.autograd.grad(per, wrt, grad_N[s:e].to(per.dtype))
            grads = list(grads)
            if need_h:
                grad_h[s:e] = grads.pop(0)
            if need_w:
                g = grads.pop(0)
                if opts.renormalize:
                    grad_w.index_add_(0, ids_N_K[s:e].reshape(-1), g.reshape(-1, H).to(acc_dtype))
                else:
                    grad_w += g.to(acc_dtype)
                del g
            del h, source, per, wrt, grads  # free this chunk's rows and graph before the next one is built
        if grad_w is not None and grad_w.dtype != weight_V_H.dtype:
            grad_w = grad_w.to(weight_V_H.dtype)
        return grad_h, grad_w, None, None, None, None


def support_kl_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    renormalize: bool = True,
    divergence: Divergence = "reverse_kl",
    beta: float = 0.5,
    tail_bucket: bool = False,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """``support_kl(hidden @ weight.T, ...)`` without forming the ``[..., V]`` logits.

    Same values and gradients (with respect to ``hidden`` and ``weight``) as
    ``opdkit.losses.support_kl`` on the dense logits ``hidden @ weight.T``. The renormalised case
    (the default, the paper's method) gathers only the K support rows of ``weight``; the other cases
    are computed from full logits one chunk at a time.

    Args:
        hidden: ``[..., H]`` final hidden states of the student (after the last norm).
        weight: ``[V, H]`` output (LM head) weight; same dtype and device as ``hidden``.
        support_ids: ``[..., K]`` support ids; teacher_logprobs: ``[..., K]`` (``-inf`` = padded slot).
        mask: ``[...]`` bool or 0/1 loss mask.
        renormalize, divergence, beta, tail_bucket, temperature, check_inputs: as in ``support_kl``.
        chunk_size: positions per chunk (memory ``O(chunk · K · H)``, or ``O(chunk · V)`` when
            ``renormalize=False``); default 256 on a CPU (faster and leaner there than 1024, see
            benchmarks/README.md), 1024 on a GPU.

    Returns:
        ``[...]`` per-token loss in float32 (float64 for float64 inputs); 0 where masked. It is computed in
        that precision in the forward and in the backward pass, also inside an autocast region.
    """
    hidden = check_float("hidden", hidden, min_dim=1)
    weight = check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise InputError(
            f"weight: expected shape [V, H] with H = {hidden.shape[-1]} (the last dim of hidden), "
            f"got {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise InputError(f"weight: dtype {weight.dtype} does not match hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise InputError(f"weight: on {weight.device} but hidden is on {hidden.device}")
    if chunk_size is None:
        chunk_size = 256 if hidden.device.type == "cpu" else 1024
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    check_support_options(renormalize, divergence, beta, tail_bucket, temperature)
    mask_b = check_support_inputs(
        ("hidden", hidden), support_ids, teacher_logprobs, mask, weight.shape[0], check_inputs
    )
    if check_inputs:
        check_no_nan("hidden", hidden, allow_neg_inf=False)
        check_no_nan("weight", weight, allow_neg_inf=False)

    leading, K = hidden.shape[:-1], support_ids.shape[-1]
    valid = teacher_logprobs > float("-inf")
    ids = torch.where(valid, support_ids, torch.zeros_like(support_ids)).long()
    opts = _Options(
        renormalize=bool(renormalize),
        divergence=divergence,
        beta=float(beta),
        tail_bucket=bool(tail_bucket),
        temperature=float(temperature),
        chunk_size=chunk_size,
        dtype=result_dtype(hidden, teacher_logprobs),
    )
    out_N = _SupportFromHidden.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        ids.reshape(-1, K),
        teacher_logprobs.reshape(-1, K),
        mask_b.reshape(-1),
        opts,
    )
    return out_N.reshape(leading)
