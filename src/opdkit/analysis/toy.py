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
from opdkit.losses import nucleus_support

__all__ = [
    "DEFAULT_PROBLEM",
    "DEFAULT_TS",
    "DEFAULT_VOCAB",
    "MAX_ENUMERATED",
    "PROBLEM_PRESETS",
    "Enumeration",
    "ProblemPreset",
    "ToyProblem",
    "bigram_row_visits",
    "bigram_rows",
    "enumerate_sequences",
    "enumerated_reverse_kl",
    "exact_kl_gradient",
    "get_preset",
    "make_problem",
    "num_prefixes",
    "num_rows",
    "prefix_rows",
    "row_reverse_kl",
    "sample_sequences",
    "sequence_reverse_kl",
]

DEFAULT_TS: tuple[int, ...] = (2, 4, 6, 8)
DEFAULT_VOCAB = 4
DEFAULT_PROBLEM = "bigram"
BIGRAM_VOCAB = 8
BIGRAM_TS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)
BIGRAM_STUDENT_SCALE = 1.0
BIGRAM_TEACHER_SCALE = 3.0
BIGRAM_CORRELATION = 0.5
BIGRAM_SAMPLES_PER_ESTIMATE = 100
BIGRAM_DESCRIPTION = (
    "bigram student (one row per previous token, shared by all positions) N(0, 1); "
    "teacher 3 · (0.5 z + 0.87 z'), sharper and partly aligned"
)
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
    # "prefix": one row per prefix (tabular, P = Σ_{t<T} V^t, the rows of one trajectory are distinct);
    # "bigram": one row per previous token plus a start row (P = V + 1, shared across positions, any T).
    structure: str = "prefix"
    # Rollouts come from the student truncated to each row's nucleus of mass top_p (1.0: untruncated); the
    # objective J stays the untruncated student's KL (METHOD.md, "Top-p rollout mismatch").
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InputError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.structure not in ("prefix", "bigram"):
            raise InputError(f"structure: expected 'prefix' or 'bigram', got {self.structure!r}")
        P = num_rows(self.V, self.T, self.structure)
        for name in ("student_logits_P_V", "teacher_logits_P_V"):
            x = getattr(self, name)
            if tuple(x.shape) != (P, self.V):
                raise InputError(
                    f"{name}: expected shape [{P}, {self.V}] for V={self.V}, T={self.T}, "
                    f"structure={self.structure}, got {list(x.shape)}"
                )

    @property
    def shared_rows(self) -> bool:
        """Whether one trajectory can visit a table row more than once (then gradients add up per row)."""
        return self.structure == "bigram"

    @property
    def enumerable(self) -> bool:
        return self.V**self.T <= MAX_ENUMERATED

    def rollout_probs(self) -> torch.Tensor:
        """``[P, V]`` the distribution rollouts are drawn from: each row's softmax, truncated to its nucleus
        (the fewest most likely tokens whose mass reaches ``top_p``; ties by token id) and renormalised."""
        logprobs = torch.log_softmax(self.student_logits_P_V.detach(), dim=-1)
        if self.top_p >= 1.0:
            return logprobs.exp()
        # the same nucleus rule as the nucleus support sets (ties by token id)
        ids = torch.arange(self.V).expand_as(logprobs)
        _, kept = nucleus_support(ids, logprobs, float(self.top_p), min_k=1)
        return torch.softmax(kept, dim=-1)

    def rows(self, seqs_N_T: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` table row of each position's context."""
        return bigram_rows(self.V, seqs_N_T) if self.structure == "bigram" else prefix_rows(self.V, seqs_N_T)


def num_prefixes(V: int, T: int) -> int:
    return sum(V**t for t in range(T))


def num_rows(V: int, T: int, structure: str = "prefix") -> int:
    """Rows of a problem's logit tables: ``Σ_{t<T} V^t`` (prefix) or ``V + 1`` (bigram: start row last)."""
    return V + 1 if structure == "bigram" else num_prefixes(V, T)


def make_problem(
    V: int,
    T: int,
    seed: int,
    *,
    student_scale: float = 1.0,
    teacher_scale: float = 3.0,
    correlation: float = 0.5,
    structure: str = "prefix",
) -> ToyProblem:
    """Random student ``s · z`` and a sharper, partly aligned teacher ``t · (ρ z + sqrt(1 − ρ²) z')``.

    ``z, z'`` are iid standard normal ``[P, V]`` tables (``P`` = ``num_rows``). With
    ``teacher_scale > student_scale`` the teacher is peaked where the student is flat, so the sampled-token
    rewards ``log q − log π`` are large and mostly negative (the paper's imbalance), and they depend on
    the context (future rewards matter). ``structure="bigram"`` makes both tables depend on the previous
    token only (a shared-parameter student whose size does not grow with T).
    """
    if V < 2 or T < 1:
        raise InputError(f"expected V >= 2 and T >= 1, got V={V}, T={T}")
    if not -1.0 <= correlation <= 1.0:
        raise InputError(f"correlation: expected a number in [-1, 1], got {correlation!r}")
    if structure == "prefix" and V**T > MAX_ENUMERATED:
        raise InputError(
            f"V^T = {V}^{T} exceeds the enumeration cap {MAX_ENUMERATED} of the tabular (prefix) problem; "
            "lower T or V, or use a bigram problem (--problem bigram)"
        )
    g = torch.Generator().manual_seed(int(seed))
    P = num_rows(V, T, structure)
    z = torch.randn(P, V, generator=g, dtype=torch.float64)
    z2 = torch.randn(P, V, generator=g, dtype=torch.float64)
    teacher = teacher_scale * (correlation * z + math.sqrt(1.0 - correlation**2) * z2)
    return ToyProblem(V, T, student_scale * z, teacher, structure)


@dataclass(frozen=True)
class ProblemPreset:
    """A named toy problem: ``make_problem``'s scales, correlation and structure, its default V and horizons."""

    name: str
    student_scale: float
    teacher_scale: float
    correlation: float
    vocab: int
    Ts: tuple[int, ...]
    description: str
    structure: str = "prefix"
    # Trajectories per bootstrap group by default: the bigram's long horizons cost T times more each.
    samples_per_estimate: int = 500

    def make(self, V: int, T: int, seed: int) -> ToyProblem:
        return make_problem(
            V,
            T,
            seed,
            student_scale=self.student_scale,
            teacher_scale=self.teacher_scale,
            correlation=self.correlation,
            structure=self.structure,
        )


PROBLEM_PRESETS: dict[str, ProblemPreset] = {
    # The default: a bigram student (one logit row per previous token, shared by every position), so
    # horizons of hundreds of tokens can be sampled; the exact gradient comes from the Markov chain's
    # marginals, enumeration checks it where V^T is small.
    "bigram": ProblemPreset(
        "bigram",
        BIGRAM_STUDENT_SCALE,
        BIGRAM_TEACHER_SCALE,
        BIGRAM_CORRELATION,
        BIGRAM_VOCAB,
        BIGRAM_TS,
        BIGRAM_DESCRIPTION,
        "bigram",
        BIGRAM_SAMPLES_PER_ESTIMATE,
    ),
    "tabular": ProblemPreset(
        "tabular",
        1.0,
        3.0,
        0.5,
        DEFAULT_VOCAB,
        DEFAULT_TS,
        "tabular student (one row per prefix) N(0, 1); teacher 3 · (0.5 z + 0.87 z'), sharper and partly aligned",
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
        "tabular student 2 z; teacher 4 · (−0.5 z + 0.87 z'), sharper and leaning away from the student",
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


def bigram_rows(V: int, seqs_N_T: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` bigram row of each position: the start row ``V`` at t = 0, then the previous token."""
    rows = torch.empty_like(seqs_N_T)
    rows[:, 0] = V
    rows[:, 1:] = seqs_N_T[:, :-1]
    return rows


def sample_sequences(problem: ToyProblem, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, T]`` responses sampled from the student (τ = 1; truncated to each row's nucleus when
    ``problem.top_p < 1``), by inverse CDF."""
    seqs = torch.empty(n, problem.T, dtype=torch.long)
    V = problem.V
    probs_P_V = problem.rollout_probs()
    if problem.structure == "bigram":
        cdf_P_V = probs_P_V.cumsum(-1)
        row = torch.full((n,), V, dtype=torch.long)
        for t in range(problem.T):
            u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
            y = (cdf_P_V[row] < u).sum(-1).clamp(max=V - 1)
            seqs[:, t] = y
            row = y
        return seqs
    code = torch.zeros(n, dtype=torch.long)
    offset = 0
    for t in range(problem.T):
        probs_N_V = probs_P_V[offset + code]
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        y = (probs_N_V.cumsum(-1) < u).sum(-1).clamp(max=V - 1)
        seqs[:, t] = y
        code = code * V + y
        offset += V**t
    return seqs


def enumerate_sequences(V: int, T: int) -> torch.Tensor:
    """All ``V^T`` responses, ``[V^T, T]`` in lexicographic order."""
    if V**T > MAX_ENUMERATED:
        raise InputError(f"V^T = {V}^{T} = {V**T} sequences exceed the enumeration cap {MAX_ENUMERATED}")
    return torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long).reshape(V**T, T)


def _token_logprobs(logits_P_V: torch.Tensor, rows_N_T: torch.Tensor, seqs_N_T: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_P_V, dim=-1)[rows_N_T].gather(-1, seqs_N_T.unsqueeze(-1)).squeeze(-1)


def enumerated_reverse_kl(problem: ToyProblem, student_logits_P_V: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(π ‖ q)`` over whole sequences, by enumerating all ``V^T`` of them (differentiable)."""
    theta = problem.student_logits_P_V if student_logits_P_V is None else student_logits_P_V
    seqs = enumerate_sequences(problem.V, problem.T)
    rows = problem.rows(seqs)
    lp_seq = _token_logprobs(theta, rows, seqs).sum(-1)
    lq_seq = _token_logprobs(problem.teacher_logits_P_V, rows, seqs).sum(-1)
    return (lp_seq.exp() * (lp_seq - lq_seq)).sum()


def bigram_row_visits(problem: ToyProblem, student_logits_P_V: torch.Tensor | None = None) -> torch.Tensor:
    """``[P]`` expected number of positions whose context is each row, ``Σ_t P(row_t = r)`` (differentiable).

    The Markov chain's marginals: ``m_0`` = the start row, ``m_{t+1}(v) = Σ_r m_t(r) π(v | r)``.
    """
    theta = problem.student_logits_P_V if student_logits_P_V is None else student_logits_P_V
    V = problem.V
    probs_P_V = torch.softmax(theta, dim=-1)
    m_V = probs_P_V[V]  # the distribution of y_0, i.e. of the context row at t = 1
    visits_V = torch.zeros(V, dtype=theta.dtype)
    for _ in range(1, problem.T):
        visits_V = visits_V + m_V
        m_V = m_V @ probs_P_V[:V]
    return torch.cat([visits_V, torch.ones(1, dtype=theta.dtype)])


def row_reverse_kl(theta_P_V: torch.Tensor, teacher_P_V: torch.Tensor) -> torch.Tensor:
    """``[P]`` per-row ``KL(π(·|r) ‖ q(·|r))``."""
    lp = torch.log_softmax(theta_P_V, dim=-1)
    return (lp.exp() * (lp - torch.log_softmax(teacher_P_V, dim=-1))).sum(-1)


def sequence_reverse_kl(problem: ToyProblem, student_logits_P_V: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(π ‖ q)`` over whole sequences (differentiable).

    Tabular problems enumerate all ``V^T`` sequences; bigram problems use the chain rule of the KL over
    the chain's marginals, ``Σ_r visits(r) · KL(π(·|r) ‖ q(·|r))``, exact at any T (the tests check it
    against enumeration).
    """
    theta = problem.student_logits_P_V if student_logits_P_V is None else student_logits_P_V
    if problem.structure == "bigram":
        return (bigram_row_visits(problem, theta) * row_reverse_kl(theta, problem.teacher_logits_P_V)).sum()
    return enumerated_reverse_kl(problem, theta)


def exact_kl_gradient(problem: ToyProblem) -> torch.Tensor:
    """``∇_θ KL(π_θ ‖ q)`` as a ``[P, V]`` table, exact (autograd through the enumeration or the marginals)."""
    theta = problem.student_logits_P_V.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sequence_reverse_kl(problem, theta), theta)
    return grad


@dataclass(frozen=True)
class Enumeration:
    """Every sequence, its context rows and its probability under the rollout distribution."""

    seqs_S_T: torch.Tensor
    rows_S_T: torch.Tensor
    prob_S: torch.Tensor

    @staticmethod
    def of(problem: ToyProblem) -> Enumeration:
        seqs = enumerate_sequences(problem.V, problem.T)
        rows = problem.rows(seqs)
        probs_P_V = problem.rollout_probs()  # what the rollouts are drawn from (truncated if top_p < 1)
        prob = probs_P_V[rows].gather(-1, seqs.unsqueeze(-1)).squeeze(-1).prod(-1)
        return Enumeration(seqs, rows, prob)
