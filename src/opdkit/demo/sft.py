"""Supervised fine-tuning of the demo models on worked solutions (loss on the response tokens only).

An example is ``prompt ids + response ids + EOS``: the prompt is the chat template with the generation
prompt, rendered by :func:`opdkit.data.chat.render_chat` (the one chat renderer: exactly the ids the
rollout sampler feeds the model), the response the solution text followed by the tokenizer's EOS token
(``<|im_end|>``), which is how a sampled response ends. Labels are ``-100`` on the prompt and on
padding, so the loss is the mean next-token cross-entropy over response tokens (EOS included) of the
batch. AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from opdkit.data.chat import render_chat
from opdkit.demo.task import Problem, chat_messages
from opdkit.errors import InputError

__all__ = ["IGNORE", "SFTExample", "encode_prompts", "build_examples", "collate", "sft_train", "lr_at"]

IGNORE = -100


@dataclass(frozen=True)
class SFTExample:
    """``input_ids`` (prompt + response + EOS) and ``labels`` (``IGNORE`` on the prompt), equal length."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def encode_prompts(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """Token ids of each problem's chat prompt, with the assistant generation prompt (:func:`render_chat`)."""
    return [render_chat(tokenizer, chat_messages(p)) for p in problems]


def build_examples(tokenizer, problems: Sequence[Problem]) -> list[SFTExample]:
    """One :class:`SFTExample` per problem; the loss will see only the solution tokens and EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("tokenizer: has no EOS token, so a response cannot end")
    prompts = encode_prompts(tokenizer, problems)
    responses = tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]
    out = []
    for p_ids, r_ids in zip(prompts, responses):
        r_ids = [*r_ids, eos]
        out.append(SFTExample(tuple(p_ids) + tuple(r_ids), (IGNORE,) * len(p_ids) + tuple(r_ids)))
    return out


def collate(examples: Sequence[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids_B_L, attention_mask_B_L, labels_B_L)``; labels are ``IGNORE`` on padding."""
    L = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, mask, labels


def lr_at(step: int, *, lr: float, steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` down to ``min_lr_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def response_loss(
    model, ids_B_L: torch.Tensor, mask_B_L: torch.Tensor, labels_B_L: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not ``IGNORE``."""
    logits = model(input_ids=ids_B_L, attention_mask=mask_B_L).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels_B_L[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


def sft_train(
    model,
    examples: Sequence[SFTExample],
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    min_lr_ratio: float,
    weight_decay: float,
    seed: int,
    label_smoothing: float = 0.0,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
    name: str = "sft",
    stop_check: Callable[[int], bool] | None = None,
    check_every: int = 100,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on shuffled batches; returns the loss per step.

    Batches draw examples without replacement, reshuffling each epoch (``random.Random(seed)``).
    ``stop_check(step)``, if given, is called after every ``check_every`` steps (with the number of
    steps done, the model in eval mode) and ends training early when it returns True.
    Leaves the model in eval mode.
    """
    if not examples:
        raise InputError("examples: expected at least one SFT example")
    if steps < 0 or batch_size < 1:
        raise InputError(f"steps >= 0 and batch_size >= 1 expected, got {steps}, {batch_size}")
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    order: list[int] = []
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=lr, steps=steps, warmup=warmup, min_lr_ratio=min_lr_ratio)
        loss = response_loss(model, *collate(batch, pad_id), label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log(
                f"{name}: step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
        if stop_check is not None and (step + 1) % check_every == 0 and step + 1 < steps:
            model.eval()
            if stop_check(step + 1):
                break
            model.train()
    model.eval()
    return losses
