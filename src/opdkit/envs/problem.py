"""A single-turn problem as an environment: one step, the reply graded by the evaluation module.

``reset()`` gives the problem; ``step(reply)`` grades the whole reply against the reference answer (the last
``\\boxed{}`` after any ``</think>``, symbolic equivalence, :func:`opdkit.eval.grading.grade`) and ends the
episode: ``won`` = correct. The math task of a multi-task run is trained as prompts (one turn needs no
environment); this is the same task seen through the environment protocol, e.g. to evaluate it next to games.
"""

from __future__ import annotations

from collections.abc import Sequence

from opdkit.envs.base import EnvError

__all__ = ["ProblemEnv"]


class ProblemEnv:
    def __init__(self, problem: str, answer: str, fallbacks: Sequence[str] = (), timeout_s: float = 5.0):
        if not isinstance(problem, str) or not problem.strip():
            raise EnvError(f"problem: expected a non-empty string, got {problem!r}")
        if answer is None:
            raise EnvError("answer: a single-turn problem needs its reference answer")
        self.problem, self.answer = problem, str(answer)
        self.fallbacks, self.timeout_s = tuple(fallbacks), float(timeout_s)
        self.last_info: dict = {}

    def reset(self) -> str:
        self.last_info = {"won": False}
        return self.problem

    def step(self, action: str):
        from opdkit.eval.grading import grade

        won = bool(grade(action, self.answer, fallbacks=self.fallbacks, timeout_s=self.timeout_s))
        self.last_info = {"won": won}
        return "", float(won), True, {"won": won}

    def close(self) -> None:
        pass
