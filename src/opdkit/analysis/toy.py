"""The enumerable toy problem: tabular student and teacher, presets, sampling, enumeration, exact KL gradient.

Shapes: ``V`` tokens, horizon ``T``, ``P = Σ_{t<T} V^t`` prefix rows (one logit row per prefix),
``N`` sampled responses, ``S = V^T`` enumerated responses.

The problem (METHOD.md, "The bias–variance analysis"): an autoregressive *tabular* student over ``V``
tokens and horizon ``T`` with one logit row per prefix (``P = Σ_{t<T} V^t`` rows), and a fixed tabular
teacher of the same shape. The objective is the sequence-level reverse KL
``J(θ) = KL(π_θ ‖ q) = Σ_y π_θ(y) [log π_θ(y) − log q(y)]`` over all ``V^T`` responses; its exact
gradient ``∇J`` is computed by enumerating every sequence (autograd through the enumeration).

Problem presets (``PROBLEM_PRESETS``, ``--problem``): ``default`` is ``make_problem``'s defaults (student
``N(0, 1)``, teacher ``3 · (0.5 z + 0.87 z')``) at V = 4, T = 2 4 6 8. ``imbalanced`` is a student that is
far from a sharper teacher: student ``2 z``, teacher ``4 · (−0.5 z + 0.87 z')`` (the teacher leans away
from the student's preferred token), at V = 2, T = 4 8 12 16 (longer horizons, still enumerable). Its
sampled-token rewards are mostly negative (about 70% of tokens) with a per-token KL of several nats, and
variance(γ = 1) / variance(γ = 0) reaches about 100–150 at T = 16 (docs/bias_variance.md).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from opdkit.errors import InputError

__all__ = [
    "DEFAULT_PROBLEM",
    "DEFAULT_TS",
    "DEFAULT_VOCAB",
    "MAX_ENUMERATED",
    "PROBLEM_PRESETS",
    "Enumeration",
    "ProblemPreset",
    "ToyProblem",
    "enumerate_sequences",
    "exact_kl_gradient",
    "get_preset",
    "make_problem",
    "num_prefixes",
    "prefix_rows",
    "sample_sequences",
    "sequence_reverse_kl",
]

DEFAULT_TS: tuple[int, ...] = (2, 4, 6, 8)
DEFAULT_VOCAB = 4
DEFAULT_PROBLEM = "default"
# Sequences enumerated at most (exact gradient and exact moments): V^T rows of [T, V] float64.
MAX_ENUMERATED = 1 << 20


# ------------------------------------------------------------------------------------------ the problem
@dataclass(frozen=True)
class ToyProblem:
    """A tabular student and teacher over ``V`` tokens and horizon ``T``.

    Row ``offset_t + code(y_<t)`` of a ``[P, V]`` table holds the logits at prefix ``y_<t``, where
    ``offset_t = Σ_{k<t} V^k`` and ``code`` reads the prefix as a base-V number.
    """

    V: int
    T: int
    student_logits_P_V: torch.Tensor  # float64
    teacher_logits_P_V: torch.Tensor  # float64

    def __post_init__(self) -> None:
        P = num_prefixes(self.V, self.T)
        for name in ("student_logits_P_V", "teacher_logits_P_V"):
            x = getattr(self, name)
            if tuple(x.shape) != (P, self.V):
                raise InputError(
                    f"{name}: expected shape [{P}, {self.V}] for V={self.V}, T={self.T}, got {list(x.shape)}"
                )


def num_prefixes(V: int, T: int) -> int:
    return sum(V**t for t in range(T))


def make_problem(
    V: int,
    T: int,
    seed: int,
    *,
    student_scale: float = 1.0,
    teacher_scale: float = 3.0,
    correlation: float = 0.5,
) -> ToyProblem:
    """Random student ``s · z`` and a sharper, partly aligned teacher ``t · (ρ z + sqrt(1 − ρ²) z')``.

    ``z, z'`` are iid standard normal ``[P, V]`` tables. With ``teacher_scale > student_scale`` the teacher
    is peaked where the student is flat, so the sampled-token rewards ``log q − log π`` are large and
    mostly negative (the paper's imbalance), and they depend on the prefix (future rewards matter).
    """
    if V < 2 or T < 1:
        raise InputError(f"expected V >= 2 and T >= 1, got V={V}, T={T}")
    if not -1.0 <= correlation <= 1.0:
        raise InputError(f"correlation: expected a number in [-1, 1], got {correlation!r}")
    g = torch.Generator().manual_seed(int(seed))
    P = num_prefixes(V, T)
    z = torch.randn(P, V, generator=g, dtype=torch.float64)
    z2 = torch.randn(P, V, generator=g, dtype=torch.float64)
    teacher = teacher_scale * (correlation * z + math.sqrt(1.0 - correlation**2) * z2)
    return ToyProblem(V, T, student_scale * z, teacher)


@dataclass(frozen=True)
class ProblemPreset:
    """A named toy problem: ``make_problem``'s scales and correlation, and its default V and horizons."""

    name: str
    student_scale: float
    teacher_scale: float
    correlation: float
    vocab: int
    Ts: tuple[int, ...]
    description: str

    def make(self, V: int, T: int, seed: int) -> ToyProblem:
        return make_problem(
            V,
            T,
            seed,
            student_scale=self.student_scale,
            teacher_scale=self.teacher_scale,
            correlation=self.correlation,
        )


PROBLEM_PRESETS: dict[str, ProblemPreset] = {
    "default": ProblemPreset(
        "default",
        1.0,
        3.0,
        0.5,
        DEFAULT_VOCAB,
        DEFAULT_TS,
        "student N(0, 1); teacher 3 · (0.5 z + 0.87 z'), sharper and partly aligned",
    ),
    # A student far from a sharper teacher that leans away from the student's preferred tokens: mostly
    # negative rewards with a large mean; measured variance(γ=1)/variance(γ=0) of about 100–150 at T = 16.
    "imbalanced": ProblemPreset(
        "imbalanced",
        2.0,
        4.0,
        -0.5,
        2,
        (4, 8, 12, 16),
        "student 2 z; teacher 4 · (−0.5 z + 0.87 z'), sharper and leaning away from the student",
    ),
}


def get_preset(name: str) -> ProblemPreset:
    try:
        return PROBLEM_PRESETS[name]
    except KeyError:
        raise InputError(f"problem: expected one of {sorted(PROBLEM_PRESETS)}, got {name!r}") from None


def prefix_rows(V: int, seqs_N_T: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` table row of each position's prefix ``c_t = y_<t``."""
    N, T = seqs_N_T.shape
    rows = torch.empty(N, T, dtype=torch.long)
    code = torch.zeros(N, dtype=torch.long)
    offset = 0
    for t in range(T):
        rows[:, t] = offset + code
        code = code * V + seqs_N_T[:, t]
        offset += V**t
    return rows


def sample_sequences(problem: ToyProblem, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, T]`` responses sampled from the student (τ = 1, no truncation), by inverse CDF."""
    seqs = torch.empty(n, problem.T, dtype=torch.long)
    code = torch.zeros(n, dtype=torch.long)
    offset = 0
    for t in range(problem.T):
        probs_N_V = torch.softmax(problem.student_logits_P_V[offset + code], dim=-1)
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        y = (probs_N_V.cumsum(-1) < u).sum(-1).clamp(max=problem.V - 1)
        seqs[:, t] = y
        code = code * problem.V + y
        offset += problem.V**t
    return seqs


def enumerate_sequences(V: int, T: int) -> torch.Tensor:
    """All ``V^T`` responses, ``[V^T, T]`` in lexicographic order."""
    if V**T > MAX_ENUMERATED:
        raise InputError(f"V^T = {V}^{T} = {V**T} sequences exceed the enumeration cap {MAX_ENUMERATED}")
    return torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long).reshape(V**T, T)


def _token_logprobs(logits_P_V: torch.Tensor, rows_N_T: torch.Tensor, seqs_N_T: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_P_V, dim=-1)[rows_N_T].gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1)


def sequence_reverse_kl(problem: ToyProblem, student_logits_P_V: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(π ‖ q)`` over whole sequences, by enumerating all ``V^T`` of them (differentiable)."""
    theta = problem.student_logits_P_V if student_logits_P_V is None else student_logits_P_V
    seqs = enumerate_sequences(problem.V, problem.T)
    rows = prefix_rows(problem.V, seqs)
    lp_seq = _token_logprobs(theta, rows, seqs).sum(-1)
    lq_seq = _token_logprobs(problem.teacher_logits_P_V, rows, seqs).sum(-1)
    return (lp_seq.exp() * (lp_seq - lq_seq)).sum()


def exact_kl_gradient(problem: ToyProblem) -> torch.Tensor:
    """``∇_θ KL(π_θ ‖ q)`` as a ``[P, V]`` table, exact (autograd through the enumeration)."""
    theta = problem.student_logits_P_V.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sequence_reverse_kl(problem, theta), theta)
    return grad


@dataclass(frozen=True)
class Enumeration:
    """Every sequence, its prefix rows and its probability under the student."""

    seqs_S_T: torch.Tensor
    rows_S_T: torch.Tensor
    prob_S: torch.Tensor

    @staticmethod
    def of(problem: ToyProblem) -> Enumeration:
        seqs = enumerate_sequences(problem.V, problem.T)
        rows = prefix_rows(problem.V, seqs)
        prob = _token_logprobs(problem.student_logits_P_V.detach(), rows, seqs).sum(-1).exp()
        return Enumeration(seqs, rows, prob)
