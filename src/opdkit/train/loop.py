"""The on-policy distillation trainer: the outer loop (data order, logging, evaluation, checkpoints).

Algorithm — one training step is one rollout batch (``opdkit.train.step`` holds the step itself):

1. Take ``optim.prompts_per_step`` prompts (a seeded permutation per epoch; a single counter is the data
   position, so a resumed run takes exactly the prompts the interrupted one would have).
2. The student samples ``rollout.n_samples`` responses per prompt with temperature τ and top-p; each
   response has its own seed, so the responses do not depend on the number of processes.
3. Loss mask = the response mask minus the configured special tokens (``first`` or ``all``).
4. One no-grad pass of the student gives π_old (log-probs of the sampled tokens, in the precision of the
   training forward pass), entropy, the log-normaliser, and the student top-K ids when the support source
   is ``student_topk``.
5. The teacher scores every response token (``TeacherSignal``: K support ids and full-vocab log-probs, the
   sampled token's log-prob). A non-finite signal on any process skips the step on every process.
6. The rollout batch is cut into ``optim.mini_batches`` mini-batches, one AdamW step each, accumulated over
   micro-batches of ``optim.micro_batch_size`` sequences. The objective is METHOD.md's, chosen by
   ``objective.kind`` (``opdkit.objectives``); for the sampled-token objective the PPO-clipped surrogate is
   used when there is more than one mini-batch (the ratio then departs from 1), REINFORCE otherwise.
7. Gradient-norm clip; a step whose gradient norm is not finite is skipped and counted; more than
   ``optim.max_skipped_steps`` in a row aborts with the step and the last good checkpoint.

Normalisation: ``aggregate(per_token, loss_mask, objective.aggregation)`` with the count of the whole
mini-batch (all processes) as the denominator: the gradient is the same for any micro-batch size and any
number of processes.

Departures from the paper's recipe (verl-agent): the teacher runs in the trainer's process; π_old is
recomputed by a teacher-forced pass as in verl, rather than taken from the sampler's incremental logits (the
two agree within the tolerance of the precision policy, see tests/train/test_precision.py); trainable
weights are float32 master weights whatever the compute precision.

Several processes: ``torchrun --nproc_per_node N -m opdkit.cli train ...`` (CPU or GPU) or ``accelerate
launch`` (GPUs). One process writes the run directory, metrics and the exported model; every process
holds its share of the responses and writes its own state into each checkpoint.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdkit.config import Config
from opdkit.errors import OpdkitError
from opdkit.interrupt import Interrupted, StopRequests
from opdkit.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from opdkit.train.metrics import PER_TASK, MetricsLogger, truncate_metrics
from opdkit.train.step import StepRecord, run_step

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


class Trainer:
    """Builds a run from a ``Config`` and trains it; see the module docstring for the algorithm.

    Args:
        cfg: the resolved config (``model.path`` and ``teacher.path`` must be set).
        run_dir: where the run lives (see ``opdkit.train.run_dir``); ``None``: a new directory under ``runs/``.
        prompts: the training prompts (``PromptRecord``s or chat-message lists); default: ``data.train_path``.
        eval_problems: evaluation problems (``PromptRecord``s with answers); default: ``data.eval_path``.
        evaluator: an evaluator (``opdkit.eval.Evaluator``) instead of the one built from the config.
        resume / overwrite: what to do with an existing run directory.
        from_checkpoint: with ``resume``, the step of the checkpoint to continue from (default: the newest).
        progress: show a progress bar.
        log: where start-up messages and warnings go.

    After each step, ``run(on_step=...)`` calls ``on_step(step, metrics, trainer)``; ``trainer.last_step``
    is then that step's :class:`~opdkit.train.step.StepRecord` (this process's share).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path | None,
        *,
        prompts=None,
        eval_problems=None,
        evaluator=None,
        resume: bool = False,
        from_checkpoint: int | None = None,
        overwrite: bool = False,
        progress: bool = True,
        log=print,
    ):
        from opdkit.train.build import build_components

        self.c = build_components(cfg, run_dir, prompts=prompts, eval_problems=eval_problems, evaluator=evaluator,
                                  resume=resume, overwrite=overwrite, log=log)
        self.cfg, self.run_dir = self.c.cfg, self.c.run_dir
        self.resumed = resume
        self.from_checkpoint = from_checkpoint
        self.prompts_digest = _digest(self.c.prompts)
        self.progress = progress
        self.log = log if self.c.dist.is_main else (lambda _msg: None)
        self.last_step: StepRecord | None = None
        self.last_checkpoint: Path | None = None
        pi_old = "from the sampler" if self.c.pi_old_from_sampler else "recomputed by a student pass"
        self.log(f"opdkit: {self.c.head_description}; precision {self.c.precision.name}; π_old {pi_old}; "
                 f"{self.c.dist.world} process(es) on {self.c.dist.device}, "
                 f"{torch.get_num_threads()} CPU thread(s) each")

    # conveniences for callers and tests
    @property
    def model(self):
        """The prepared student module (what the optimizer trains)."""
        return self.c.module

    @property
    def student(self):
        """The student causal LM (unwrapped; a peft model with LoRA)."""
        return self.c.lm

    @property
    def teacher(self):
        return self.c.teacher

    @property
    def tokenizer(self):
        return self.c.tokenizer

    # ------------------------------------------------------------------------------------ checkpoints
    def _save(self, step: int, counters: dict[str, Any]) -> None:
        ckpt = save_checkpoint(self.run_dir, step, accelerator=self.c.accelerator, dist=self.c.dist,
                               trainer_state=counters, keep_last=self.cfg.run.keep_last)
        self.last_checkpoint = ckpt.path

    def _restore(self) -> tuple[int, dict[str, Any]]:
        """The step and counters to continue from: the newest complete checkpoint, or ``--checkpoint STEP``.

        An unreadable newest checkpoint stops the resume with the previous complete one named; resuming from
        an older checkpoint sets the newer ones aside (``checkpoints/.abandoned-step-*``), so they can neither
        be picked up later nor push the good ones out of ``run.keep_last``.
        """
        dist = self.c.dist
        if dist.is_main:
            remove_partial_checkpoints(self.run_dir)
        dist.barrier()
        ckpts = list_checkpoints(self.run_dir)
        incomplete = sorted(p.name for p in (self.run_dir / "checkpoints").glob("step-*")
                            if p.is_dir() and not (p / "COMPLETE").exists())
        if incomplete:
            self.log(f"opdkit: skipping incomplete checkpoint(s) {', '.join(incomplete)} (no COMPLETE marker)")
        if self.from_checkpoint is not None:
            chosen = [c for c in ckpts if c.step == self.from_checkpoint]
            if not chosen:
                steps = ", ".join(str(c.step) for c in ckpts) or "none"
                raise CheckpointError(f"--checkpoint {self.from_checkpoint}: no complete checkpoint of that step in "
                                      f"{self.run_dir / 'checkpoints'} (there are: {steps})")
            ckpt = chosen[0]
        else:
            ckpt = ckpts[-1] if ckpts else None
        if ckpt is None:
            if dist.is_main:
                truncate_metrics(self.run_dir, -1)
            if self.resumed:
                self.log(f"opdkit: {self.run_dir} has no checkpoint yet: starting from step 0")
            return 0, {}
        if ckpt.step > self.cfg.optim.total_steps:
            raise CheckpointError(f"optim.total_steps = {self.cfg.optim.total_steps} is below the checkpoint's step "
                                  f"{ckpt.step}; to extend a run, raise optim.total_steps")
        try:
            state = load_checkpoint(ckpt, accelerator=self.c.accelerator)
        except CheckpointError as exc:
            older = [c for c in ckpts if c.step < ckpt.step]
            hint = (f"; the previous complete checkpoint is step {older[-1].step}: resume from it by adding "
                    f"--checkpoint {older[-1].step} to the same command (`opdkit train --resume {self.run_dir} "
                    f"--checkpoint {older[-1].step} ...`)" if older else "; there is no older checkpoint")
            raise CheckpointError(f"{str(exc).splitlines()[0]}{hint}") from None
        self._check_identity(state)
        if dist.is_main:
            for newer in (c for c in ckpts if c.step > ckpt.step):
                target, i = newer.path.with_name(f".abandoned-{newer.path.name}"), 1
                while target.exists():
                    target, i = newer.path.with_name(f".abandoned-{newer.path.name}-{i}"), i + 1
                newer.path.rename(target)
            truncate_metrics(self.run_dir, ckpt.step)
        dist.barrier()
        self.last_checkpoint = ckpt.path
        self.log(f"opdkit: resuming from {ckpt.path} (step {ckpt.step} of {self.cfg.optim.total_steps})")
        return ckpt.step, state

    def _check_identity(self, state: dict) -> None:
        """A resumed run trains the same prompts, from the same models, with the same chat template."""
        checks = [
            ("prompts_sha256", self.prompts_digest, f"the training prompts ({self.cfg.data.train_path}) are not the "
             "ones this run started with: the data order of the remaining steps would change"),
            ("student_sha256", self.c.identity["student_sha256"], f"model.path ({self.cfg.model.path}) is not the "
             "model this run started from (its config, tokenizer or weights differ)"),
            ("teacher_sha256", self.c.identity["teacher_sha256"],
             f"{'teacher.url' if self.cfg.teacher.url else 'teacher.path'} "
             f"({self.cfg.teacher.url or self.cfg.teacher.path}) is not the teacher this run started with (its "
             "config, tokenizer or weights differ)"),
            ("chat_template_sha256", self.c.identity["chat_template_sha256"], "the chat template differs from the "
             "one this run started with (model.chat_template, or the model's tokenizer)"),
        ]
        for key, now, message in checks:
            if state.get(key) is not None and state[key] != now:
                raise CheckpointError(f"--resume {self.run_dir}: {message}")

    # ------------------------------------------------------------------------------------------- loop
    def _evaluate(self, step: int, metrics: dict[str, Any]) -> None:
        t = time.perf_counter()
        metrics.update(self.c.evaluator.evaluate(self.c.lm, self.c.tokenizer, step))
        metrics["time_eval_s"] = self.c.dist.max([time.perf_counter() - t])[0]

    def run(self, *, on_step=None) -> TrainResult:
        """Train to ``optim.total_steps``, resuming from the last checkpoint in the run directory.

        SIGINT/SIGTERM stop the run after the step in progress, with a checkpoint of it: ``Interrupted`` is
        raised (see ``opdkit.interrupt``).
        """
        cfg, dist = self.cfg, self.c.dist
        start, counters = self._restore()
        if self.resumed and dist.is_main:  # allowed resume overrides, kept once the resume is known to work
            from opdkit.config import load_config
            from opdkit.train.run_dir import CONFIG_FILE, write_run_config

            if load_config(self.run_dir / CONFIG_FILE) != cfg:
                write_run_config(cfg, self.run_dir)
        logger = None
        if dist.is_main:
            logger = MetricsLogger(self.run_dir, tensorboard=cfg.run.tensorboard, from_step=start + 1)
        bar = None
        if self.progress and dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.optim.total_steps, initial=start, desc="opd", unit="step", dynamic_ncols=True)
        try:
            with StopRequests() as stop:
                if start == 0 and cfg.eval.at_start and self.c.evaluator is not None:
                    before: dict[str, Any] = {"step": 0}
                    self._evaluate(0, before)
                    if logger is not None:
                        logger.log(before)
                metrics, skipped = self._loop(start, counters, logger, bar, stop, on_step)
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
            if self.c.env_pool is not None:  # its workers: none outlives the run, a hung one included
                self.c.env_pool.close()
        final = self.export()
        close = getattr(self.c.sampler, "close", None)
        if close is not None:  # vLLM's engine: its shutdown also leaves the process group
            dist.barrier()
            close()
        if dist.world > 1 and torch.distributed.is_initialized():  # leave the process group cleanly (gloo
            self.c.accelerator.end_training()  # can abort at exit otherwise)
        return TrainResult(self.run_dir, cfg.optim.total_steps, skipped, final, metrics)

    def _loop(self, start: int, counters: dict, logger, bar, stop: StopRequests, on_step):
        """Steps ``start .. optim.total_steps``; returns the last metrics and the number of skipped steps."""
        cfg, dist = self.cfg, self.c.dist
        from opdkit.train.tasks import ALL

        data_counters = dict(counters.get("task_counters") or {ALL: int(counters.get("prompt_counter", 0))})
        skipped_total = int(counters.get("skipped_steps", 0))
        consecutive = int(counters.get("consecutive_skipped", 0))
        metrics: dict[str, Any] = {}
        for step in range(start, cfg.optim.total_steps):
            records, positions, data_counters = self.c.schedule.take(step, data_counters,
                                                                     cfg.optim.prompts_per_step)
            t = time.perf_counter()
            local, record = run_step(self.c, step, records, positions, keep_record=on_step is not None)
            local.max("time_step_s", time.perf_counter() - t)
            metrics = local.reduce(dist)
            if metrics.get("env_failure_rate", 0.0) >= 1.0:  # the same value on every process: all stop
                raise TrainingAborted(
                    f"step {step + 1}: every episode failed ({local.notes[0] if local.notes else 'see the logs'}); "
                    "nothing can be learnt from it. Check the environment data and the env.* settings "
                    "(env.max_episode_tokens for a budget failure, env.step_timeout_s for timeouts)"
                )
            if self.c.schedule.multitask:  # the step's task, and its curves under their own names
                task = str(records[0].task)
                metrics["task"] = task
                for k in [k for k in metrics if k in PER_TASK]:
                    metrics[f"{k}@{task}"] = metrics[k]
            metrics["tokens_per_s"] = metrics["response_length"] * metrics["rollouts"] / metrics["time_step_s"]
            self.last_step = record
            if metrics["skipped"]:
                skipped_total += 1
                consecutive += 1
            else:
                consecutive = 0
            metrics.update(step=step + 1, skipped_steps=skipped_total)
            done = step + 1 == cfg.optim.total_steps
            every = cfg.eval.every_steps
            evaluated = self.c.evaluator is not None and ((every and (step + 1) % every == 0) or done)
            if evaluated:
                self._evaluate(step + 1, metrics)
            if logger is not None and ((step + 1) % cfg.run.log_every == 0 or done or evaluated):
                logger.log(metrics)
            if on_step is not None:
                on_step(step + 1, metrics, self)
            if consecutive > cfg.optim.max_skipped_steps:
                last = self.last_checkpoint or "none (no checkpoint was written yet)"
                raise TrainingAborted(
                    f"step {step + 1}: {consecutive} steps in a row were skipped "
                    f"({metrics.get('skip_reason', 'non-finite')}); last good checkpoint: {last}"
                )
            counters = {"prompt_counter": data_counters.get(ALL, 0), "task_counters": data_counters,
                        "skipped_steps": skipped_total,
                        "consecutive_skipped": consecutive, "prompts_sha256": self.prompts_digest, **self.c.identity}
            # A skipped step changed nothing but counters: the last checkpoint stays the last good one.
            due = (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or done
            saved = bool(due and not metrics["skipped"])
            if saved:
                self._save(step + 1, counters)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                bar.update(1)
            # Every process agrees, at the step boundary, whether a stop was asked for.
            if not done and dist.sum([float(stop.requested)])[0] > 0:
                if not saved:
                    self._save(step + 1, counters)
                raise Interrupted(
                    f"stopped by {stop.signal_name or 'a signal'} after step {step + 1} of {cfg.optim.total_steps}; "
                    f"its state is saved in {self.last_checkpoint}. Continue with: opdkit train --resume "
                    f"{self.run_dir}",
                    self.last_checkpoint,
                )
        return metrics, skipped_total

    def export(self) -> Path | None:
        """``save_pretrained`` the student (LoRA merged) and its tokenizer into ``RUN_DIR/final`` (one process),
        in the dtype it was loaded in (the float32 master weights rounded once, at the end)."""
        acc, dist = self.c.accelerator, self.c.dist
        dist.barrier()
        state = acc.get_state_dict(self.c.module) if dist.is_fsdp else None  # collective under FSDP
        final = None
        if dist.is_main:
            model = self.c.lm
            kwargs = {}
            if state is not None:
                kwargs["state_dict"] = {k.removeprefix("lm."): v for k, v in state.items()}
            if hasattr(model, "merge_and_unload"):  # LoRA: export a plain model with the adapters merged
                model = copy.deepcopy(model).merge_and_unload()
            dtype = self.c.load_dtype
            if dtype != torch.float32:
                sd = kwargs.get("state_dict") or model.state_dict()
                kwargs["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            final = self.run_dir / "final"
            tmp = self.run_dir / ".final-tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp, safe_serialization=True, **kwargs)
            if dtype != torch.float32:
                # save_pretrained named the master weights' float32; the file holds `dtype`
                _set_config_dtype(tmp / "config.json", dtype)
            self.c.tokenizer.save_pretrained(tmp)
            _replace_export(tmp, final)
        dist.barrier()
        return final


def _replace_export(tmp: Path, final: Path) -> None:
    """Put the export in ``tmp`` in place of ``final``, listing its files in a manifest; files in the old
    ``final/`` that an export did not write (the user's) are carried over, never deleted."""
    import json

    from opdkit.train.run_dir import EXPORT_MANIFEST

    written = sorted(p.name for p in tmp.iterdir())
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(written))
    if final.exists():
        try:
            ours = set(json.loads((final / EXPORT_MANIFEST).read_text())) | {EXPORT_MANIFEST}
        except (OSError, ValueError):
            ours = {EXPORT_MANIFEST}
        for child in final.iterdir():
            if child.name not in ours and not (tmp / child.name).exists():
                child.rename(tmp / child.name)
        shutil.rmtree(final)
    tmp.rename(final)


def _digest(records) -> str:
    """A digest of the training prompts (messages, answers, tasks): a resumed run must see the same ones."""
    import hashlib
    import json

    h = hashlib.sha256()
    for r in records:
        item = [list(r.messages), r.answer, r.task]
        if r.env is not None:  # (only then: the digests of prompt-only runs stay what they were)
            item.append([r.env.kind, dict(r.env.args)])
        h.update(json.dumps(item, sort_keys=True).encode())
    return h.hexdigest()


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    import json

    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train(cfg: Config, run_dir: str | Path | None, **kwargs) -> TrainResult:
    """Build a ``Trainer`` and run it (see ``Trainer`` for the arguments; ``on_step`` goes to ``run``)."""
    on_step = kwargs.pop("on_step", None)
    return Trainer(cfg, run_dir, **kwargs).run(on_step=on_step)
