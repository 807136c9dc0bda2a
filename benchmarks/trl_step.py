"""TRL baseline for opdkit's step benchmark: seconds per optimizer step of TRL's DistillationTrainer.

Run with the separate TRL environment (see benchmarks/trl_env.sh), never with opdkit's venv:

    bash benchmarks/trl_env.sh
    .venv-trl/bin/python benchmarks/trl_step.py --student S --teacher T --steps 8 --json out.json

Same setup as benchmarks/step_bench.py: 100 chat prompts "Compute {a} + {b} and explain.", 8 prompts x 1 sample
per step, fully on-policy (the student samples every step), temperature 1, top-p 0.9, 64 new tokens, full-vocabulary
reverse KL (beta=1), lr 1e-5, fp32, CPU, 2 torch threads, no eval, no saving, no logging service.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

THREADS = 2
torch.set_num_threads(THREADS)

import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

try:  # TRL 1.16 has DistillationTrainer in the stable API (trl/trainer/distillation_trainer.py)
    from trl import DistillationConfig, DistillationTrainer
except ImportError as e:  # pragma: no cover - this script targets trl==1.16.0
    raise SystemExit(f"trl {trl.__version__} has no DistillationTrainer: {e}") from e

PROMPTS = [[{"role": "user", "content": f"Compute {a} + {b} and explain."}] for a in range(10) for b in range(10)]


class TimedDistillationTrainer(DistillationTrainer):
    """Adds per-step timing of generation (student sampling + padding); everything else is TRL's code."""

    gen_s: list[float]

    def _generate_and_score_completions(self, inputs):
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.gen_s.append(time.perf_counter() - t0)
        return out


class StepTimer(TrainerCallback):
    """Wall clock of every optimizer step: on_step_begin -> on_step_end (generation, student + teacher forward,
    chunked KL, backward, grad clip, AdamW step, scheduler, zero_grad). `optim_s` is on_pre_optimizer_step ->
    on_step_end (AdamW + scheduler + zero_grad; grad clipping is before on_pre_optimizer_step, so it counts in the
    loss part)."""

    def __init__(self):
        self.step_s, self.optim_s, self.cpu_s, self.threads, self.completion_len = [], [], [], [], []
        self.trainer = None
        self.steal_s = []
        self._t0 = self._t1 = self._c0 = self._s0 = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self.threads.append(torch.get_num_threads())
        self._c0 = time.process_time()
        self._s0 = _steal_s()
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self._t1 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        t = time.perf_counter()
        self.step_s.append(t - self._t0)
        self.optim_s.append(t - self._t1)
        # process CPU seconds (all threads): ~2x step_s when both threads are busy and nothing else competes
        self.cpu_s.append(time.process_time() - self._c0)
        self.steal_s.append(_steal_s() - self._s0)
        lens = self.trainer._metrics["train"].get("completions/mean_length") if self.trainer else None
        self.completion_len.append(lens[-1] if lens else None)


def _steal_s() -> float:
    """Machine-wide CPU time stolen by the hypervisor so far (the 'steal' column of /proc/stat), in seconds."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def record_logits_processors(model, sink: list):
    """Wrap model._get_logits_processor once to record the sampling warpers generate() really applies."""
    orig = model._get_logits_processor

    def wrapped(*a, **k):
        procs = orig(*a, **k)
        if not sink:
            for p in procs:
                names = ("top_p", "top_k", "temperature", "min_p")
                fields = [f"{n}={getattr(p, n)}" for n in names if hasattr(p, n)]
                sink.append(f"{type(p).__name__}({', '.join(fields)})")
        return procs

    model._get_logits_processor = wrapped


def median_from3(xs: list[float]) -> float | None:
    return statistics.median(xs[2:]) if len(xs) > 2 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, type=Path)
    ap.add_argument("--teacher", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="TRL's own default (DistillationConfig defaults to True); off by default here, like opdkit",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # Load both models ourselves in fp32 so the dtype and the teacher are exactly what was asked for.
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.student, padding_side="left", truncation_side="left")
    # TRL ends a completion at every eos the *model* declares; make sure nothing else (e.g. a generation_config
    # max_length or min_length inherited from the model dir) can cut generation short.
    for m in (student, teacher):
        m.generation_config.max_length = None

    gen_processors: list[str] = []
    record_logits_processors(student, gen_processors)

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = DistillationConfig(
            output_dir=out_dir,
            # batch: 8 prompts x 1 sample, one optimizer step per generation (fully on-policy, no reuse)
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            # objective: generalized JSD with beta=1 == reverse KL(student || teacher) over the full vocabulary
            beta=1.0,
            temperature=1.0,
            # generation: pure top-p 0.9 sampling, 64 new tokens
            top_p=0.9,
            top_k=0,
            min_p=None,
            repetition_penalty=1.0,
            max_completion_length=64,
            use_vllm=False,
            # optimiser: AdamW lr 1e-5 (TRL/transformers defaults otherwise: linear decay, no warmup, clip 1.0)
            learning_rate=1e-5,
            # precision / device
            bf16=False,
            fp16=False,
            use_cpu=True,
            gradient_checkpointing=args.gradient_checkpointing,
            # no eval, no saving, no logging service
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            log_completions=False,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        timer = StepTimer()
        trainer = TimedDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=cfg,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tok,
            callbacks=[timer],
        )
        trainer.gen_s = []
        timer.trainer = trainer
        assert trainer.teacher_model is teacher or trainer.accelerator.unwrap_model(trainer.teacher_model) is teacher
        torch.set_num_threads(THREADS)  # in case anything above touched it
        trainer.train()

    gen_s = trainer.gen_s[: len(timer.step_s)]
    loss_s = [s - g - o for s, g, o in zip(timer.step_s, gen_s, timer.optim_s, strict=True)]
    clean = [w for c, w in list(zip(timer.cpu_s, timer.step_s))[2:] if c / w >= 1.6]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "trainer": "trl.DistillationTrainer",
        "vocab_size": student.config.vocab_size,
        "student": str(args.student),
        "teacher": str(args.teacher),
        "teacher_hidden_size": teacher.config.hidden_size,
        "student_hidden_size": student.config.hidden_size,
        "steps": args.steps,
        "torch_threads_per_step": timer.threads,
        "step_s": timer.step_s,
        "median_step_s_from_step3": median_from3(timer.step_s),
        "gen_s": gen_s,
        "median_gen_s_from_step3": median_from3(gen_s),
        "loss_s": loss_s,
        "median_loss_s_from_step3": median_from3(loss_s),
        "optim_s": timer.optim_s,
        "median_optim_s_from_step3": median_from3(timer.optim_s),
        "step_cpu_s": timer.cpu_s,
        "step_steal_s": timer.steal_s,
        # < ~1.6 means the 2 threads did not get 2 cores (another process or the hypervisor took them): rerun
        "median_cpu_over_wall_from_step3": median_from3([c / w for c, w in zip(timer.cpu_s, timer.step_s)]),
        # the same median over only the steps from step 3 whose cpu/wall >= 1.6 (steps not starved of a core)
        "median_step_s_from_step3_uncontended": statistics.median(clean) if clean else None,
        "uncontended_steps_from_step3": len(clean),
        "completion_mean_length_per_step": timer.completion_len,
        "generation_logits_processors": gen_processors,
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_rss_mib": round(peak_rss_mib, 1),
        "notes": (
            "trl.DistillationTrainer (stable API in TRL 1.16; always on-policy, no lmbda), beta=1 (reverse KL), "
            "temperature 1, top_p 0.9, top_k 0, max_completion_length 64, 8 prompts x 1 sample, "
            "gradient_accumulation_steps 1, lr 1e-5 AdamW, fp32, CPU, 2 torch threads. step_s = on_step_begin -> "
            "on_step_end. gen_s = _generate_and_score_completions (HF generate with KV cache + padding); "
            "loss_s = step - gen - optim (student backbone fwd, teacher backbone fwd, chunked full-vocab KL fwd + "
            "bwd, grad clip); optim_s = AdamW + scheduler + zero_grad. The KL is exact over the full vocabulary "
            "(online logsumexp on [4096 tokens x 32768 vocab] tiles, never the whole (B,K,V) logits); with beta=1 "
            "both lm_head projections run twice (forward stats pass, backward pass); on CPU (no Triton) every "
            "(B x K) completion position is projected, padding included."
        ),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "vocab_size",
                    "median_step_s_from_step3",
                    "median_gen_s_from_step3",
                    "median_loss_s_from_step3",
                    "median_optim_s_from_step3",
                    "median_cpu_over_wall_from_step3",
                    "median_step_s_from_step3_uncontended",
                    "uncontended_steps_from_step3",
                    "completion_mean_length_per_step",
                    "peak_rss_mib",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
