"""The paper's claims as experiments: each a list of arms (config overrides) run on the demo task.

Every arm of an experiment runs the demo's OPD (``opdkit/demo/demo.yaml``) from the same student, with the
same seed, prompts, samples and steps; only its overrides differ. ``claim`` is what the paper (or METHOD.md)
says; the runner (``opdkit.experiments.runner``) measures, the README says whether it held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opdkit.errors import InputError

__all__ = ["EXPERIMENTS", "Arm", "Experiment", "get_experiment"]


@dataclass(frozen=True)
class Arm:
    """One run: ``overrides`` (dotted config keys) on the demo config; ``teacher`` ``"demo"`` or
    ``"eos_swapped"`` (the demo teacher whose output rows of its two end tokens are swapped: it ends its
    turns with ``<|endoftext|>`` where the student ends with ``<|im_end|>``, the paper's Qwen case);
    ``x``: the arm's value on the experiment's axis (K for the K sweep), if any."""

    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher: str = "demo"
    x: float | None = None


@dataclass(frozen=True)
class Experiment:
    """``probe``: also measure each arm's gradient variance at the starting student (independent rollout
    batches, no update); ``axis``: the x-axis label when the arms lie on one (K), else None."""

    name: str
    title: str
    claim: str
    arms: tuple[Arm, ...]
    probe: bool = True
    axis: str | None = None


_SAMPLED = {"objective.kind": "sampled_token", "rollout.top_p": 1.0, "objective.gamma": 0.0}
_KS = (1, 2, 4, 8, 16, 32, 64)

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "k_sweep",
            "support size K of the teacher's top-K (and nucleus supports)",
            "K < 5 is unstable and K > 50 gains nothing (the authors use K = 16 or 32)",
            tuple(Arm(f"K={k}", f"teacher top-{k}", {"objective.top_k": k}, x=k) for k in _KS)
            + (
                Arm("topp=0.9", "teacher nucleus p = 0.9, K_max = 64",
                    {"objective.support": "teacher_topp", "objective.support_top_p": 0.9, "objective.top_k": 64}),
                Arm("topp=0.99", "teacher nucleus p = 0.99, K_max = 64",
                    {"objective.support": "teacher_topp", "objective.support_top_p": 0.99, "objective.top_k": 64}),
                # the nucleus with a floor: as wide as top-8 where the teacher is sure, wider where it is not
                Arm("topp=0.9_min=8", "teacher nucleus p = 0.9, 8 <= K <= 64",
                    {"objective.support": "teacher_topp", "objective.support_top_p": 0.9,
                     "objective.support_min_k": 8, "objective.top_k": 64}),
            ),
            axis="K",
        ),
        Experiment(
            "support_source",
            "where the support set comes from",
            "the teacher's top-K is the best support; the student's top-K and top-K plus the sampled token do worse",
            (
                Arm("teacher_topk", "teacher top-16", {"objective.support": "teacher_topk"}),
                Arm("student_topk", "student top-16", {"objective.support": "student_topk"}),
                Arm("teacher_topk_plus_sampled", "teacher top-16 + sampled token",
                    {"objective.support": "teacher_topk_plus_sampled"}),
            ),
        ),
        Experiment(
            "rollout_top_p",
            "top-p truncation of the student's rollouts",
            "top-p 0.9 rollouts keep prefixes where the teacher is reliable: more stable and more accurate "
            "than untruncated (p = 1.0) rollouts (and, beyond the paper: importance weights correct sampled-token "
            "OPD for the truncation)",
            (
                Arm("top_p=0.9", "support KL, rollouts top-p 0.9", {"rollout.top_p": 0.9}),
                Arm("top_p=1.0", "support KL, rollouts top-p 1.0", {"rollout.top_p": 1.0}),
                Arm("sampled_token top_p=0.9", "sampled-token OPD, rollouts top-p 0.9",
                    {**_SAMPLED, "rollout.top_p": 0.9}),
                Arm("sampled_token top_p=1.0", "sampled-token OPD, rollouts top-p 1.0", _SAMPLED),
                # the paper's future work: importance weights for the truncation (METHOD.md, top-p mismatch)
                Arm("sampled_token top_p=0.9 token_is", "sampled-token OPD, top-p 0.9, token weights Z_t",
                    {**_SAMPLED, "rollout.top_p": 0.9, "objective.topp_correction": "token"}),
                Arm("sampled_token top_p=0.9 sequence_is", "sampled-token OPD, top-p 0.9, sequence weight prod Z_t",
                    {**_SAMPLED, "rollout.top_p": 0.9, "objective.topp_correction": "sequence"}),
            ),
        ),
        Experiment(
            "renormalization",
            "renormalising both distributions inside the support",
            "without renormalisation training collapses early",
            (
                Arm("renormalized", "teacher top-16 KL, renormalised", {"objective.renormalize": True}),
                Arm("not_renormalized", "teacher top-16 KL, not renormalised", {"objective.renormalize": False}),
            ),
        ),
        Experiment(
            "special_tokens",
            "special-token masking with a teacher whose end token differs",
            "a teacher that ends with another token scores the student's end token as very unlikely; masking "
            "it keeps OPD stable (the paper's Qwen pair: <|endoftext|> vs <|im_end|>)",
            (
                Arm("same_eos", "support KL, teacher ends like the student", {}),
                Arm("swapped_no_mask", "support KL, teacher ends with <|endoftext|>, no mask", {}, "eos_swapped"),
                Arm("swapped_mask", "support KL, teacher ends with <|endoftext|>, student's <|im_end|> masked",
                    {"objective.special_tokens": ["<|im_end|>"], "objective.drop_special_from_support": True},
                    "eos_swapped"),
                Arm("sampled_swapped_no_mask", "sampled-token, teacher ends with <|endoftext|>, no mask", _SAMPLED,
                    "eos_swapped"),
                Arm("sampled_swapped_mask", "sampled-token, teacher ends with <|endoftext|>, <|im_end|> masked",
                    {**_SAMPLED, "objective.special_tokens": ["<|im_end|>"]}, "eos_swapped"),
            ),
            probe=False,
        ),
        Experiment(
            "reward_imbalance",
            "the sign and skew of sampled-token rewards over training",
            "most per-token rewards log q - log pi of sampled-token OPD are negative (imbalanced); the support "
            "KL has no sampled reward",
            (
                Arm("sampled_token", "sampled-token OPD (top-p 1.0)", _SAMPLED),
                Arm("support_kl", "support KL (teacher top-16, top-p 0.9)", {}),
            ),
            probe=False,
        ),
    )
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise InputError(f"experiment: expected one of {', '.join(EXPERIMENTS)}, got {name!r}") from None
