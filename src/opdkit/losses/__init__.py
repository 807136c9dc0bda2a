"""The OPD objective library: pure torch, no model or tokenizer knowledge.

Importing this package imports torch only. Shapes: ``...`` any leading shape (usually ``B, T``),
``V`` vocabulary, ``K`` support slots, ``H`` hidden size. Public API (a stable contract, see
ARCHITECTURE.md): support construction and masks (``support``), divergences (``divergences``,
``fused``), sampled-token OPD (``policy_gradient``), aggregation and diagnostics.
"""

from opdkit.losses.aggregate import AGGREGATION_MODES, aggregate
from opdkit.losses.diagnostics import (
    entropy,
    masked_mean,
    negative_reward_fraction,
    opd_diagnostics,
    outside_support_fraction,
    reward_skew,
    support_mass,
)
from opdkit.losses.divergences import full_reverse_kl, support_kl
from opdkit.losses.fused import support_kl_from_hidden
from opdkit.losses.policy_gradient import (
    policy_gradient_loss,
    sampled_token_advantages,
    sampled_token_rewards,
    topp_correction_weights,
)
from opdkit.losses.support import (
    NUCLEUS_MASS_TOL,
    add_sampled_token,
    drop_support_ids,
    gather_logprobs,
    nucleus_support,
    special_token_mask,
    student_topk_support,
    teacher_topk_support,
)

__all__ = [
    "AGGREGATION_MODES",
    "add_sampled_token",
    "aggregate",
    "drop_support_ids",
    "entropy",
    "full_reverse_kl",
    "gather_logprobs",
    "masked_mean",
    "negative_reward_fraction",
    "nucleus_support",
    "NUCLEUS_MASS_TOL",
    "opd_diagnostics",
    "outside_support_fraction",
    "policy_gradient_loss",
    "reward_skew",
    "sampled_token_advantages",
    "sampled_token_rewards",
    "special_token_mask",
    "student_topk_support",
    "support_kl",
    "support_kl_from_hidden",
    "support_mass",
    "teacher_topk_support",
    "topp_correction_weights",
]
