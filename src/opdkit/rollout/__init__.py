"""Student sampling: the sampler seam and its engines (Hugging Face ``generate`` today), each returning a
:class:`~opdkit.types.RolloutBatch`; per-trajectory seeds that do not depend on batching."""

from opdkit.rollout.base import Sampler, build_sampler
from opdkit.rollout.hf_sampler import HFSampler, validate_rollout_settings
from opdkit.rollout.seeding import trajectory_seed

__all__ = ["HFSampler", "Sampler", "build_sampler", "trajectory_seed", "validate_rollout_settings"]
