"""The sampler seam: what the trainer asks of a rollout engine, and the factory that builds one.

A sampler turns prompts and per-row seeds into a :class:`~opdkit.types.RolloutBatch` (each response's
ids, masks, and the two log-probs of every sampled token), continues rows of token ids (``sample_tokens``:
each turn of a multi-turn episode, :mod:`opdkit.envs.episodes`), and is told when the trainer's weights
changed. ``rollout.engine`` picks the implementation: Hugging Face ``generate`` (``hf``) or an in-process
vLLM engine (``vllm``, ``opdkit.rollout.vllm_sampler``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from opdkit.config import RolloutConfig
from opdkit.errors import OpdkitError
from opdkit.types import RolloutBatch

__all__ = ["Sampler", "build_sampler"]


@runtime_checkable
class Sampler(Protocol):
    """A rollout engine. ``sample`` is deterministic given the rows' seeds (see ``opdkit.rollout.seeding``)."""

    tokenizer: object

    def sample(
        self,
        prompts: Sequence,
        *,
        n_samples: int | None = None,
        seeds: Sequence[int] | None = None,
        task_ids: Sequence[str | None] | None = None,
        prompt_index: Sequence[int] | None = None,
    ) -> RolloutBatch: ...

    def sample_tokens(
        self,
        rows: Sequence[Sequence[int]],
        *,
        seeds: Sequence[int],
        max_new_tokens: int | None = None,
        task_ids: Sequence[str | None] | None = None,
        prompt_index: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """One response per row of already rendered token ids (a multi-turn episode's conversation so far)."""
        ...

    def sync_weights(self, model) -> None: ...


def build_sampler(settings: RolloutConfig, model, tokenizer, *, generate_fn=None,
                  max_prompt_tokens: int | None = None, record_stats: bool = True, vllm: dict | None = None) -> Sampler:
    """The sampler of ``rollout.engine`` for ``model`` (the unwrapped student) and its tokenizer;
    ``max_prompt_tokens``: left-truncate longer prompts to it; ``record_stats``: also record the entropy and
    log-normaliser of every step (what makes the trainer's second student pass unnecessary); ``vllm``: the
    ``VLLMSampler`` arguments (``model_dir``, ``max_model_len``, ``dtype``, ``kv_cache_gb``, ...)."""
    if settings.engine == "hf":
        from opdkit.rollout.hf_sampler import HFSampler

        return HFSampler(model, tokenizer, settings, generate_fn=generate_fn, max_prompt_tokens=max_prompt_tokens,
                         record_stats=record_stats)
    if settings.engine == "vllm":
        from opdkit.rollout.vllm_sampler import VLLMSampler

        if record_stats:
            raise OpdkitError("rollout.engine=vllm records no pi_old statistics (the trainer recomputes them)")
        kw = dict(vllm or {})
        return VLLMSampler(kw.pop("model_dir"), tokenizer, settings, model=model, max_prompt_tokens=max_prompt_tokens,
                           **kw)
    raise OpdkitError(f"rollout.engine: {settings.engine!r} is not an engine (hf or vllm)")
