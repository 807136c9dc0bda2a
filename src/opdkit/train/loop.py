"""The on-policy distillation trainer.

Algorithm — one training step is one rollout batch:

1. Take ``optim.prompts_per_step`` prompts (a seeded permutation per epoch; a single counter is the
   data position, so a resumed run takes exactly the prompts the interrupted one would have).
2. The student samples ``rollout.n_samples`` responses per prompt with temperature τ and top-p
   (``HFSampler``, the model's own ``generate``; the sampling seed is a function of the step).
3. Loss mask = the response mask minus the configured special tokens (``first`` or ``all``).
4. One no-grad teacher-forced pass of the student gives π_old (log-probs of the sampled tokens,
   consistent with the training forward pass), entropy, and the student top-K ids when the support
   source is ``student_topk``.
5. The teacher scores every response token (``TeacherSignal``: K support ids and full-vocab log-probs,
   the sampled token's log-prob). A signal with NaN skips the step (counted).
6. The batch is split into ``optim.mini_batches`` mini-batches, one AdamW step each, each accumulated
   over micro-batches of ``optim.micro_batch_size`` sequences. The objective is METHOD.md's, chosen by
   ``objective.kind``; for the sampled-token objective the PPO-clipped surrogate is used when there is
   more than one mini-batch (the ratio then departs from 1), REINFORCE otherwise.
7. Gradient-norm clip; a step whose gradient norm is not finite is skipped and counted; more than
   ``optim.max_skipped_steps`` in a row aborts with the step and the last good checkpoint.

Normalisation: ``aggregate(per_token, loss_mask, objective.aggregation)`` with the count of the whole
mini-batch (summed over processes) as the denominator, so the gradient does not depend on how the
mini-batch is cut into micro-batches or processes. Under DDP, gradients are averaged over processes,
so each process divides by ``global_count / world_size``.

Departures from the paper's recipe (verl-agent): the teacher runs in the trainer's process (or behind
the teacher server), not as a separate worker group; π_old is recomputed by a teacher-forced pass as in
verl, rather than taken from the sampler's incremental logits; the sampled-token objective computes
``log π_θ`` from full logits per micro-batch (use small micro-batches for long responses).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdkit.config import Config
from opdkit.errors import OpdkitError
from opdkit.losses import opd_diagnostics, special_token_mask
from opdkit.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from opdkit.train.metrics import MetricsLogger, truncate_metrics
from opdkit.train.objective import MicroBatch, micro_batch_loss, student_statistics
from opdkit.train.run_dir import prepare_run_dir
from opdkit.train.schedule import make_scheduler
from opdkit.types import FINISH_LENGTH, RolloutBatch, TeacherSignal

__all__ = ["TrainingAborted", "TrainResult", "Trainer", "train"]


class TrainingAborted(OpdkitError):
    """Training stopped on purpose (e.g. too many non-finite steps in a row)."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    skipped_steps: int
    final_dir: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


def _prompt_order(n_prompts: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n_prompts))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_prompts, generator=g).tolist()


class Trainer:
    """Builds everything from a ``Config`` and runs the loop; see the module docstring for the algorithm.

    Args:
        cfg: the resolved config (``model.path`` and ``teacher.path`` must be set).
        run_dir: where the run lives (see ``opdkit.train.run_dir``).
        prompts: the training prompts (``PromptRecord``s or chat-message lists); default: ``data.train_path``.
        resume / overwrite: what to do with an existing run directory.
        progress: show a progress bar.
        eval_fn: optional ``eval_fn(model, tokenizer, step) -> dict`` of extra metrics (e.g.
            ``{"eval_accuracy": 0.8}``), run every ``eval.every_steps`` steps and after the last step;
            its numbers go into that step's metrics line.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        prompts=None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        eval_fn=None,
    ):
        self.run_dir, self.cfg = prepare_run_dir(cfg, run_dir, resume=resume, overwrite=overwrite)
        cfg = self.cfg
        self.progress = progress
        self.eval_fn = eval_fn
        if cfg.model.path is None or (cfg.teacher.path is None and cfg.teacher.url is None):
            raise OpdkitError("model.path and teacher.path must be set to train")
        if cfg.teacher.url is not None:
            raise OpdkitError("teacher.url (a remote teacher) is not supported by the trainer yet; use teacher.path")
        self._setup_prompts(prompts)
        self._setup_models()

    # ------------------------------------------------------------------------------------------- setup
    def _setup_prompts(self, prompts) -> None:
        from opdkit.train.data import PromptRecord, load_prompts

        if prompts is None:
            if self.cfg.data.train_path is None:
                raise OpdkitError("data.train_path must be set (or prompts passed in) to train")
            prompts = load_prompts(
                self.cfg.data.train_path, prompt_key=self.cfg.data.prompt_key, answer_key=self.cfg.data.answer_key
            )
        self.prompts = [p if isinstance(p, PromptRecord) else PromptRecord(tuple(p)) for p in prompts]
        if not self.prompts:
            raise OpdkitError("no training prompts")

    def _setup_models(self) -> None:
        from accelerate import Accelerator

        from opdkit.check import check_pair, require_compatible, vocab_rows
        from opdkit.hf import load_causal_lm, load_tokenizer
        from opdkit.rollout import HFSampler
        from opdkit.special_tokens import resolve_special_ids
        from opdkit.teacher import LocalTeacher

        cfg = self.cfg
        want_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
        bf16 = want_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        self.accelerator = Accelerator(cpu=not want_cuda, mixed_precision="bf16" if bf16 else "no")
        device = self.accelerator.device

        self.tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        model = load_causal_lm(
            cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, device=device
        )
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.model.lora_r > 0:
            model = self._wrap_lora(model)
        teacher_tok = load_tokenizer(cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code)
        teacher_model = load_causal_lm(
            cfg.teacher.path, dtype=cfg.teacher.dtype, trust_remote_code=cfg.teacher.trust_remote_code, device=device
        )
        student_rows, teacher_rows = vocab_rows(model), vocab_rows(teacher_model)
        report = check_pair(
            self.tokenizer, teacher_tok, student_rows=student_rows, teacher_rows=teacher_rows,
            student=cfg.model.path, teacher=cfg.teacher.path,
        )
        require_compatible(report)
        self.special_ids = resolve_special_ids(self.tokenizer, cfg.objective.special_tokens)

        obj = cfg.objective
        if obj.kind == "full_reverse_kl":  # the whole (shared) vocabulary as the support: K = V
            top_k, support = min(student_rows, teacher_rows), "teacher_topk"
        else:
            top_k, support = obj.top_k, obj.support
        self.teacher = LocalTeacher(
            teacher_model.eval().requires_grad_(False),
            teacher_tok,
            top_k=top_k,
            chunk_size=cfg.teacher.chunk_size,
            temperature=cfg.rollout.temperature,
            support=support,
            student_vocab_size=min(student_rows, teacher_rows),
            drop_ids=self.special_ids if obj.drop_special_from_support else (),
        )
        self.support_k = top_k

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
        scheduler = make_scheduler(
            optimizer,
            schedule=cfg.optim.schedule,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.optim.total_steps * cfg.optim.mini_batches,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.sampler = HFSampler(self.accelerator.unwrap_model(self.model), self.tokenizer, cfg.rollout)

    def _wrap_lora(self, model):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise OpdkitError("model.lora_r > 0 needs peft: pip install 'opdkit[lora]' (or pip install peft)") from exc
        m = self.cfg.model
        lora = LoraConfig(
            r=m.lora_r,
            lora_alpha=m.lora_alpha,
            lora_dropout=m.lora_dropout,
            target_modules=list(m.lora_target_modules) or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    # ------------------------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def _save(self, step: int, counters: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": list(random.getstate()[1]),
        }
        self.last_checkpoint = save_checkpoint(
            self.run_dir,
            step,
            model_state=self._trainable_state(),
            state=state,
            trainer_state=counters,
            keep_last=self.cfg.run.keep_last,
        ).path

    def _restore(self) -> tuple[int, dict[str, Any]]:
        remove_partial_checkpoints(self.run_dir)
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            truncate_metrics(self.run_dir, -1)
            return 0, {}
        model_state, state, trainer_state = load_checkpoint(ckpt)
        model = self.accelerator.unwrap_model(self.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in model_state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        py = random.getstate()
        random.setstate((py[0], tuple(int(v) for v in state["python_rng"]), py[2]))
        truncate_metrics(self.run_dir, ckpt.step)
        self.last_checkpoint = ckpt.path
        return ckpt.step, trainer_state

    # ------------------------------------------------------------------------------------------- steps
    def _prompts_for_step(self, counter: int) -> tuple[list, int]:
        n, out = len(self.prompts), []
        per_step = self.cfg.optim.prompts_per_step
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for c in range(counter, counter + per_step):
            epoch, idx = divmod(c, n)
            out.append(self.prompts[_prompt_order(n, epoch, self.cfg.run.seed, self.cfg.data.shuffle)[idx]])
        return out[rank::world], counter + per_step

    def _global_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def _mini_batch_denominator(self, mask_B_T: torch.Tensor) -> float:
        if self.cfg.objective.aggregation == "token-mean":
            local = float(mask_B_T.sum())
        else:
            local = float((mask_B_T.sum(-1) > 0).sum())
        total = self._global_sum(local)
        return max(total, 1.0) / self.accelerator.num_processes

    def _step(self, step: int, records: list) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        timings = {}
        t0 = time.perf_counter()
        self.model.eval()
        batch: RolloutBatch = self.sampler.sample(
            [list(r.messages) for r in records],
            seed=cfg.rollout.seed + step * acc.num_processes + acc.process_index,
        )
        timings["time_rollout_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        loss_mask = special_token_mask(
            batch.sampled_ids_B_T,
            self.special_ids,
            batch.response_mask_B_T.bool(),
            mode=cfg.objective.special_token_mode,
        )
        student_topk = self.cfg.objective.kind != "full_reverse_kl" and self.cfg.objective.support == "student_topk"
        # One no-grad student pass per step: for student_topk it must come first (it picks the support);
        # otherwise after the teacher, so that it can also read the student's log-probs on the support.
        if student_topk:
            stats = self._student_stats(batch, None, topk=self.support_k)
            stats["support_logprobs_B_T_K"] = stats["topk_logprobs_B_T_K"]
            signal: TeacherSignal = self.teacher.score(batch, student_support_ids_B_T_K=stats["topk_ids_B_T_K"])
        else:
            signal = self.teacher.score(batch)
            stats = self._student_stats(batch, signal.support_ids_B_T_K, topk=0)
        timings["time_teacher_s"] = time.perf_counter() - t1

        finite = bool(
            torch.isfinite(signal.sampled_logprobs_B_T).all()
            and not torch.isnan(signal.teacher_logprobs_B_T_K).any()
            and (signal.teacher_logprobs_B_T_K < float("inf")).all()
        )
        metrics: dict[str, Any] = {}
        if finite:
            support_lp = stats["support_logprobs_B_T_K"]
            diag = opd_diagnostics(
                loss_mask,
                sampled_ids=batch.sampled_ids_B_T,
                old_logprobs=stats["old_logprobs_B_T"],
                teacher_sampled_logprobs=signal.sampled_logprobs_B_T,
                support_ids=signal.support_ids_B_T_K,
                teacher_support_logprobs=signal.teacher_logprobs_B_T_K,
                student_support_logprobs=support_lp.masked_fill(
                    signal.teacher_logprobs_B_T_K == float("-inf"), float("-inf")
                ),
            )
            metrics.update({k: float(v) for k, v in diag.items()})
            from opdkit.losses import masked_mean

            metrics["entropy"] = float(masked_mean(stats["entropy_B_T"], batch.response_mask_B_T.bool()))

        t2 = time.perf_counter()
        self.model.train()
        if finite:
            update = self._update(step, batch, signal, loss_mask, stats["old_logprobs_B_T"])
        else:
            update = {"loss": float("nan"), "grad_norm": float("nan"), "skipped": 1, "skip_reason": "teacher_nan"}
        timings["time_update_s"] = time.perf_counter() - t2

        n_resp = float(batch.response_mask_B_T.sum())
        metrics.update(update)
        metrics.update(timings)
        metrics["response_length"] = n_resp / max(batch.batch_size, 1)
        metrics["truncation_rate"] = sum(r == FINISH_LENGTH for r in batch.finish_reason) / max(batch.batch_size, 1)
        metrics["special_masked_frac"] = 1.0 - float(loss_mask.sum()) / max(n_resp, 1.0)
        metrics["tokens_per_s"] = n_resp / max(sum(timings.values()), 1e-9)
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        return metrics

    def _student_stats(self, batch: RolloutBatch, support_ids, *, topk: int) -> dict[str, torch.Tensor]:
        """``student_statistics`` over micro-batches, concatenated."""
        mb = self.cfg.optim.micro_batch_size
        parts: dict[str, list] = {}
        model = self.accelerator.unwrap_model(self.model)
        for s in range(0, batch.batch_size, mb):
            rows = slice(s, s + mb)
            out = student_statistics(
                model,
                batch.input_ids_B_L[rows],
                batch.attention_mask_B_L[rows],
                batch.prompt_len,
                batch.sampled_ids_B_T[rows],
                None if support_ids is None else support_ids[rows],
                temperature=self.cfg.rollout.temperature,
                topk=topk,
                chunk_size=self.cfg.teacher.chunk_size,
            )
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    def _update(self, step: int, batch, signal, loss_mask, old_logprobs) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        B = batch.batch_size
        g = torch.Generator().manual_seed(cfg.run.seed * 7919 + step)
        order = torch.randperm(B, generator=g).to(batch.input_ids_B_L.device)
        n_mini = min(cfg.optim.mini_batches, B)
        losses, norms, skipped = [], [], 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        for mini_rows in order.tensor_split(n_mini):
            denom = self._mini_batch_denominator(loss_mask[mini_rows])
            micro = mini_rows.split(cfg.optim.micro_batch_size)
            total = 0.0
            for i, rows in enumerate(micro):
                mb = MicroBatch(
                    input_ids_B_L=batch.input_ids_B_L[rows],
                    attention_mask_B_L=batch.attention_mask_B_L[rows],
                    prompt_len=batch.prompt_len,
                    loss_mask_B_T=loss_mask[rows],
                    sampled_ids_B_T=batch.sampled_ids_B_T[rows],
                    old_logprobs_B_T=old_logprobs[rows],
                    support_ids_B_T_K=signal.support_ids_B_T_K[rows],
                    teacher_logprobs_B_T_K=signal.teacher_logprobs_B_T_K[rows],
                    teacher_sampled_logprobs_B_T=signal.sampled_logprobs_B_T[rows],
                )
                sync = i == len(micro) - 1
                ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
                with ctx:
                    loss, _ = micro_batch_loss(
                        self.model, mb, cfg.objective, temperature=cfg.rollout.temperature,
                        denominator=denom, ppo_clip=n_mini > 1,
                    )
                    acc.backward(loss)
                total += float(loss.detach())
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
            norm = float(acc.clip_grad_norm_(params, max_norm))
            if math.isfinite(norm):
                self.optimizer.step()
                self.scheduler.step()
            else:
                skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            norms.append(norm)
        out = {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms),
            "skipped": 1 if skipped == n_mini else 0,
        }
        if skipped:
            out["skip_reason"] = "nonfinite_grad"
        return out

    # -------------------------------------------------------------------------------------------- loop
    def run(self, *, on_step=None) -> TrainResult:
        """Train to ``optim.total_steps``, resuming from the last checkpoint in the run directory."""
        cfg, acc = self.cfg, self.accelerator
        self.last_checkpoint = None
        start, counters = self._restore()
        prompt_counter = int(counters.get("prompt_counter", 0))
        skipped_total = int(counters.get("skipped_steps", 0))
        consecutive = int(counters.get("consecutive_skipped", 0))
        logger = MetricsLogger(self.run_dir, tensorboard=cfg.run.tensorboard) if acc.is_main_process else None
        bar = None
        if self.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.optim.total_steps, initial=start, desc="opd", unit="step", dynamic_ncols=True)
        metrics: dict[str, Any] = {}
        try:
            for step in range(start, cfg.optim.total_steps):
                records, prompt_counter = self._prompts_for_step(prompt_counter)
                t = time.perf_counter()
                metrics = self._step(step, records)
                metrics["time_step_s"] = time.perf_counter() - t
                if metrics["skipped"]:
                    skipped_total += 1
                    consecutive += 1
                else:
                    consecutive = 0
                metrics.update(step=step + 1, skipped_steps=skipped_total)
                every, last = cfg.eval.every_steps, step + 1 == cfg.optim.total_steps
                if self.eval_fn is not None and ((every and (step + 1) % every == 0) or last):
                    model = self.accelerator.unwrap_model(self.model)
                    model.eval()
                    metrics.update(self.eval_fn(model, self.tokenizer, step + 1))
                if logger is not None and (step + 1) % cfg.run.log_every == 0:
                    logger.log(metrics)
                if on_step is not None:
                    on_step(step + 1, metrics, self)
                if consecutive > cfg.optim.max_skipped_steps:
                    last = self.last_checkpoint or "none (no checkpoint was written yet)"
                    raise TrainingAborted(
                        f"step {step + 1}: {consecutive} steps in a row were skipped "
                        f"({metrics.get('skip_reason', 'non-finite')}); last good checkpoint: {last}"
                    )
                done = step + 1 == cfg.optim.total_steps
                # A skipped step changed nothing but counters: the last checkpoint stays the last good one.
                due = (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or done
                if due and not metrics["skipped"]:
                    self._save(
                        step + 1,
                        {"prompt_counter": prompt_counter, "skipped_steps": skipped_total,
                         "consecutive_skipped": consecutive},
                    )
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        final = self.export()
        return TrainResult(self.run_dir, cfg.optim.total_steps, skipped_total, final, metrics)

    def export(self) -> Path | None:
        """``save_pretrained`` the student (LoRA merged) and its tokenizer into ``RUN_DIR/final``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        model = acc.unwrap_model(self.model)
        if hasattr(model, "merge_and_unload"):  # LoRA: export a plain model with the adapters merged
            model = copy.deepcopy(model).merge_and_unload()
        final = self.run_dir / "final"
        tmp = self.run_dir / ".final-tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final


def train(cfg: Config, run_dir: str | Path, **kwargs) -> TrainResult:
    """Build a ``Trainer`` and run it (see ``Trainer`` for the arguments)."""
    return Trainer(cfg, run_dir, **{k: v for k, v in kwargs.items() if k != "on_step"}).run(
        on_step=kwargs.get("on_step")
    )

