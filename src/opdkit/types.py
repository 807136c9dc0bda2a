"""The small typed records that the stages of opdkit exchange (prompts -> rollout -> teacher -> loss).

Names carry shapes: ``B`` sequences, ``L`` full length (prompt + response, left-padded prompts), ``P``
padded prompt length, ``T`` response positions (``L = P + T``), ``K`` support slots. One training step
passes them in a fixed order: ``RolloutBatch`` (sampler) -> ``StudentPass`` (student, no grad) ->
``TeacherSignal`` (teacher) -> objective. Stages meet only
at these records; they are never mutated after construction (create a new one with
``dataclasses.replace``). Only torch is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

__all__ = ["RolloutBatch", "StudentPass", "TeacherSignal", "FINISH_STOP", "FINISH_LENGTH"]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def _to(obj, device: torch.device | str):
    """A copy of dataclass ``obj`` with every tensor field moved to ``device``."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
    return type(obj)(**moved)


@dataclass(frozen=True)
class RolloutBatch:
    """Student samples: prompts (left-padded) followed by the sampled responses (right-padded).

    Attributes:
        input_ids_B_L: prompt + response ids; padding where ``attention_mask_B_L`` is 0.
        attention_mask_B_L: 1 on real prompt and response tokens.
        prompt_len: ``P``, the padded prompt length; the response occupies columns ``P:``.
        response_mask_B_T: 1 on tokens the student generated (the loss mask before special-token masking).
        sampled_ids_B_T: the sampled response ids (pad id where ``response_mask_B_T`` is 0).
        old_logprobs_B_T: log π_old of each sampled token under the *untruncated* student (temperature
            applied), 0 where masked.
        sampling_logprobs_B_T: log-prob of each sampled token under the truncated (top-p / top-k)
            distribution actually sampled, 0 where masked.
        finish_reason: per sequence, ``"stop"`` (stop id or string) or ``"length"`` (max new tokens).
        prompt_index: per sequence, the index of its prompt in the prompt list (n samples share it).
        task_ids: per sequence, an optional task or environment name.
        turn_bounds: per sequence, ``(start, end)`` response-column spans of each generated turn, for
            multi-turn episodes (empty for single-turn).
        entropy_B_T, logsumexp_B_T: entropy (nats) and log-normaliser of the untruncated tempered student at
            each position, as sampled (0 outside the response mask); with ``old_logprobs_B_T`` they make a
            ``StudentPass`` without a second forward pass (``rollout.old_logprobs``). None if not recorded.
    """

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    prompt_len: int
    response_mask_B_T: torch.Tensor
    sampled_ids_B_T: torch.Tensor
    old_logprobs_B_T: torch.Tensor
    sampling_logprobs_B_T: torch.Tensor
    finish_reason: tuple[str, ...]
    prompt_index: tuple[int, ...]
    task_ids: tuple[str | None, ...] = ()
    turn_bounds: tuple[tuple[tuple[int, int], ...], ...] = ()
    entropy_B_T: torch.Tensor | None = None
    logsumexp_B_T: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.input_ids_B_L.shape[0])

    @property
    def response_len(self) -> int:
        return int(self.sampled_ids_B_T.shape[1])

    def to(self, device: torch.device | str) -> RolloutBatch:
        return _to(self, device)


@dataclass(frozen=True)
class StudentPass:
    """What one no-grad, teacher-forced pass of the student gives about its own rollout (π_old).

    Computed through the prepared module, in the precision of the training forward pass, so that the
    ratio π_θ / π_old is exactly 1 at the first update on a batch. Values are 0 at positions outside the
    response mask.

    Attributes:
        old_logprobs_B_T: log π_old(y_t) of each sampled token (temperature applied).
        entropy_B_T: entropy (nats) of π_old at each position.
        logsumexp_B_T: log-normaliser of the tempered student logits at each position, so that a later
            forward pass that forms only K support logits can turn them into full-vocabulary log-probs.
        topk_ids_B_T_K, topk_logprobs_B_T_K: the student's own top-K ids and log-probs (only when the
            objective's support source is ``student_topk``; else ``None``).
    """

    old_logprobs_B_T: torch.Tensor
    entropy_B_T: torch.Tensor
    logsumexp_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logprobs_B_T_K: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> StudentPass:
        return _to(self, device)


@dataclass(frozen=True)
class TeacherSignal:
    """What a teacher sends back for a rollout: K ids and floats per response token, never V floats.

    Attributes:
        support_ids_B_T_K: support ids per response position (teacher top-K, student top-K, or top-K
            plus the sampled token in a (K+1)-th slot).
        teacher_logprobs_B_T_K: the teacher's full-vocab normalised log-probs at those ids; ``-inf``
            marks a padded slot (and everything at masked positions).
        sampled_logprobs_B_T: the teacher's log-prob of the sampled token (0 where masked).
        logsumexp_B_T: the teacher's log-normaliser of its (tempered) logits at each position.
        extras: optional named tensors (e.g. diagnostics computed on the teacher side).
    """

    support_ids_B_T_K: torch.Tensor
    teacher_logprobs_B_T_K: torch.Tensor
    sampled_logprobs_B_T: torch.Tensor
    logsumexp_B_T: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> TeacherSignal:
        moved = _to(self, device)
        return TeacherSignal(
            moved.support_ids_B_T_K,
            moved.teacher_logprobs_B_T_K,
            moved.sampled_logprobs_B_T,
            moved.logsumexp_B_T,
            {k: v.to(device) for k, v in self.extras.items()},
        )
