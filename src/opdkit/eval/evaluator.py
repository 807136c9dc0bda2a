"""The evaluator seam, and the evaluator that samples answers and grades them (avg@n, pass@k).

An evaluator is called by the trainer every ``eval.every_steps`` steps and after the last one, with the
student in eval mode; it returns metrics named ``eval_*`` that go into that step's line of
``metrics.jsonl``. :class:`SamplingEvaluator` samples ``n`` responses per problem of one or more
:class:`~opdkit.eval.benchmarks.Benchmark` with the library's sampler and grades each one: math answers by
extraction and symbolic equivalence in a pool of grading processes, built-in tasks by their own verifier.
``opdkit eval`` drives the same class (:meth:`SamplingEvaluator.run`) and keeps every sample.

Every (benchmark, problem, sample) has a fixed seed, the same at every evaluation, so two points of a
curve differ by the model only, and a sample does not depend on the batch size, on the other samples in
its batch, or on the number of processes (the trainer deals the problems to the processes and sums the
counts).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from opdkit.config import RolloutConfig
from opdkit.data.prompts import PromptRecord
from opdkit.errors import InputError
from opdkit.eval.answers import check_fallbacks, extract_answer
from opdkit.rollout.seeding import trajectory_seed
from opdkit.types import FINISH_LENGTH

__all__ = ["EvalSettings", "Evaluator", "Sample", "SamplingEvaluator", "benchmark_seed"]


@runtime_checkable
class Evaluator(Protocol):
    def evaluate(self, model, tokenizer, step: int) -> dict[str, float]: ...


@dataclass(frozen=True)
class EvalSettings:
    """How answers are sampled and graded.

    ``n_samples`` per problem at ``temperature`` and nucleus ``top_p`` (the paper's τ 1.0, p 0.9), or
    ``greedy`` (one deterministic answer, ``n_samples`` must be 1); ``max_new_tokens`` per answer;
    ``batch_size`` answers per call of the sampler; ``seed`` of every sample; ``fallbacks``: answer
    fall-backs when there is no box (:data:`opdkit.eval.answers.FALLBACKS`); math answers are graded in
    ``grading_processes`` worker processes, each grade within ``grading_timeout_s`` seconds.
    """

    n_samples: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_size: int = 64
    seed: int = 0
    greedy: bool = False
    fallbacks: tuple[str, ...] = ()
    grading_processes: int = 2
    grading_timeout_s: float = 5.0

    def __post_init__(self):
        for name in ("n_samples", "max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name}: expected an integer >= 1, got {v!r}")
        if not self.temperature > 0:
            raise InputError(f"temperature: expected > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p: expected 0 < top_p <= 1, got {self.top_p!r}")
        if self.greedy and self.n_samples != 1:
            raise InputError(f"greedy decoding gives one answer per problem: n_samples must be 1, got {self.n_samples}")
        if self.grading_processes < 0 or not self.grading_timeout_s > 0:
            raise InputError("grading_processes >= 0 and grading_timeout_s > 0 expected, got "
                             f"{self.grading_processes}, {self.grading_timeout_s}")
        try:
            object.__setattr__(self, "fallbacks", check_fallbacks(self.fallbacks))
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def rollout(self) -> RolloutConfig:
        if self.greedy:  # the single most likely token at every step
            return RolloutConfig(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=self.max_new_tokens, n_samples=1)
        return RolloutConfig(temperature=self.temperature, top_p=self.top_p, top_k=0,
                             max_new_tokens=self.max_new_tokens, n_samples=1)


@dataclass(frozen=True)
class Sample:
    """One graded answer: which benchmark, problem and sample; the prompt as the model saw it (rendered); the
    response; the extracted answer (None: no answer); the reference; correctness and the grader's status;
    response tokens and whether it hit the length budget."""

    benchmark: str
    problem: int
    sample: int
    prompt: str
    response: str
    answer: str | None
    gold: str
    correct: bool
    status: str
    tokens: int
    truncated: bool


def benchmark_seed(seed: int, name: str) -> int:
    """The seed of a benchmark's samples: the run's seed mixed with the benchmark's name, so that adding a
    benchmark to an evaluation changes no other benchmark's samples."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def _as_benchmarks(problems) -> list:
    from opdkit.eval.benchmarks import Benchmark

    items = list(problems)
    if not items:
        raise InputError("problems: the evaluation set is empty")
    if all(isinstance(b, Benchmark) for b in items):
        return items
    if all(isinstance(p, PromptRecord) for p in items):
        return [Benchmark("eval", items, "problems")]
    raise InputError("problems: expected a list of Benchmark or of PromptRecord")


def _no_reduce(values: list[float]) -> list[float]:
    return values


class SamplingEvaluator:
    """Samples and grades answers on one or more benchmarks.

    Args:
        problems: a list of :class:`~opdkit.eval.benchmarks.Benchmark` (or of ``PromptRecord`` with answers:
            one benchmark named ``eval``).
        settings: sampling and grading (:class:`EvalSettings`).
        grader: ``grader(response_text, answer) -> bool`` replacing math grading for benchmarks without a
            verifier of their own (in this process).
        rank, world: this process's share of the problems (trainer); ``reduce_sum`` sums floats over processes.
        generate_fn: optional route for ``generate`` (see ``HFSampler``).
        prefix: metric name prefix.

    :meth:`evaluate` metrics: ``{prefix}accuracy`` (avg@n), ``{prefix}response_length`` (mean tokens),
    ``{prefix}truncation_rate``, ``{prefix}no_answer_rate``: with several benchmarks each is the mean of the
    benchmarks' values (each benchmark counts once), and ``{prefix}{name}_accuracy`` is logged for each.
    """

    def __init__(
        self,
        problems,
        settings: EvalSettings | None = None,
        *,
        grader: Callable[[str, str], bool] | None = None,
        rank: int = 0,
        world: int = 1,
        reduce_sum: Callable[[list[float]], list[float]] = _no_reduce,
        generate_fn: Callable | None = None,
        prefix: str = "eval_",
    ):
        self.benchmarks = _as_benchmarks(problems)
        for b in self.benchmarks:
            if not b.problems:
                raise InputError(f"benchmark {b.name}: no problems")
            missing = [p.source or f"problem {i}" for i, p in enumerate(b.problems) if p.answer is None]
            if missing:
                raise InputError(f"evaluation problems need a reference answer; none in {', '.join(missing[:3])}")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise InputError(f"benchmark names must differ, got {', '.join(names)}")
        self.settings = settings or EvalSettings()
        self.grader = grader
        self.rank, self.world = rank, world
        self.reduce_sum = reduce_sum
        self.generate_fn = generate_fn
        self.prefix = prefix

    # -- generation and grading ---------------------------------------------------------------------------

    def all_items(self) -> list[tuple[int, int, int]]:
        """Every ``(benchmark index, problem index, sample index)`` of the evaluation, in order."""
        n = self.settings.n_samples
        return [(b, p, j) for b, bench in enumerate(self.benchmarks) for p in range(len(bench.problems))
                for j in range(n)]

    def run(self, model, tokenizer, items: Sequence[tuple[int, int, int]], *, pool=None,
            timings: dict | None = None) -> Iterator[list[Sample]]:
        """Generate and grade ``items`` (see :meth:`all_items`), yielding each batch's :class:`Sample`s.

        ``pool``: an open :class:`~opdkit.eval.grading.GradingPool` for math answers (default: one opened
        here when grading_processes > 0). ``timings``: accumulates ``generate_s`` and ``grade_s``.
        """
        import time

        from opdkit.data.chat import render_chat_text
        from opdkit.eval.grading import GradingPool, grade_answer
        from opdkit.rollout.hf_sampler import HFSampler

        s = self.settings
        sampler = HFSampler(model, tokenizer, s.rollout(), generate_fn=self.generate_fn, record_stats=False)
        own_pool = None
        if pool is None and s.grading_processes > 0 and self.grader is None and any(
                b.grader is None for b in self.benchmarks):
            pool = own_pool = GradingPool(s.grading_processes, timeout_s=s.grading_timeout_s)
        timings = {} if timings is None else timings
        was_training = model.training
        rendered: dict[tuple[int, int], str] = {}  # the last problem's rendered prompt (items come in order)
        model.eval()
        try:
            for start in range(0, len(items), s.batch_size):
                chunk = list(items[start : start + s.batch_size])
                t0 = time.perf_counter()
                seeds = [trajectory_seed(benchmark_seed(s.seed, self.benchmarks[b].name), p, j) for b, p, j in chunk]
                batch = sampler.sample([list(self.benchmarks[b].problems[p].messages) for b, p, _ in chunk],
                                       n_samples=1, seeds=seeds)
                rows = []
                for ids, m, reason in zip(batch.sampled_ids_B_T, batch.response_mask_B_T, batch.finish_reason,
                                          strict=True):
                    row = ids[m.bool()].tolist()
                    rows.append((tokenizer.decode(row, skip_special_tokens=True), len(row), reason == FINISH_LENGTH))
                t1 = time.perf_counter()
                grades = self._grade(chunk, [r[0] for r in rows], pool, grade_answer)
                t2 = time.perf_counter()
                timings["generate_s"] = timings.get("generate_s", 0.0) + t1 - t0
                timings["grade_s"] = timings.get("grade_s", 0.0) + t2 - t1
                out = []
                for (b, p, j), (text, ntok, trunc), (answer, correct, status) in zip(chunk, rows, grades, strict=True):
                    rec = self.benchmarks[b].problems[p]
                    if (b, p) not in rendered:  # once per problem, not per sample
                        rendered = {(b, p): render_chat_text(tokenizer, rec.messages)}
                    prompt = rendered[(b, p)]
                    out.append(Sample(self.benchmarks[b].name, p, j, prompt, text, answer, str(rec.answer),
                                      bool(correct), status, ntok, trunc))
                yield out
        finally:
            model.train(was_training)
            if own_pool is not None:
                own_pool.close()

    def _grade(self, chunk, texts, pool, grade_answer) -> list[tuple[str | None, bool, str]]:
        s = self.settings
        out: list = [None] * len(chunk)
        math_idx = []
        for i, ((b, p, _), text) in enumerate(zip(chunk, texts, strict=True)):
            bench = self.benchmarks[b]
            answer = extract_answer(text, s.fallbacks)
            if bench.grader is not None:
                ok = bool(bench.grader(text, p))
                out[i] = (answer, ok, "correct" if ok else ("no_answer" if answer is None else "wrong"))
            elif self.grader is not None:
                ok = bool(self.grader(text, bench.problems[p].answer))
                out[i] = (answer, ok, "correct" if ok else ("no_answer" if answer is None else "wrong"))
            else:
                math_idx.append((i, answer, bench.problems[p].answer))
        if math_idx:
            if pool is not None:
                grades = pool.grade_answers([(a, g) for _, a, g in math_idx])
            else:
                grades = [grade_answer(a, g, timeout_s=s.grading_timeout_s) for _, a, g in math_idx]
            for (i, answer, _), g in zip(math_idx, grades, strict=True):
                out[i] = (answer, g.correct, g.status)
        return out

    # -- the trainer's seam -------------------------------------------------------------------------------

    def evaluate(self, model, tokenizer, step: int = 0) -> dict[str, float]:
        """Metrics of the whole evaluation (collective under the trainer: every process must call it)."""
        mine = [(b, p) for b, bench in enumerate(self.benchmarks) for p in range(len(bench.problems))]
        mine = mine[self.rank :: self.world]
        n = self.settings.n_samples
        items = [(b, p, j) for b, p in mine for j in range(n)]
        per = {b.name: [0.0, 0.0, 0.0, 0.0] for b in self.benchmarks}  # correct, tokens, truncated, no answer
        for samples in self.run(model, tokenizer, items):
            for smp in samples:
                acc = per[smp.benchmark]
                acc[0] += smp.correct
                acc[1] += smp.tokens
                acc[2] += smp.truncated
                acc[3] += smp.answer is None
        flat = self.reduce_sum([v for b in self.benchmarks for v in per[b.name]])
        totals = [flat[4 * i : 4 * i + 4] for i in range(len(self.benchmarks))]
        counts = [len(b.problems) * n for b in self.benchmarks]
        per_bench = [[v / c for v in t] for t, c in zip(totals, counts, strict=True)]
        B = len(per_bench)  # each benchmark counts once in every metric, as in opdkit eval's average
        out = {
            f"{self.prefix}accuracy": sum(b[0] for b in per_bench) / B,
            f"{self.prefix}response_length": sum(b[1] for b in per_bench) / B,
            f"{self.prefix}truncation_rate": sum(b[2] for b in per_bench) / B,
            f"{self.prefix}no_answer_rate": sum(b[3] for b in per_bench) / B,
        }
        accs = [b[0] for b in per_bench]
        if len(self.benchmarks) > 1:
            for b, a in zip(self.benchmarks, accs, strict=True):
                out[f"{self.prefix}{b.name}_accuracy"] = a
        return out
