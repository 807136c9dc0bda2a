"""The distillation objectives, one class each: what it asks of the teacher, and its per-token loss.

Shapes: ``B`` sequences of a micro-batch, ``T`` response positions, ``N`` positions inside the loss mask
(flattened), ``H`` hidden size, ``V`` output rows, ``K`` support slots.

An objective is the single place that knows one loss of METHOD.md:

- :class:`SupportKL` (objective 3 and the extensions of 4): a divergence on a support set per position,
  renormalised inside it by default (the paper's method). Support from the teacher's top-K, the
  student's top-K (taken by the student pass, then scored by the teacher), or the teacher's top-K plus
  the sampled token, or a nucleus of the teacher's top-K (``teacher_topp``: the fewest ids reaching a mass,
  cut from the teacher's top-K after scoring). Computed from hidden states with only the K support rows of
  the LM head when the head allows it (``objective.fused``; see
  ``opdkit.modeling.OutputHead.unfused_reason``), else from chunked dense logits.
- :class:`FullReverseKL` (objective 2): the reverse KL over the whole shared vocabulary, from chunked
  dense logits against the teacher's full log-probs (``K = V``: needs a local teacher).
- :class:`SampledToken` (objective 1): policy gradient on the per-token reward ``log q − log π_old``,
  discounted by ``γ``; REINFORCE, or PPO-clip when a rollout batch is split into several optimizer steps.

Every objective returns the per-token loss ``[B, T]`` (0 outside the loss mask) and, for the support
diagnostics, the student's full-vocabulary log-probs on the support (detached). The fused path forms only
K logits, so it turns them into log-probs with π_old's log-normaliser from the student pass: exact at the
first optimizer step on a batch (π_θ = π_old), which is where the trainer reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from opdkit.config import ObjectiveConfig
from opdkit.losses import (
    full_reverse_kl,
    policy_gradient_loss,
    sampled_token_advantages,
    support_kl,
    support_kl_from_hidden,
    topp_correction_weights,
)
from opdkit.modeling import OutputHead
from opdkit.student import map_positions, scatter_positions

__all__ = [
    "FullReverseKL",
    "LossInputs",
    "Objective",
    "SampledToken",
    "SupportKL",
    "TeacherRequest",
    "build_objective",
]

SupportSource = Literal["teacher_topk", "student_topk", "teacher_topk_plus_sampled", "full"]


@dataclass(frozen=True)
class TeacherRequest:
    """What an objective asks of the teacher at every response position.

    Attributes:
        support: ``teacher_topk`` (its K most likely ids), ``student_topk`` (its log-probs at the student's
            top-K ids, given with the request), ``teacher_topk_plus_sampled`` (K + 1 slots), or ``full``
            (every id of the shared vocabulary: ``K = V``).
        k: K (ignored for ``full``; taken from the student's ids for ``student_topk``).
    """

    support: SupportSource
    k: int


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's slice of the rollout, the student pass and the teacher signal.

    ``loss_mask_B_T`` is the response mask with the special tokens removed; the other fields are named as
    in ``RolloutBatch``, ``StudentPass`` and ``TeacherSignal``.
    """

    loss_mask_B_T: torch.Tensor
    sampled_ids_B_T: torch.Tensor
    old_logprobs_B_T: torch.Tensor
    old_logsumexp_B_T: torch.Tensor
    support_ids_B_T_K: torch.Tensor
    teacher_logprobs_B_T_K: torch.Tensor
    teacher_sampled_logprobs_B_T: torch.Tensor
    sampling_logprobs_B_T: torch.Tensor | None = None  # log-prob under the (top-p) distribution sampled from
    response_mask_B_T: torch.Tensor | None = None  # the student's sampled tokens (loss mask before special masking)


class Objective:
    """Base class. Subclasses set :attr:`name`, :attr:`request`, and implement :meth:`per_token`.

    Attributes:
        name: the ``objective.kind`` it implements.
        request: what the teacher must send (:class:`TeacherRequest`).
        student_topk: K of the student's own top-K that the student pass must return (0: none).
        support_diagnostics: whether support-set diagnostics (mass on the support, sampled token outside
            it) mean something for this objective (not for ``full``, whose support is everything).
    """

    name: str = ""
    request: TeacherRequest
    nucleus: tuple[float, int] | None = None  # (support_top_p, support_min_k) of a teacher_topp support
    student_topk: int = 0
    support_diagnostics: bool = True

    def __init__(self, *, temperature: float, chunk_size: int):
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)

    def per_token(
        self, head: OutputHead, hidden_B_T_H: torch.Tensor, x: LossInputs, *, ppo: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(per_token_B_T, student_support_logprobs_B_T_K or None)``; ``ppo``: the rollout batch is cut
        into several optimizer steps (only the sampled-token objective reads it)."""
        raise NotImplementedError

    def describe(self, head: OutputHead) -> str:
        """One line saying how the loss is computed for this head (logged at start-up)."""
        return f"{self.name}: chunked dense logits"

    # -------------------------------------------------------------------------------- shared helpers
    def _positions(self, hidden_B_T_H: torch.Tensor, mask_B_T: torch.Tensor):
        B, T, H = hidden_B_T_H.shape
        idx = mask_B_T.reshape(-1).nonzero().squeeze(-1)
        return idx, hidden_B_T_H.reshape(B * T, H)[idx], (B, T)

    def _dense_support(self, head: OutputHead, hidden_B_T_H: torch.Tensor, x: LossInputs, **opts):
        """Support divergence and the student's support log-probs from chunked dense logits."""
        idx, h_N_H, BT = self._positions(hidden_B_T_H, x.loss_mask_B_T)
        K = x.support_ids_B_T_K.shape[-1]
        ids_N_K = x.support_ids_B_T_K.reshape(-1, K)[idx]
        teacher_N_K = x.teacher_logprobs_B_T_K.reshape(-1, K)[idx]
        ones_N = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)

        def chunk(h_n_H, ids_n_K, t_n_K, m_n):
            logits = head.logits(h_n_H)
            per = support_kl(logits, ids_n_K, t_n_K, m_n, temperature=self.temperature, check_inputs=False, **opts)
            lp = torch.log_softmax(logits.detach() / self.temperature, dim=-1)
            safe = torch.where(t_n_K > float("-inf"), ids_n_K, torch.zeros_like(ids_n_K))
            student = lp.gather(-1, safe).masked_fill(t_n_K == float("-inf"), float("-inf"))
            return per, student

        per_N, student_N_K = map_positions(chunk, h_N_H, ids_N_K, teacher_N_K, ones_N, chunk_size=self.chunk_size)
        return (
            scatter_positions(per_N, idx, BT),
            scatter_positions(student_N_K, idx, (*BT, K), fill=float("-inf")),
        )


class SupportKL(Objective):
    """Divergence on a support set per position (METHOD.md objective 3; extensions of objective 4)."""

    name = "support_kl"

    def __init__(self, cfg: ObjectiveConfig, *, temperature: float, chunk_size: int):
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        # A nucleus support is cut from the teacher's top-K_max after scoring (any teacher can send that).
        self.request = TeacherRequest("teacher_topk" if cfg.support == "teacher_topp" else cfg.support, cfg.top_k)
        self.nucleus = (cfg.support_top_p, cfg.support_min_k) if cfg.support == "teacher_topp" else None
        self.student_topk = cfg.top_k if cfg.support == "student_topk" else 0
        self.fused = cfg.fused
        self.opts = dict(
            renormalize=cfg.renormalize, divergence=cfg.divergence, beta=cfg.jsd_beta, tail_bucket=cfg.tail_bucket
        )

    def _use_fused(self, head: OutputHead) -> bool:
        return self.fused and head.fused_weight is not None

    def describe(self, head: OutputHead) -> str:
        if self._use_fused(head):
            return "support_kl: fused, from hidden states and the K support rows of the LM head"
        why = "objective.fused=false" if not self.fused else head.unfused_reason
        return f"support_kl: chunked dense logits ({why})"

    def per_token(self, head, hidden_B_T_H, x, *, ppo):
        if not self._use_fused(head):
            return self._dense_support(head, hidden_B_T_H, x, **self.opts)
        weight = head.fused_weight
        # logits = scale · h·W: the scale folds into the temperature exactly.
        temperature = self.temperature / head.scale
        per = support_kl_from_hidden(
            hidden_B_T_H.to(weight.dtype),
            weight,
            x.support_ids_B_T_K,
            x.teacher_logprobs_B_T_K,
            x.loss_mask_B_T,
            temperature=temperature,
            chunk_size=self.chunk_size,
            check_inputs=False,
            **self.opts,
        )
        return per, self._support_logprobs(weight, hidden_B_T_H, x, temperature)

    @torch.no_grad()
    def _support_logprobs(self, weight, hidden_B_T_H, x: LossInputs, temperature: float) -> torch.Tensor:
        """Student log-probs on the support from K gathered rows and π_old's log-normaliser."""
        idx, h_N_H, BT = self._positions(hidden_B_T_H.detach(), x.loss_mask_B_T)
        K = x.support_ids_B_T_K.shape[-1]
        t_N_K = x.teacher_logprobs_B_T_K.reshape(-1, K)[idx]
        ids_N_K = torch.where(t_N_K > float("-inf"), x.support_ids_B_T_K.reshape(-1, K)[idx], 0)
        lse_N = x.old_logsumexp_B_T.reshape(-1)[idx]
        out = []
        for s in range(0, idx.shape[0], self.chunk_size):
            rows = weight[ids_N_K[s : s + self.chunk_size]].float()  # [n, K, H]
            z = torch.bmm(rows, h_N_H[s : s + self.chunk_size].float().unsqueeze(-1)).squeeze(-1) / temperature
            out.append(z - lse_N[s : s + self.chunk_size, None])
        lp_N_K = torch.cat(out) if out else h_N_H.new_zeros((0, K), dtype=torch.float32)
        lp_N_K = lp_N_K.masked_fill(t_N_K == float("-inf"), float("-inf"))
        return scatter_positions(lp_N_K, idx, (*BT, K), fill=float("-inf"))


class FullReverseKL(Objective):
    """Reverse KL over the whole shared vocabulary (METHOD.md objective 2), from chunked dense logits."""

    name = "full_reverse_kl"
    support_diagnostics = False

    def __init__(self, cfg: ObjectiveConfig, *, temperature: float, chunk_size: int):
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        self.request = TeacherRequest("full", 0)

    def describe(self, head):
        return "full_reverse_kl: chunked dense logits against the teacher's full log-probs"

    def per_token(self, head, hidden_B_T_H, x, *, ppo):
        idx, h_N_H, BT = self._positions(hidden_B_T_H, x.loss_mask_B_T)
        V = x.teacher_logprobs_B_T_K.shape[-1]  # the shared vocabulary (teacher rows may be padded beyond)
        teacher_BT_V = x.teacher_logprobs_B_T_K.reshape(-1, V)  # rows are gathered per chunk: no [N, V] copy

        def chunk(h_n_H, idx_n):
            # log_softmax of the teacher's log-probs on the shared ids renormalises them there.
            student = head.logits(h_n_H)[:, :V] / self.temperature
            ones = torch.ones(idx_n.shape[0], dtype=torch.bool, device=idx_n.device)
            return (full_reverse_kl(student, teacher_BT_V[idx_n], ones, check_inputs=False),)

        (per_N,) = map_positions(chunk, h_N_H, idx, chunk_size=self.chunk_size)
        return scatter_positions(per_N, idx, BT), None


class SampledToken(Objective):
    """Policy gradient on the sampled token's reward ``log q(y_t) − log π_old(y_t)`` (METHOD.md objective 1).

    The teacher still sends its top-K: the support diagnostics (mass on it, sampled token outside it)
    are logged for this baseline too.
    """

    name = "sampled_token"

    def __init__(self, cfg: ObjectiveConfig, *, temperature: float, chunk_size: int):
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        self.request = TeacherRequest("teacher_topk", cfg.top_k)
        self.gamma, self.clip, self.ppo_clip_eps = cfg.gamma, cfg.reward_clip, cfg.ppo_clip_eps
        self.correction, self.correction_clip = cfg.topp_correction, cfg.topp_correction_clip

    def describe(self, head):
        extra = "" if self.correction == "none" else f", top-p {self.correction} importance weights"
        return f"sampled_token: log π(y_t) from chunked dense logits, γ = {self.gamma:g}{extra}"

    def per_token(self, head, hidden_B_T_H, x, *, ppo):
        idx, h_N_H, BT = self._positions(hidden_B_T_H, x.loss_mask_B_T)
        K = x.support_ids_B_T_K.shape[-1]
        sampled_N = x.sampled_ids_B_T.reshape(-1)[idx].long()
        t_N_K = x.teacher_logprobs_B_T_K.reshape(-1, K)[idx]
        ids_N_K = torch.where(t_N_K > float("-inf"), x.support_ids_B_T_K.reshape(-1, K)[idx], 0)

        def chunk(h_n_H, y_n, ids_n_K, t_n_K):
            lp = torch.log_softmax(head.logits(h_n_H) / self.temperature, dim=-1)
            support = lp.detach().gather(-1, ids_n_K).masked_fill(t_n_K == float("-inf"), float("-inf"))
            return lp.gather(-1, y_n.unsqueeze(-1)).squeeze(-1), support

        lp_N, support_N_K = map_positions(chunk, h_N_H, sampled_N, ids_N_K, t_N_K, chunk_size=self.chunk_size)
        logprobs_B_T = scatter_positions(lp_N, idx, BT)
        adv = sampled_token_advantages(
            x.teacher_sampled_logprobs_B_T, x.old_logprobs_B_T, x.loss_mask_B_T, gamma=self.gamma, clip=self.clip
        )
        per = policy_gradient_loss(
            logprobs_B_T, x.old_logprobs_B_T, adv, x.loss_mask_B_T, clip_eps=self.ppo_clip_eps if ppo else None
        )
        if self.correction != "none":
            per = per * topp_correction_weights(x.old_logprobs_B_T, x.sampling_logprobs_B_T, x.loss_mask_B_T,
                                                mode=self.correction, clip=self.correction_clip,
                                                sampled_mask=x.response_mask_B_T).to(per.dtype)
        return per, scatter_positions(support_N_K, idx, (*BT, K), fill=float("-inf"))


_OBJECTIVES = {cls.name: cls for cls in (SupportKL, FullReverseKL, SampledToken)}


def build_objective(cfg: ObjectiveConfig, *, temperature: float, chunk_size: int) -> Objective:
    """The objective of ``objective.kind`` (the config has validated the choice)."""
    return _OBJECTIVES[cfg.kind](cfg, temperature=temperature, chunk_size=chunk_size)
