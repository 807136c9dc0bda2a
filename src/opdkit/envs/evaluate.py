"""Evaluation on environments: the student plays held-out episodes; success = won (per benchmark, and per
ALFWorld task type).

:class:`EpisodeEvaluator` is the trainer's evaluator seam for benchmarks whose problems are environments
(``textworld:DIR``, ``alfworld:SPLIT``, a JSONL file of ``env`` lines in ``data.eval_path``). Episodes are
sampled like the training rollout (:func:`opdkit.envs.episodes.run_episodes`) with the evaluation's sampling
(``eval.greedy`` or ``eval.temperature``/``eval.top_p``, ``eval.n_samples`` episodes per game), each with a
fixed seed, so two points of a curve differ by the model only. The processes of a run share the games and sum
the counts.

Metrics: ``eval_<name>_success`` (mean over games x samples), ``eval_<name>_turns``, ``eval_<name>_env_failures``;
``eval_success``, the mean over environment benchmarks; for ALFWorld games, ``eval_<name>_<task type>_success``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opdkit.envs.base import PromptTemplate
from opdkit.envs.episodes import EpisodeResult, EpisodeSettings, run_episodes
from opdkit.rollout.seeding import trajectory_seed

__all__ = ["CombinedEvaluator", "EpisodeEvaluator", "is_env_benchmark"]


def is_env_benchmark(bench) -> bool:
    return bool(bench.problems) and bench.problems[0].env is not None


def _no_reduce(values: list[float]) -> list[float]:
    return values


class EpisodeEvaluator:
    """Plays the games of ``benchmarks`` (see the module docstring).

    Args:
        benchmarks: :class:`~opdkit.eval.benchmarks.Benchmark` whose problems are environment records.
        settings: :class:`~opdkit.eval.evaluator.EvalSettings` (sampling, n, batch size, seed).
        template, episode: the prompt template and turn/token limits (the ``env`` config section).
        processes, timeout_s: the environment worker pool.
        rank, world, reduce_sum, generate_fn, prefix: as :class:`~opdkit.eval.evaluator.SamplingEvaluator`.
    """

    def __init__(self, benchmarks, settings, *, template: PromptTemplate, episode: EpisodeSettings,
                 processes: int = 2, timeout_s: float = 60.0, rank: int = 0, world: int = 1,
                 reduce_sum: Callable[[list[float]], list[float]] = _no_reduce, generate_fn=None,
                 prefix: str = "eval_"):
        self.benchmarks = list(benchmarks)
        self.settings, self.template, self.episode = settings, template, episode
        self.processes, self.timeout_s = processes, timeout_s
        self.rank, self.world, self.reduce_sum = rank, world, reduce_sum
        self.generate_fn, self.prefix = generate_fn, prefix
        self.last_results: list[tuple[str, int, int, EpisodeResult]] = []

    def run(self, model, tokenizer, items: Sequence[tuple[int, int, int]]) -> list[EpisodeResult]:
        """Play ``(benchmark, game, sample)`` items in batches; the results in the same order."""
        return [r for batch in self.run_batches(model, tokenizer, items) for _, r in batch]

    def samples(self, model, tokenizer, items: Sequence[tuple[int, int, int]]):
        """As :meth:`run`, batch by batch, each episode as an ``opdkit eval`` :class:`~opdkit.eval.evaluator.Sample`
        (response: the transcript; answer: the last action; correct: won; status: won, lost or the failure)."""
        from opdkit.eval.evaluator import Sample

        for batch in self.run_batches(model, tokenizer, items):
            out = []
            for (b, p, j), r in batch:
                transcript = "\n".join(f"> {a}\n{o}" for a, o in zip(r.actions, r.observations[1:], strict=False))
                status = "won" if r.won else (f"failure: {r.failure}" if r.failure else "lost")
                out.append(Sample(self.benchmarks[b].name, p, j, r.prompt or r.observations[0], transcript,
                                  r.actions[-1] if r.actions else None, "won", bool(r.won), status, r.tokens,
                                  r.finish == "length"))
            yield out

    def run_batches(self, model, tokenizer, items: Sequence[tuple[int, int, int]]):
        """Yield each batch's ``[((benchmark, game, sample), EpisodeResult), ...]``."""
        from opdkit.envs.pool import EnvPool
        from opdkit.eval.evaluator import benchmark_seed
        from opdkit.rollout.hf_sampler import HFSampler

        s = self.settings
        sampler = HFSampler(model, tokenizer, s.rollout(), generate_fn=self.generate_fn, record_stats=False)
        was_training = model.training
        model.eval()
        try:
            with EnvPool(self.processes, self.timeout_s) as pool:
                for start in range(0, len(items), s.batch_size):
                    chunk = list(items[start : start + s.batch_size])
                    specs = [self.benchmarks[b].problems[p].env for b, p, _ in chunk]
                    seeds = [trajectory_seed(benchmark_seed(s.seed, self.benchmarks[b].name), p, j)
                             for b, p, j in chunk]
                    _, results = run_episodes(sampler, pool, specs, seeds, template=self.template,
                                              settings=self.episode)
                    yield list(zip(chunk, results, strict=True))
        finally:
            model.train(was_training)

    def evaluate(self, model, tokenizer, step: int = 0) -> dict[str, float]:
        """Success rates over every game (collective under the trainer: every process must call it)."""
        n = self.settings.n_samples
        mine = [(b, p) for b, bench in enumerate(self.benchmarks) for p in range(len(bench.problems))]
        items = [(b, p, j) for b, p in mine[self.rank :: self.world] for j in range(n)]
        results = self.run(model, tokenizer, items)
        self.last_results = [(self.benchmarks[b].name, p, j, r) for (b, p, j), r in zip(items, results, strict=True)]
        keys: list[tuple[str, str]] = []  # (benchmark, group): group "" = all games, else a task type
        for bench in self.benchmarks:
            keys.append((bench.name, ""))
            keys += [(bench.name, t) for t in sorted({_task_type(r) for r in bench.problems} - {None})]
        index = {k: i for i, k in enumerate(keys)}
        sums = [0.0] * (4 * len(keys))  # won, turns, failures, count
        for (b, p, _), r in zip(items, results, strict=True):
            bench = self.benchmarks[b]
            for key in {(bench.name, ""), (bench.name, _task_type(bench.problems[p]))}:
                if key in index:
                    i = 4 * index[key]
                    sums[i] += r.won
                    sums[i + 1] += r.turns
                    sums[i + 2] += r.failure is not None
                    sums[i + 3] += 1
        sums = self.reduce_sum(sums)
        out: dict[str, float] = {}
        overall = []
        for (name, group), i in index.items():
            won, turns, failures, count = sums[4 * i : 4 * i + 4]
            if not count:
                continue
            if group:
                out[f"{self.prefix}{name}_{group}_success"] = won / count
                continue
            out[f"{self.prefix}{name}_success"] = won / count
            out[f"{self.prefix}{name}_turns"] = turns / count
            out[f"{self.prefix}{name}_env_failures"] = failures / count
            overall.append(won / count)
        out[f"{self.prefix}success"] = sum(overall) / max(len(overall), 1)
        return out


def _task_type(record) -> str | None:
    if record.env is None or record.env.kind != "alfworld":
        return None
    from opdkit.envs.alfworld import task_type_of

    try:
        return task_type_of(record.env.args.get("game_file", ""))
    except Exception:
        return None


class CombinedEvaluator:
    """Several evaluators as one (e.g. math answers and environment episodes): their metrics merged."""

    def __init__(self, evaluators):
        self.evaluators = [e for e in evaluators if e is not None]

    def evaluate(self, model, tokenizer, step: int = 0) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.evaluators:
            out.update(e.evaluate(model, tokenizer, step))
        return out
