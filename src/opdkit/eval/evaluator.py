"""The evaluator seam, and the evaluator that samples answers and grades them (avg@n).

An evaluator is called by the trainer every ``eval.every_steps`` steps and after the last one, with the
student in eval mode; it returns metrics named ``eval_*`` that go into that step's line of
``metrics.jsonl``. :class:`SamplingEvaluator` samples ``n`` responses per problem with the library's
sampler and grades each with a grader (``opdkit.eval.grade`` by default). Every (problem, sample) has a
fixed seed, the same at every evaluation, so two points of a curve differ by the model only, and the
result does not depend on the batch size or the number of processes (problems are dealt to the
processes, the counts summed over them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from opdkit.config import RolloutConfig
from opdkit.data.prompts import PromptRecord
from opdkit.errors import InputError
from opdkit.eval.answers import grade
from opdkit.rollout.seeding import trajectory_seed
from opdkit.types import FINISH_LENGTH

__all__ = ["EvalSettings", "Evaluator", "SamplingEvaluator"]


@runtime_checkable
class Evaluator(Protocol):
    def evaluate(self, model, tokenizer, step: int) -> dict[str, float]: ...


@dataclass(frozen=True)
class EvalSettings:
    """How answers are sampled: ``n_samples`` per problem, temperature, nucleus, length budget."""

    n_samples: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_size: int = 64
    seed: int = 0


def _no_reduce(values: list[float]) -> list[float]:
    return values


class SamplingEvaluator:
    """avg@n accuracy of sampled answers on ``problems`` (each with an ``answer``).

    Args:
        problems: the problems (``PromptRecord`` with a reference ``answer``).
        settings: sampling (:class:`EvalSettings`).
        grader: ``grader(response_text, answer) -> bool`` (default :func:`opdkit.eval.grade`).
        rank, world: this process's share of the problems is ``problems[rank::world]``.
        reduce_sum: sums a list of floats over the processes (identity in one process).
        generate_fn: optional route for ``generate`` (see ``HFSampler``).
        prefix: metric name prefix.

    Metrics: ``{prefix}accuracy`` (mean correctness over all problems x samples), ``{prefix}response_length``
    (mean tokens), ``{prefix}truncation_rate`` (fraction that hit ``max_new_tokens``).
    """

    def __init__(
        self,
        problems: Sequence[PromptRecord],
        settings: EvalSettings | None = None,
        *,
        grader: Callable[[str, str], bool] = grade,
        rank: int = 0,
        world: int = 1,
        reduce_sum: Callable[[list[float]], list[float]] = _no_reduce,
        generate_fn: Callable | None = None,
        prefix: str = "eval_",
    ):
        if not problems:
            raise InputError("problems: the evaluation set is empty")
        missing = [p.source or f"problem {i}" for i, p in enumerate(problems) if p.answer is None]
        if missing:
            raise InputError(f"evaluation problems need a reference answer; none in {', '.join(missing[:3])}")
        self.problems = list(problems)
        self.settings = settings or EvalSettings()
        self.grader = grader
        self.rank, self.world = rank, world
        self.reduce_sum = reduce_sum
        self.generate_fn = generate_fn
        self.prefix = prefix

    def evaluate(self, model, tokenizer, step: int = 0) -> dict[str, float]:
        from opdkit.rollout.hf_sampler import HFSampler

        s = self.settings
        rollout = RolloutConfig(temperature=s.temperature, top_p=s.top_p, top_k=0, max_new_tokens=s.max_new_tokens,
                                n_samples=s.n_samples)
        sampler = HFSampler(model, tokenizer, rollout, generate_fn=self.generate_fn)
        mine = list(range(self.rank, len(self.problems), self.world))
        per_call = max(1, s.batch_size // s.n_samples)
        correct = tokens = truncated = 0.0
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(mine), per_call):
                chunk = mine[start : start + per_call]
                seeds = [trajectory_seed(s.seed, i, j) for i in chunk for j in range(s.n_samples)]
                batch = sampler.sample([list(self.problems[i].messages) for i in chunk], seeds=seeds)
                texts = [
                    tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                    for ids, m in zip(batch.sampled_ids_B_T, batch.response_mask_B_T, strict=True)
                ]
                answers = [self.problems[i].answer for i in chunk for _ in range(s.n_samples)]
                correct += sum(bool(self.grader(t, a)) for t, a in zip(texts, answers, strict=True))
                tokens += float(batch.response_mask_B_T.sum())
                truncated += sum(r == FINISH_LENGTH for r in batch.finish_reason)
        finally:
            model.train(was_training)
        correct, tokens, truncated = self.reduce_sum([correct, tokens, truncated])
        n = len(self.problems) * s.n_samples
        return {
            f"{self.prefix}accuracy": correct / n,
            f"{self.prefix}response_length": tokens / n,
            f"{self.prefix}truncation_rate": truncated / n,
        }
