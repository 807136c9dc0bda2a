"""The demo's responses and accuracies, sampled with the library's sampler (:class:`opdkit.rollout.HFSampler`).

:func:`generate_responses` samples one response per problem (τ, nucleus top-p, no top-k), for the SFT
baseline's teacher samples. Accuracies are measured by the library's evaluator (:func:`demo_evaluator`,
:func:`evaluate_accuracy`), the one the trainer calls during OPD. The prompt is the problem's chat rendered
by :func:`opdkit.data.chat.render_chat`, as everywhere else.

Seeds: problem ``i`` of the list is sampled with its own seed ``trajectory_seed(seed, i, 0)``, and a
row's random numbers depend on its seed only (:mod:`opdkit.rollout.seeding`). A problem's response
therefore does not depend on the batch size or on the other problems in its batch, and the caller's
global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opdkit.demo.task import Problem, chat_messages
from opdkit.errors import InputError

__all__ = ["Responses", "demo_evaluator", "evaluate_accuracy", "generate_responses"]


@dataclass(frozen=True)
class Responses:
    """Sampled responses, one per problem: decoded ``texts`` (special tokens removed), ``num_tokens``
    generated (EOS included), and whether each ``finished`` with EOS within the budget."""

    texts: list[str]
    num_tokens: list[int]
    finished: list[bool]


def generate_responses(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> Responses:
    """One sampled response per problem (τ = ``temperature``, nucleus ``top_p``, no top-k).

    Problems go to the sampler ``batch_size`` at a time; problem ``i`` is sampled with the seed
    ``trajectory_seed(seed, i, 0)``, so the same seed, problems and settings give the same responses
    whatever the batch size. The model is sampled in eval mode and left in the mode it was in.
    """
    from opdkit.config import RolloutConfig
    from opdkit.rollout import HFSampler
    from opdkit.rollout.seeding import trajectory_seed
    from opdkit.types import FINISH_STOP

    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens and batch_size: expected >= 1, got {max_new_tokens}, {batch_size}")
    if not (0 < top_p <= 1 and temperature > 0):
        raise InputError(f"expected 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}")
    texts: list[str] = []
    num_tokens: list[int] = []
    finished: list[bool] = []
    if not problems:
        return Responses(texts, num_tokens, finished)
    settings = RolloutConfig(temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, n_samples=1)
    sampler = HFSampler(model, tokenizer, settings, record_stats=False)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            seeds = [trajectory_seed(seed, start + i, 0) for i in range(len(chunk))]
            batch = sampler.sample([chat_messages(p) for p in chunk], n_samples=1, seeds=seeds)
            for ids, mask, reason in zip(
                batch.sampled_ids_B_T, batch.response_mask_B_T, batch.finish_reason, strict=True
            ):
                row = ids[mask.bool()].tolist()
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
                num_tokens.append(len(row))
                finished.append(reason == FINISH_STOP)
    finally:
        model.train(was_training)
    return Responses(texts, num_tokens, finished)


def demo_evaluator(problems: Sequence[Problem], *, max_new_tokens: int, top_p: float = 0.9,
                   temperature: float = 1.0, seed: int = 0, batch_size: int = 64):
    """The demo's accuracy protocol as the library's evaluator (:class:`opdkit.eval.SamplingEvaluator`): one
    sampled answer per problem (τ, nucleus top-p), graded by :func:`opdkit.eval.grade`, seeds from ``seed``.
    The trainer calls the same object during OPD, so every accuracy of the demo is measured one way."""
    from opdkit.data import PromptRecord
    from opdkit.eval import EvalSettings, SamplingEvaluator

    records = [PromptRecord(tuple(chat_messages(p)), p.answer, None, f"problem {i}") for i, p in enumerate(problems)]
    return SamplingEvaluator(records, EvalSettings(n_samples=1, temperature=temperature, top_p=top_p,
                                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                                   grading_processes=0))


def evaluate_accuracy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Fraction of ``problems`` answered correctly by one sampled response each (0.0 for no problems), by
    :func:`demo_evaluator`: METHOD.md's protocol by default (τ = 1.0, top-p 0.9, answer = last ``\\boxed{}``
    after ``</think>``)."""
    if not problems:
        return 0.0
    ev = demo_evaluator(problems, max_new_tokens=max_new_tokens, top_p=top_p, temperature=temperature, seed=seed,
                        batch_size=batch_size)
    return ev.evaluate(model, tokenizer)["eval_accuracy"]
