"""The local teacher: a Hugging Face causal LM in this process, scoring the student's rollouts.

``LocalTeacher.score(batch)`` runs one teacher-forced pass over prompt + response and returns a
``TeacherSignal``: per response position, K support ids with the teacher's full-vocabulary log-probs,
the log-prob of the sampled token and the log-sum-exp of the (tempered) logits.

Memory. The transformer body runs once over the whole batch (hidden states ``[B, L, H]``); the LM head
and the log-softmax are then applied to the *response positions only* (positions where
``response_mask_B_T`` is set, flattened over the batch), ``chunk_size`` positions at a time. Peak memory
of the scoring step is therefore O(chunk_size x V), never the ``[B, T, V]`` (let alone ``[B, L, V]``) of
a plain ``model(input_ids).logits``. The logits of response position ``t`` come from hidden position
``P + t - 1`` (``P`` = padded prompt length).

Positions. ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`` is passed explicitly, so a
left-padded sequence is scored like the same sequence without padding (a plain HF forward would count the
pad columns as positions) — the same positions and attention, up to float rounding: a longer padded row
changes the kernels' summation, by ~1e-6 in the log-probs.

Precision. The LM head runs in the model's dtype (e.g. bfloat16); temperature, log-softmax, top-K and
log-sum-exp are computed in float32 (float64 if the model is float64). Returned log-probs are float32
(float64 for a float64 model).

Vocabulary. Checkpoints often pad the LM head beyond the tokenizer (Qwen2.5: 152064 rows vs 151936 /
151665 tokens). With ``student_vocab_size`` the *support* (top-K) is restricted to ids
``< student_vocab_size`` so the student can index every support id; the log-probs stay normalised over
the teacher's *full* LM head (the padded rows have near-zero mass in trained checkpoints, and keeping
the teacher's own normaliser means ``logsumexp_B_T`` and the sampled-token log-probs are exactly the
teacher's distribution).

Output transforms. The logits are the model's own (``opdkit.modeling``: Gemma soft-capping, Cohere and
Granite logit scales, ...), checked once at construction against ``model(...).logits``.

Support ``full`` (the full-vocabulary reverse KL): every id of the shared vocabulary is the support
(``K = student_vocab_size`` or the teacher's rows). ``support_ids_B_T_K`` is then a stride-0 view of
``arange(K)`` (no memory) and ``teacher_logprobs_B_T_K`` holds all ``[B, T, K]`` log-probs.

Masked positions (``response_mask_B_T == 0``) are not scored: their ``teacher_logprobs`` are ``-inf`` in
every slot, their support ids 0, ``sampled_logprobs`` and ``logsumexp`` 0.

Results are computed under ``torch.no_grad`` (not ``inference_mode``: the returned tensors are used as
constants inside the student's autograd graph, which inference tensors cannot be).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opdkit.data.chat import left_pad, render_chat
from opdkit.errors import InputError
from opdkit.losses.support import add_sampled_token, drop_support_ids
from opdkit.modeling import ModelingError, hidden_states, output_head, position_ids_from_mask, verify_output_head
from opdkit.types import RolloutBatch, TeacherSignal

__all__ = ["LocalTeacher", "SUPPORT_SOURCES", "own_template_batch", "position_ids_from_mask"]

SUPPORT_SOURCES = ("teacher_topk", "student_topk", "teacher_topk_plus_sampled", "full")


def _check_pos_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise InputError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _is_int_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


class LocalTeacher:
    """Scores rollouts with a local Hugging Face causal LM, chunked over response positions.

    Args:
        model: a ``*ForCausalLM`` (anything with ``base_model`` returning hidden states and
            ``get_output_embeddings()``), in eval mode.
        tokenizer: the teacher's tokenizer; needed only for ``score(..., messages=...)`` (own chat template).
        top_k: support size K for the ``teacher_topk`` sources (``student_topk`` takes K from the given ids).
        chunk_size: response positions (flattened over the batch) per LM-head chunk; peak memory of the
            scoring step is O(chunk_size x V).
        temperature: logits are divided by it before the softmax (use the rollout temperature).
        support: ``"teacher_topk"``, ``"student_topk"`` or ``"teacher_topk_plus_sampled"`` (K+1 slots; the
            last holds the sampled id when it is not already in the top-K, else it is a padded ``-inf`` slot), or
            ``"full"`` (every id of the shared vocabulary; see the module docstring).
        student_vocab_size: restrict the top-K support to ids ``< student_vocab_size`` (log-probs stay
            normalised over the teacher's full LM head; see the module docstring).
        verify: check once that opdkit reproduces ``model(...).logits`` (``opdkit.modeling.verify_output_head``).
        drop_ids: ids turned into padded slots (``-inf``) wherever they appear in a support set (all slots,
            including the sampled slot of ``teacher_topk_plus_sampled``); ``sampled_logprobs`` is unaffected.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        top_k: int = 32,
        chunk_size: int = 256,
        temperature: float = 1.0,
        support: str = "teacher_topk",
        student_vocab_size: int | None = None,
        drop_ids: Sequence[int] = (),
        verify: bool = True,
    ) -> None:
        try:
            head = output_head(model)
            if verify:
                verify_output_head(model)
        except ModelingError as exc:
            raise InputError(f"model: {exc}") from None
        self.model = model
        self.tokenizer = tokenizer
        self._head = head
        self.vocab_size = head.rows
        self.top_k = _check_pos_int("top_k", top_k)
        self.chunk_size = _check_pos_int("chunk_size", chunk_size)
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
                or not math.isfinite(temperature)):
            raise InputError(f"temperature: expected a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        if support not in SUPPORT_SOURCES:
            raise InputError(f"support: expected one of {', '.join(SUPPORT_SOURCES)}, got {support!r}")
        self.support = support
        if student_vocab_size is not None:
            _check_pos_int("student_vocab_size", student_vocab_size)
            if student_vocab_size > self.vocab_size:
                raise InputError(
                    f"student_vocab_size: expected <= the teacher's vocabulary {self.vocab_size}, "
                    f"got {student_vocab_size}"
                )
        self.student_vocab_size = student_vocab_size
        topk_vocab = student_vocab_size or self.vocab_size
        if support not in ("student_topk", "full") and self.top_k > topk_vocab:
            raise InputError(f"top_k: expected <= the vocabulary the support is drawn from ({topk_vocab}), got {top_k}")
        ids = list(drop_ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise InputError(f"drop_ids: expected non-negative int token ids, got {i!r}")
        self.drop_ids = tuple(ids)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device=None,
        tokenizer_path: str | Path | None = None,
        **kw,
    ) -> LocalTeacher:
        """Load the model (and its tokenizer, if the directory has one) from a local directory.

        ``kw`` go to ``__init__`` (top_k, chunk_size, temperature, support, student_vocab_size, drop_ids).
        """
        from opdkit.hf import load_causal_lm, load_tokenizer

        model = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
        tok_dir = Path(tokenizer_path if tokenizer_path is not None else path).expanduser()
        has_tok = tokenizer_path is not None or any(
            (tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        )
        tokenizer = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code) if has_tok else None
        return cls(model, tokenizer, **kw)

    @classmethod
    def from_config(cls, teacher_cfg, objective_cfg=None, *, device=None, **kw) -> LocalTeacher:
        """From ``TeacherConfig`` (path, dtype, trust_remote_code, chunk_size) and ``ObjectiveConfig``
        (support, top_k); ``kw`` (temperature, student_vocab_size, drop_ids) go to ``__init__``."""
        if not getattr(teacher_cfg, "path", None):
            raise InputError("teacher.path: a local teacher needs a model directory (teacher.url is a remote one)")
        if objective_cfg is not None:
            kw.setdefault("support", objective_cfg.support)
            kw.setdefault("top_k", objective_cfg.top_k)
        kw.setdefault("chunk_size", teacher_cfg.chunk_size)
        from opdkit.train.precision import teacher_load_dtype

        return cls.from_pretrained(
            teacher_cfg.path,
            # outside a run: run resolves to what a run on this device would pick
            dtype=teacher_load_dtype(teacher_cfg.dtype, "auto", device),
            trust_remote_code=teacher_cfg.trust_remote_code,
            device=device,
            **kw,
        )

    @property
    def device(self) -> torch.device:
        return self._head.weight.device

    @property
    def logits_dtype(self) -> torch.dtype:
        return torch.float64 if self._head.weight.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------------------------------
    def _check_batch(self, batch: RolloutBatch) -> None:
        if not isinstance(batch, RolloutBatch):
            raise InputError(f"batch: expected a RolloutBatch, got {type(batch).__name__}")
        ids, att = batch.input_ids_B_L, batch.attention_mask_B_L
        if not _is_int_tensor(ids) or ids.dim() != 2:
            raise InputError(f"batch.input_ids_B_L: expected a 2-D integer tensor [B, L], got {_describe(ids)}")
        B, L = ids.shape
        if not isinstance(att, torch.Tensor) or att.shape != ids.shape:
            raise InputError(
                f"batch.attention_mask_B_L: expected shape [{B}, {L}] (as input_ids_B_L), got {_describe(att)}"
            )
        P = batch.prompt_len
        if isinstance(P, bool) or not isinstance(P, int) or not 1 <= P < L:
            raise InputError(f"batch.prompt_len: expected an int with 1 <= prompt_len < L = {L}, got {P!r}")
        T = L - P
        for name in ("response_mask_B_T", "sampled_ids_B_T"):
            x = getattr(batch, name)
            if not isinstance(x, torch.Tensor) or x.shape != (B, T):
                raise InputError(
                    f"batch.{name}: expected shape [{B}, {T}] (B, L - prompt_len), got {_describe(x)}"
                )
        if not _is_int_tensor(batch.sampled_ids_B_T):
            raise InputError(
                f"batch.sampled_ids_B_T: expected integer token ids, got dtype {batch.sampled_ids_B_T.dtype}"
            )

    def _own_template_batch(self, batch: RolloutBatch, messages) -> RolloutBatch:
        return own_template_batch(self.tokenizer, batch, messages)

    def _logits(self, hidden_N_H: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Tempered logits ``[N, V]`` in ``dtype`` (the model's own output transforms applied)."""
        logits = self._head.logits(hidden_N_H).to(dtype)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    @torch.no_grad()
    def score(
        self,
        batch: RolloutBatch,
        *,
        student_support_ids_B_T_K: torch.Tensor | None = None,
        messages: Sequence[Sequence[dict]] | None = None,
    ) -> TeacherSignal:
        """Teacher-forced scoring of ``batch``'s responses -> ``TeacherSignal`` (on the batch's device).

        Args:
            batch: the student's rollout (left-padded prompts, right-padded responses).
            student_support_ids_B_T_K: for ``support="student_topk"`` (required there, refused otherwise):
                the ids at which to return the teacher's log-probs; K is taken from its last axis.
            messages: to render the prompt with the teacher's *own* chat template (``own_chat_template``):
                one chat (list of ``{"role", "content"}`` dicts) per sequence of the batch. The prompt is
                re-tokenized with the teacher tokenizer and the *same response ids* are appended, so this
                requires the teacher and student to share a vocabulary (response ids mean the same tokens).
        """
        self._check_batch(batch)
        B, T = batch.sampled_ids_B_T.shape
        if self.support == "student_topk":
            s = student_support_ids_B_T_K
            if s is None:
                raise InputError("student_support_ids_B_T_K: required when support='student_topk'")
            if not _is_int_tensor(s) or s.dim() != 3 or tuple(s.shape[:2]) != (B, T) or s.shape[2] < 1:
                raise InputError(
                    f"student_support_ids_B_T_K: expected an integer tensor [{B}, {T}, K>=1], got {_describe(s)}"
                )
        elif student_support_ids_B_T_K is not None:
            raise InputError(f"student_support_ids_B_T_K: only used with support='student_topk', not {self.support!r}")
        out_device = batch.input_ids_B_L.device
        if messages is not None:
            batch = self._own_template_batch(batch, messages)

        dev = self.device
        att = batch.attention_mask_B_L.to(dev).long()
        # padding columns may hold any id (they are never attended to); the embedding still reads them
        input_ids = batch.input_ids_B_L.to(dev).masked_fill(att == 0, 0)
        if input_ids.numel() and (int(input_ids.max()) >= self.vocab_size or int(input_ids.min()) < 0):
            raise InputError(f"batch.input_ids_B_L: ids at attended positions must be in [0, {self.vocab_size})")
        P = batch.prompt_len
        mask_N = (batch.response_mask_B_T.to(dev) != 0).reshape(-1)
        sampled_N = batch.sampled_ids_B_T.to(dev).long().reshape(-1)
        idx = mask_N.nonzero().squeeze(-1)  # flattened (b, t) of scored positions
        if idx.numel() and (int(sampled_N[idx].max()) >= self.vocab_size or int(sampled_N[idx].min()) < 0):
            raise InputError(f"batch.sampled_ids_B_T: ids at response positions must be in [0, {self.vocab_size})")
        if self.support == "student_topk":
            sup_N_K = student_support_ids_B_T_K.to(dev).long().reshape(B * T, -1)
            if idx.numel() and (int(sup_N_K[idx].max()) >= self.vocab_size or int(sup_N_K[idx].min()) < 0):
                raise InputError(
                    f"student_support_ids_B_T_K: ids at response positions must be in [0, {self.vocab_size})"
                )
            K = sup_N_K.shape[1]
        elif self.support == "full":
            K = self.student_vocab_size or self.vocab_size
        else:
            K = self.top_k
        slots = K + 1 if self.support == "teacher_topk_plus_sampled" else K

        dtype = torch.float64 if self._head.weight.dtype == torch.float64 else torch.float32
        if self.support == "full":  # every id: a stride-0 view, no [B, T, V] integer tensor
            ids_N_K = torch.arange(slots, device=dev).expand(B * T, slots)
        else:
            ids_N_K = torch.zeros((B * T, slots), dtype=torch.long, device=dev)
        lp_N_K = torch.full((B * T, slots), float("-inf"), dtype=dtype, device=dev)
        sampled_lp_N = torch.zeros(B * T, dtype=dtype, device=dev)
        lse_N = torch.zeros(B * T, dtype=dtype, device=dev)

        if idx.numel():
            hidden_B_L_H = hidden_states(self.model, input_ids, att)
            H = hidden_B_L_H.shape[-1]
            hidden_N_H = hidden_B_L_H[:, P - 1 : P + T - 1].reshape(B * T, H)
            vs = self.student_vocab_size
            for s in range(0, idx.numel(), self.chunk_size):
                rows = idx[s : s + self.chunk_size]
                logp = self._logits(hidden_N_H[rows], dtype)  # [c, V] tempered logits
                lse = torch.logsumexp(logp, dim=-1)
                logp.sub_(lse.unsqueeze(-1))  # -> full-vocab log-probs, in place
                y_lp = logp.gather(-1, sampled_N[rows].unsqueeze(-1)).squeeze(-1)
                if self.support == "full":
                    ids_c, vals_c = None, logp[:, :K]
                elif self.support == "student_topk":
                    ids_c = sup_N_K[rows]
                    vals_c = logp.gather(-1, ids_c)
                else:
                    vals_c, ids_c = torch.topk(logp if vs is None else logp[:, :vs], K, dim=-1)
                    if self.support == "teacher_topk_plus_sampled":
                        ids_c, vals_c = add_sampled_token(ids_c, vals_c, sampled_N[rows], y_lp)
                if ids_c is not None:
                    ids_N_K[rows] = ids_c
                lp_N_K[rows] = vals_c
                sampled_lp_N[rows] = y_lp
                lse_N[rows] = lse
                del logp
            del hidden_B_L_H, hidden_N_H
            if self.drop_ids:
                lp_N_K = drop_support_ids(ids_N_K, lp_N_K, self.drop_ids)

        return TeacherSignal(
            support_ids_B_T_K=(
                torch.arange(slots, device=out_device).expand(B, T, slots)
                if self.support == "full"
                else ids_N_K.reshape(B, T, slots).to(out_device)
            ),
            teacher_logprobs_B_T_K=lp_N_K.reshape(B, T, slots).to(out_device),
            sampled_logprobs_B_T=sampled_lp_N.reshape(B, T).to(out_device),
            logsumexp_B_T=lse_N.reshape(B, T).to(out_device),
        )

    __call__ = score


def own_template_batch(tokenizer, batch: RolloutBatch, messages) -> RolloutBatch:
    """The same responses after prompts re-rendered with the teacher's chat template (left-padded)."""
    if tokenizer is None:
        raise InputError("messages: scoring with the teacher's own chat template needs the teacher tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("messages: the teacher tokenizer has no chat template")
    B = batch.batch_size
    if isinstance(messages, (str, bytes)) or len(messages) != B:
        n = "a string" if isinstance(messages, (str, bytes)) else len(messages)
        raise InputError(
            f"messages: expected one conversation (list of message dicts) per sequence, B = {B}, got {n}"
        )
    prompts = [render_chat(tokenizer, conv) for conv in messages]
    if not all(prompts):
        raise InputError("messages: a conversation rendered to an empty prompt")
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_att = left_pad(prompts, 0 if pad is None else int(pad), device=batch.input_ids_B_L.device)
    P2 = prompt_ids.shape[1]
    P = batch.prompt_len
    from dataclasses import replace

    return replace(
        batch,
        input_ids_B_L=torch.cat([prompt_ids.to(batch.input_ids_B_L.dtype), batch.input_ids_B_L[:, P:]], dim=1),
        attention_mask_B_L=torch.cat(
            [prompt_att.to(batch.attention_mask_B_L.dtype), batch.attention_mask_B_L[:, P:]], dim=1
        ),
        prompt_len=P2,
    )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {_shape(x)} dtype {x.dtype}"
    return type(x).__name__
