"""Batched student sampling with the model's own Hugging Face ``generate`` (METHOD.md, "Rollout").

How the log-probs are obtained (and why not ``output_scores`` / ``output_logits``): ``generate`` is called
with a *clean* generation config (no temperature / top-k / top-p of its own, and the model's
``generation_config.json`` sampling defaults — repetition penalty, top-k 20, ... — switched off), greedy, and
one logits processor of ours that makes the draw itself (:func:`opdkit.rollout.draw.draw_step`): from the
raw logits ``generate`` computes (float32, KV cache, left-padding-aware positions) it takes the tempered
student's log-normaliser, entropy and log-prob of the drawn token (π_old), blocks the pad token, applies
transformers' top-k token set and the exact top-p nucleus (found without sorting the vocabulary,
:mod:`opdkit.rollout.nucleus`), draws among the kept tokens by inversion of a seeded uniform, records the drawn
token's log-prob under that truncated distribution, and returns scores whose argmax is the drawn token.
Nothing of size ``B x V`` outlives a step, there is no second forward pass, and the per-token cost is a few
passes over the row instead of a processor chain's dozens (``output_scores=True, output_logits=True`` would
also keep ``O(B·T·V)``, which for a 150k vocabulary and long responses does not fit). After ``generate`` the
drawn tokens are checked against the ones it emitted.

Seeds: every response has its own seed, and its random number at a step is a function of (seed, step)
only (``opdkit.rollout.seeding``): the drawn token is the first kept token, in id order, whose cumulative
probability exceeds that uniform. A response is therefore the same whether it is
sampled alone or in any batch, on any process (up to floating-point differences of the batched forward
pass). ``sample(..., seeds=[...])`` gives the seed of every row; ``seed=s`` derives row ``i``'s seed from
``(s, i)``; ``seed=None`` uses ``settings.seed + k`` for the k-th call of this sampler. The global RNG is
not touched.

Stop strings use transformers' ``StopStringCriteria`` (a match must overlap the newest token, so it is caught
on the step that completes it; the response mask ends at that token). Like ``generate`` itself, it looks at
the whole sequence, so a stop string that starts inside the prompt and is completed by the first response
token also ends the response. Stop ids are added to the EOS ids given to ``generate``.

Not thread-safe: ``model.generation_config`` is swapped for a clean one for the duration of ``generate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opdkit.config import RolloutConfig
from opdkit.data.chat import left_pad, render_chat
from opdkit.errors import InputError
from opdkit.rollout.draw import draw_step
from opdkit.rollout.seeding import trajectory_seed
from opdkit.types import FINISH_LENGTH, FINISH_STOP, RolloutBatch

__all__ = ["HFSampler", "validate_rollout_settings"]

Message = Mapping[str, str]
Prompt = str | Sequence[Message]


def validate_rollout_settings(settings: RolloutConfig) -> RolloutConfig:
    """Raise :class:`InputError` naming the field if a sampling setting is out of range; return ``settings``."""
    t = settings.temperature
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0 or t != t or t == float("inf"):
        raise InputError(f"rollout.temperature: expected a finite number > 0, got {t!r}")
    p = settings.top_p
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
        raise InputError(f"rollout.top_p: expected a number in (0, 1], got {p!r}")
    if not isinstance(settings.top_k, int) or isinstance(settings.top_k, bool) or settings.top_k < 0:
        raise InputError(f"rollout.top_k: expected an integer >= 0 (0 = off), got {settings.top_k!r}")
    m = settings.max_new_tokens
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise InputError(f"rollout.max_new_tokens: expected an integer >= 1, got {m!r}")
    n = settings.n_samples
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"rollout.n_samples: expected an integer >= 1, got {n!r}")
    if isinstance(settings.stop, str) or not all(isinstance(s, str) and s for s in settings.stop):
        raise InputError(f"rollout.stop: expected a list of non-empty strings, got {settings.stop!r}")
    if isinstance(settings.stop_ids, int) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in settings.stop_ids
    ):
        raise InputError(f"rollout.stop_ids: expected a list of token ids >= 0, got {settings.stop_ids!r}")
    if not isinstance(settings.seed, int) or isinstance(settings.seed, bool) or settings.seed < 0:
        raise InputError(f"rollout.seed: expected an integer >= 0, got {settings.seed!r}")
    return settings


def _check_seed(seed: Any, name: str) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise InputError(f"{name}: expected an integer in [0, 2**63), got {seed!r}")
    return seed


def eos_ids(tokenizer, model=None) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:  # e.g. Qwen2.5-Instruct ends turns with <|im_end|> and documents with <|endoftext|>
        ids.extend(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return tuple(dict.fromkeys(ids))


@dataclass(frozen=True)
class RowPlan:
    """What a sampler's rows are: each prompt's ids ``n`` times, with the rows' seeds, prompt indices, tasks."""

    rows: list[list[int]]
    seeds: list[int]
    prompt_index: tuple[int, ...]
    task_ids: tuple[str | None, ...]


def plan_rows(encoded: Sequence[list[int]], *, n_samples: Any, seed: Any, default_seed: int,
              seeds: Sequence[int] | None, task_ids: Sequence[str | None] | None,
              prompt_index: Sequence[int] | None) -> RowPlan:
    """The rows of one ``sample`` call (every sampler's arguments checked the same way): ``n_samples`` per
    prompt, row ``i`` seeded with ``seeds[i]``, or else ``trajectory_seed(seed, i)`` (``seed`` defaulting to
    ``default_seed``)."""
    n = n_samples
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n_samples: expected an integer >= 1, got {n!r}")
    B = len(encoded) * n
    if seeds is not None:
        if seed is not None:
            raise InputError("seed and seeds: give one or the other")
        if isinstance(seeds, (str, bytes)) or len(seeds) != B:
            raise InputError(f"seeds: expected one seed per row ({len(encoded)} prompts x {n} = {B}), got {seeds!r}")
        row_seeds = [_check_seed(x, "seeds[]") for x in seeds]
    else:
        seed = _check_seed(default_seed if seed is None else seed, "seed")
        row_seeds = [trajectory_seed(seed, i) for i in range(B)]
    for name, values in (("task_ids", task_ids), ("prompt_index", prompt_index)):
        if values is not None and (isinstance(values, str) or len(values) != len(encoded)):
            raise InputError(f"{name}: expected one entry per prompt ({len(encoded)}), got {values!r}")
    index = tuple(prompt_index) if prompt_index is not None else tuple(range(len(encoded)))
    return RowPlan(
        rows=[ids for ids in encoded for _ in range(n)],
        seeds=row_seeds,
        prompt_index=tuple(index[i] for i in range(len(encoded)) for _ in range(n)),
        task_ids=tuple(task_ids[i] for i in range(len(encoded)) for _ in range(n)) if task_ids is not None else (),
    )


def check_token_rows(rows: Any, vocab_size: int) -> list[list[int]]:
    """``rows`` as lists of ints, each non-empty and inside the vocabulary (``InputError`` naming the row)."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise InputError(f"rows: expected a non-empty list of token-id lists, got {type(rows).__name__}")
    out = []
    for i, r in enumerate(rows):
        ids = r.tolist() if isinstance(r, torch.Tensor) else r
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(ids) == 0:
            raise InputError(f"rows[{i}]: expected a non-empty list of token ids, got {type(r).__name__}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
            raise InputError(f"rows[{i}]: token ids must be integers in [0, {vocab_size})")
        out.append(list(ids))
    return out


def plan_token_rows(rows: Any, vocab_size: int, *, seeds: Sequence[int], max_new_tokens: Any,
                    default_max_new_tokens: int, task_ids=None, prompt_index=None) -> tuple[RowPlan, int]:
    """The rows of one ``sample_tokens`` call (every sampler's arguments checked the same way) and its token
    limit (``max_new_tokens``, default ``default_max_new_tokens``)."""
    plan = plan_rows(check_token_rows(rows, vocab_size), n_samples=1, seed=None, default_seed=0, seeds=seeds,
                     task_ids=task_ids, prompt_index=prompt_index)
    limit = default_max_new_tokens if max_new_tokens is None else max_new_tokens
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"max_new_tokens: expected an integer >= 1, got {limit!r}")
    return plan, limit


def _processors():
    """The logits-processor classes used below (imported lazily: transformers is heavy)."""
    from transformers import LogitsProcessor, StoppingCriteria

    class _DrawProcessor(LogitsProcessor):
        """Draws each step's token itself (:func:`opdkit.rollout.draw.draw_step`), records what the trainer
        keeps, and hands ``generate`` scores whose argmax is that token (0 there, -inf elsewhere)."""

        def __init__(self, prompt_len: int, seeds_B: torch.Tensor, *, temperature: float, top_k: int,
                     top_p: float, block_id: int | None, stats: bool):
            self.prompt_len = prompt_len
            self.seeds = seeds_B.tolist()  # once, not per generated token
            self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, block_id=block_id, stats=stats)
            self.draws: list = []
            self._out: torch.Tensor | None = None

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - self.prompt_len
            d = draw_step(scores, seeds_B=self.seeds, step=step, **self.kw)
            self.draws.append(d)
            # generate only takes the argmax of what we return; one buffer, its previous 0s reset to -inf
            out = self._out
            if out is None or out.shape != scores.shape or out.device != scores.device:
                out = self._out = torch.full(scores.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
            elif len(self.draws) > 1:
                out.scatter_(1, self.draws[-2].token_B[:, None], float("-inf"))
            out.scatter_(1, d.token_B[:, None], 0.0)
            return out

    class _StopStringRecorder(StoppingCriteria):
        """transformers' ``StopStringCriteria``, remembering at which response step each sequence first matched."""

        def __init__(self, inner, prompt_len: int, batch_size: int, device):
            self.inner = inner
            self.prompt_len = prompt_len
            self.first_step = torch.full((batch_size,), -1, dtype=torch.long, device=device)

        def __call__(self, input_ids, scores, **kwargs):
            hit = self.inner(input_ids, scores, **kwargs)
            step = input_ids.shape[1] - self.prompt_len - 1
            new = hit & (self.first_step < 0)
            self.first_step = torch.where(new, torch.full_like(self.first_step, step), self.first_step)
            return hit

    return _DrawProcessor, _StopStringRecorder


def encode_prompts(tokenizer, prompts: Sequence[Prompt], *, chat: bool = True, max_prompt_tokens: int | None = None,
                   tokenizer_path: str = "<tokenizer>") -> list[list[int]]:
    """Token ids of each prompt (chat template with a generation prompt, or the raw string), the last
    ``max_prompt_tokens`` of a longer one."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InputError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise InputError("prompts: the list is empty; give at least one prompt")
    out: list[list[int]] = []
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"tokenizer '{tokenizer_path}': has no chat template, so chat prompts cannot be rendered "
            "(set a chat template, or pass raw string prompts with chat=False)"
        )
    for i, prompt in enumerate(prompts):
        if chat:
            if isinstance(prompt, str) or not isinstance(prompt, Sequence) or len(prompt) == 0:
                raise InputError(
                    f"prompts[{i}]: expected a non-empty list of {{'role', 'content'}} messages (or pass "
                    f"chat=False for raw strings), got {type(prompt).__name__}"
                )
            for j, msg in enumerate(prompt):
                if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                    raise InputError(f"prompts[{i}][{j}]: expected a dict with 'role' and 'content', got {msg!r}")
            ids = render_chat(tokenizer, prompt)
        else:
            if not isinstance(prompt, str):
                raise InputError(f"prompts[{i}]: expected a string with chat=False, got {type(prompt).__name__}")
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) == 0:
            raise InputError(f"prompts[{i}]: encodes to no tokens")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens :]
        out.append([int(t) for t in ids])
    return out


class HFSampler:
    """Samples student responses with ``model.generate`` and returns a :class:`RolloutBatch`.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``), in eval mode.
        tokenizer: its tokenizer; the chat template renders chat prompts.
        settings: an :class:`opdkit.config.RolloutConfig` (temperature, top_p, top_k, max_new_tokens,
            n_samples, stop, stop_ids, seed; ``engine`` is not read here).
        tokenizer_path: shown in error messages (defaults to ``tokenizer.name_or_path``).
        generate_fn: where ``generate`` is called (default ``model.generate``).
        max_prompt_tokens: keep only the last this many tokens of a longer prompt (left truncation).
        record_stats: also record each position's entropy and log-normaliser (``RolloutBatch.entropy_B_T``,
            ``logsumexp_B_T``; one more pass over the step's ``B x V`` row); False leaves them None.

    The pad token is never sampled unless it is also the EOS token (then it ends the sequence). A tokenizer
    without a pad token pads with its EOS token.
    """

    def __init__(
        self,
        model,
        tokenizer,
        settings: RolloutConfig | None = None,
        *,
        tokenizer_path: str | None = None,
        generate_fn=None,
        max_prompt_tokens: int | None = None,
        record_stats: bool = True,
    ):
        self.model = model
        self.max_prompt_tokens = max_prompt_tokens
        self.record_stats = record_stats
        # Where ``generate`` is called: the model's own, or a route through a distributed wrapper's forward
        # (FSDP must gather its shards inside the wrapper; see opdkit.train.build).
        self.generate_fn = generate_fn if generate_fn is not None else model.generate
        self.tokenizer = tokenizer
        self.settings = validate_rollout_settings(settings if settings is not None else RolloutConfig())
        self.tokenizer_path = tokenizer_path or str(getattr(tokenizer, "name_or_path", "") or "<tokenizer>")
        eos = self._eos_ids()
        if not eos:
            raise InputError(f"tokenizer '{self.tokenizer_path}': has no EOS token, so responses cannot end")
        self.eos_ids: tuple[int, ...] = eos
        pad = tokenizer.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else eos[0]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *self.settings.stop_ids]))
        vocab = self._vocab_size()
        bad = [i for i in self.settings.stop_ids if i >= vocab]
        if bad:
            raise InputError(f"rollout.stop_ids: ids {bad} are outside the model's vocabulary of {vocab}")
        self._stop_string_criteria = None
        self._calls = 0

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        settings: RolloutConfig | None = None,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device=None,
    ) -> HFSampler:
        """Load model and tokenizer from a local directory (``ModelLoadError`` if missing or not a causal LM)."""
        from opdkit.hf import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
        return cls(model, tokenizer, settings, tokenizer_path=str(path))

    def _eos_ids(self) -> tuple[int, ...]:
        return eos_ids(self.tokenizer, self.model)

    def _vocab_size(self) -> int:
        emb = self.model.get_output_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return int(emb.weight.shape[0])
        return int(self.model.config.get_text_config().vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------------------------- prompts
    def encode_prompts(self, prompts: Sequence[Prompt], *, chat: bool = True) -> list[list[int]]:
        """Token ids of each prompt (chat template with a generation prompt, or the raw string)."""
        return encode_prompts(self.tokenizer, prompts, chat=chat, max_prompt_tokens=self.max_prompt_tokens,
                              tokenizer_path=self.tokenizer_path)

    # ----------------------------------------------------------------------------------------- sampling
    def _logits_processors(self, prompt_len: int, seeds_B: torch.Tensor):
        from transformers import LogitsProcessorList

        draw_cls, _ = _processors()
        s = self.settings
        draw = draw_cls(prompt_len, seeds_B, temperature=float(s.temperature), top_k=int(s.top_k),
                        top_p=float(s.top_p), block_id=None if self.pad_id in self.eos_ids else self.pad_id,
                        stats=self.record_stats)
        return LogitsProcessorList([draw]), draw

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # Every sampling knob explicit and neutral: the distribution is fully given by our processor chain.
        # Greedy on the one-hot scores our processor returns (see the module docstring): it makes the draw.
        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            num_return_sequences=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            temperature=None,
            top_k=None,
            top_p=None,
            min_p=None,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
            use_cache=True,
            return_dict_in_generate=False,
            output_scores=False,
            output_logits=False,
        )

    def _clean_model_generation_config(self):
        """The model's generation config reduced to its special-token ids (``generate`` fills unset fields from it)."""
        from transformers import GenerationConfig

        old = getattr(self.model, "generation_config", None)
        keep = {}
        for key in ("bos_token_id", "decoder_start_token_id"):
            value = getattr(old, key, None)
            if value is not None:
                keep[key] = value
        return GenerationConfig(eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id, **keep)

    def _stop_criteria(self, prompt_len: int, batch_size: int):
        from transformers import StoppingCriteriaList, StopStringCriteria

        if not self.settings.stop:
            return StoppingCriteriaList(), None
        if self._stop_string_criteria is None:  # preprocesses the whole vocabulary: build once
            self._stop_string_criteria = StopStringCriteria(self.tokenizer, list(self.settings.stop))
        _, stop_recorder_cls = _processors()
        rec = stop_recorder_cls(self._stop_string_criteria, prompt_len, batch_size, self.device)
        return StoppingCriteriaList([rec]), rec

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Prompt],
        *,
        n_samples: int | None = None,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        chat: bool = True,
        task_ids: Sequence[str | None] | None = None,
        prompt_index: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Sample ``n_samples`` responses per prompt (consecutive rows share ``prompt_index``).

        Args:
            prompts: chat prompts (lists of ``{"role", "content"}`` dicts, rendered with the tokenizer's chat
                template and a generation prompt), or raw strings with ``chat=False``.
            n_samples: responses per prompt (default ``settings.n_samples``).
            seed: the call's seed; row ``i`` samples with ``trajectory_seed(seed, i)`` (default
                ``settings.seed + number of earlier calls``).
            seeds: instead of ``seed``, the seed of every row (``len(prompts) * n_samples`` of them): a row
                samples the same response with the same seed whatever else is in the batch.
            task_ids: optional task name per prompt, copied to every sample of it.
            prompt_index: optional index of each prompt in the caller's list (default ``0, 1, ...``),
                copied to every sample of it.
        """
        s = self.settings
        encoded = self.encode_prompts(prompts, chat=chat)
        plan = plan_rows(encoded, n_samples=s.n_samples if n_samples is None else n_samples, seed=seed,
                         default_seed=s.seed + self._calls, seeds=seeds, task_ids=task_ids, prompt_index=prompt_index)
        self._calls += 1
        return self._generate(plan, int(s.max_new_tokens))

    @torch.no_grad()
    def sample_tokens(self, rows: Sequence[Sequence[int]], *, seeds: Sequence[int], max_new_tokens: int | None = None,
                      task_ids: Sequence[str | None] | None = None,
                      prompt_index: Sequence[int] | None = None) -> RolloutBatch:
        """One response per row of token ids (already rendered: no chat template, no truncation), row ``i``
        sampled with ``seeds[i]``, at most ``max_new_tokens`` (default ``rollout.max_new_tokens``). What a
        multi-turn episode calls at each turn with the conversation so far (``opdkit.envs.episodes``)."""
        plan, limit = plan_token_rows(rows, self._vocab_size(), seeds=seeds, max_new_tokens=max_new_tokens,
                                      default_max_new_tokens=self.settings.max_new_tokens, task_ids=task_ids,
                                      prompt_index=prompt_index)
        return self._generate(plan, limit)

    def _generate(self, plan: RowPlan, max_new_tokens: int) -> RolloutBatch:
        rows, row_seeds, B = plan.rows, plan.seeds, len(plan.rows)

        # n samples per prompt, left-padded to a common length P
        device = self.device
        prompt_ids, prompt_mask = left_pad(rows, self.pad_id, device=device)
        P = prompt_ids.shape[1]
        seeds_B = torch.tensor(row_seeds, dtype=torch.long, device=device)

        processors, draw = self._logits_processors(P, seeds_B)
        criteria, stop_rec = self._stop_criteria(P, B)
        gen_config = self._generation_config(max_new_tokens)
        saved_config = self.model.generation_config
        try:
            self.model.generation_config = self._clean_model_generation_config()
            sequences = self.generate_fn(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=gen_config,
                logits_processor=processors,
                stopping_criteria=criteria,
            )
        finally:
            self.model.generation_config = saved_config

        response = sequences[:, P:]
        T = int(response.shape[1])
        if T == 0:  # cannot happen with max_new_tokens >= 1, but keep shapes sane
            raise RuntimeError("generate returned no new tokens")
        if len(draw.draws) != T:
            raise RuntimeError(f"generate made {T} steps but the sampler drew {len(draw.draws)} tokens")
        drawn = torch.stack([d.token_B for d in draw.draws], dim=1).to(response.device)
        old_lp = torch.stack([d.old_logprob_B for d in draw.draws], dim=1)
        samp_lp = torch.stack([d.sampling_logprob_B for d in draw.draws], dim=1)
        ent = torch.stack([d.entropy_B for d in draw.draws], dim=1) if self.record_stats else None
        lse = torch.stack([d.logsumexp_B for d in draw.draws], dim=1) if self.record_stats else None

        # end of each response: the first stop id, or the step where a stop string matched
        steps = torch.arange(T, device=response.device)
        is_stop = torch.isin(response, torch.tensor(self.stop_ids, device=response.device))
        first = torch.where(is_stop, steps, torch.full_like(response, T)).min(dim=1).values
        if stop_rec is not None:
            ss = stop_rec.first_step.to(response.device)
            first = torch.where((ss >= 0) & (ss < first), ss, first)
        stopped = first < T
        live = steps[None, :] <= first[:, None]  # generate writes pad after a row's stop id
        if not bool(((drawn == response) | ~live).all()):  # e.g. a processor generate added after ours
            raise RuntimeError("generate did not emit the tokens the sampler drew; is a logits processor or "
                               "generation-config default of this transformers version altering the scores?")
        length = torch.where(stopped, first + 1, torch.full_like(first, T))
        T_out = int(length.max())
        mask = (steps[None, :T_out] < length[:, None]).long()
        pad = torch.full_like(response[:, :T_out], self.pad_id)
        sampled = torch.where(mask.bool(), response[:, :T_out], pad)
        zero = torch.zeros((), dtype=old_lp.dtype, device=old_lp.device)
        old_lp = torch.where(mask.bool(), old_lp[:, :T_out].to(mask.device), zero)
        samp_lp = torch.where(mask.bool(), samp_lp[:, :T_out].to(mask.device), zero)
        if self.record_stats:
            ent = torch.where(mask.bool(), ent[:, :T_out].to(mask.device), zero)
            lse = torch.where(mask.bool(), lse[:, :T_out].to(mask.device), zero)

        return RolloutBatch(
            input_ids_B_L=torch.cat([prompt_ids, sampled], dim=1),
            attention_mask_B_L=torch.cat([prompt_mask, mask], dim=1),
            prompt_len=P,
            response_mask_B_T=mask,
            sampled_ids_B_T=sampled,
            old_logprobs_B_T=old_lp,
            sampling_logprobs_B_T=samp_lp,
            finish_reason=tuple(FINISH_STOP if bool(x) else FINISH_LENGTH for x in stopped.tolist()),
            prompt_index=plan.prompt_index,
            task_ids=plan.task_ids,
            entropy_B_T=ent,
            logsumexp_B_T=lse,
        )

    def sync_weights(self, model) -> None:
        """Nothing to do: this sampler generates with the trainer's own module, so it always sees the
        current weights (an engine that holds its own copy, such as vLLM, reloads them here)."""

    def decode(self, batch: RolloutBatch) -> list[str]:
        """The response texts of ``batch`` (masked positions dropped, special tokens kept)."""
        return [
            self.tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=False)
            for ids, m in zip(batch.sampled_ids_B_T, batch.response_mask_B_T, strict=True)
        ]
