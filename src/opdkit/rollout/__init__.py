"""Student sampling: batched rollouts from a Hugging Face causal LM, as a :class:`~opdkit.types.RolloutBatch`."""

from opdkit.rollout.hf_sampler import HFSampler, validate_rollout_settings

__all__ = ["HFSampler", "validate_rollout_settings"]
