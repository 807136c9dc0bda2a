"""Building the demo's tokenizer, teacher and weaker student (offline, minutes on a CPU).

What is built (all numbers live in :class:`opdkit.demo.settings.DemoSettings`):

1. a byte-level BPE tokenizer (``vocab_size`` tokens, ChatML template) trained on task dialogues and
   filler English, so that a teacher top-K support set (K = 16) is a real truncation of the vocabulary;
2. the **teacher**: a tiny Qwen2 causal LM trained by supervised fine-tuning on worked solutions of
   :mod:`opdkit.demo.task` (loss on the response tokens only, :mod:`opdkit.demo.sft`);
3. the **student**: the same architecture from another random initialisation, fine-tuned on the same
   kind of data for far fewer steps, so that it already writes well-formed responses (the
   ``<think>...</think> The answer is \\boxed{..}`` format, ending with ``<|im_end|>``) but gets few
   answers right. Its fine-tuning stops early at the first check where its sampled accuracy on held-out
   train-split problems reaches ``student.stop_at_accuracy``. On-policy distillation then improves it
   from its own samples.

Both are evaluated with METHOD.md's protocol (sampling, τ = 1.0, top-p 0.9, one sample per problem) on
eval-split problems, and the accuracies are stored with the models. Every accuracy (the early-stop checks
and the evaluations) is measured by the library's evaluator (:func:`opdkit.demo.sampling.demo_evaluator`).
:mod:`opdkit.demo.cache` decides when to build and where the result goes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from opdkit.demo.sampling import demo_evaluator, evaluate_accuracy
from opdkit.demo.settings import DemoSettings, ModelSpec
from opdkit.demo.task import Problem, TaskSpec, corpus_for_tokenizer, make_problems
from opdkit.errors import InputError

__all__ = ["build_entry"]


# Every build runs on this many torch threads with deterministic algorithms (opdkit.threads.fixed_numerics):
# a float reduction's order follows the thread count, and the tiny models' fine-tuning amplifies the last
# bits into different models (measured: 18.5% -> 76.5% and 26% -> 69% after OPD on two machines).
BUILD_THREADS = 1


def build_entry(out: Path, settings: DemoSettings, seed: int, say: Callable[[str], None]) -> dict:
    """:func:`_build` with fixed numerics (``BUILD_THREADS`` threads, deterministic algorithms): the same
    models, bit for bit, whatever the machine's core count."""
    from opdkit.threads import fixed_numerics

    with fixed_numerics(BUILD_THREADS):
        return _build(out, settings, seed, say)


def _build(out: Path, settings: DemoSettings, seed: int, say: Callable[[str], None]) -> dict:
    """Build the tokenizer, teacher and student into ``out`` (``tokenizer/``, ``teacher/``, ``student/``).

    Returns what was measured (the manifest's ``info``): the vocabulary size and number of eval problems;
    per model its eval accuracy, fine-tuning steps done, wall and CPU seconds of the fine-tuning, seconds
    of the evaluation, parameter count, mean response length, and the fractions of eval responses that
    end with EOS and that are well formed; the whole build's seconds.
    """
    from transformers.utils import logging as hf_logging

    from opdkit.demo.sft import build_examples, sft_train
    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer

    hf_logging.disable_progress_bar()  # per-save progress bars are noise in the demo's log
    t_build = time.perf_counter()
    task = settings.task
    tokenizer = train_tokenizer(corpus_for_tokenizer(settings.tokenizer_texts, seed, task), settings.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    say(f"demo: tokenizer with {len(tokenizer)} tokens")
    eval_problems = make_problems(settings.eval_problems, seed, "eval", task)
    info: dict = {"vocab_size": len(tokenizer), "eval_problems": len(eval_problems)}
    pools: dict[int, list] = {}
    for name in ("teacher", "student"):
        spec: ModelSpec = getattr(settings, name)
        if spec.train_problems not in pools:
            problems = make_problems(spec.train_problems, seed, "train", task)
            pools[spec.train_problems] = (build_examples(tokenizer, problems), {p.expression for p in problems})
        examples, seen = pools[spec.train_problems]
        model = build_tiny_model(
            tokenizer,
            arch=spec.arch,  # type: ignore[arg-type]
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            intermediate_size=spec.intermediate_size,
            seed=seed + spec.init_seed,
        )
        stop_check = None
        if spec.stop_at_accuracy > 0:
            dev = _held_out(spec.check_problems, seen, seed, task)
            stop_check = _accuracy_check(model, tokenizer, dev, settings, spec, seed, name, say)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"demo: fine-tuning the {name} ({n_params / 1e6:.2f}M parameters, {spec.sft_steps} steps)")
        t0, c0 = time.perf_counter(), time.process_time()
        with _fixed_rng(seed + spec.init_seed):
            losses = sft_train(
                model,
                examples,
                pad_id=tokenizer.pad_token_id,
                steps=spec.sft_steps,
                batch_size=spec.batch_size,
                lr=spec.lr,
                warmup=spec.warmup,
                min_lr_ratio=spec.min_lr_ratio,
                weight_decay=spec.weight_decay,
                seed=seed + spec.init_seed,
                label_smoothing=spec.label_smoothing,
                log=say,
                log_every=max(1, spec.sft_steps // 5),
                name=f"demo {name}",
                stop_check=stop_check,
                check_every=spec.check_every,
            )
        seconds = time.perf_counter() - t0
        info[f"{name}_sft_steps_done"] = len(losses)
        info[f"{name}_cpu_seconds"] = round(time.process_time() - c0, 2)  # all threads; robust to a busy machine
        save_model_dir(model, tokenizer, out / name)
        t0 = time.perf_counter()
        ev = demo_evaluator(eval_problems, max_new_tokens=settings.max_new_tokens, top_p=settings.eval_top_p,
                            temperature=settings.eval_temperature, seed=seed, batch_size=settings.eval_batch_size)
        samples = [smp for batch in ev.run(model, tokenizer, ev.all_items()) for smp in batch]
        acc = sum(smp.correct for smp in samples) / len(samples)
        eval_seconds = time.perf_counter() - t0
        info.update(
            {
                f"{name}_accuracy": acc,
                f"{name}_seconds": round(seconds, 2),
                f"{name}_eval_seconds": round(eval_seconds, 2),
                f"{name}_params": n_params,
                f"{name}_mean_response_tokens": sum(smp.tokens for smp in samples) / len(samples),
                f"{name}_finished_fraction": sum(not smp.truncated for smp in samples) / len(samples),
                f"{name}_format_fraction": sum(_well_formed(smp.response) for smp in samples) / len(samples),
            }
        )
        say(
            f"demo: {name} accuracy {acc:.1%} (sampled, top-p {settings.eval_top_p}), "
            f"{info[f'{name}_finished_fraction']:.0%} end with EOS, fine-tuned in {seconds:.0f}s"
        )
        del model
    info["build_seconds"] = round(time.perf_counter() - t_build, 2)
    return info


def _held_out(n: int, seen: set[str], seed: int, task: TaskSpec) -> list[Problem]:
    """``n`` train-split problems outside the fine-tuning pool ``seen`` (fewer if the split runs out)."""
    dev: list[Problem] = []
    draw = 2 * n
    while len(dev) < n:
        try:
            candidates = make_problems(draw, seed + 7919, "train", task)
        except InputError:
            break
        dev = [p for p in candidates if p.expression not in seen][:n]
        draw *= 2
    if not dev:
        raise InputError("student.check_problems: no train-split problems left outside the fine-tuning pool")
    return dev


def _accuracy_check(model, tokenizer, dev, settings: DemoSettings, spec: ModelSpec, seed: int, name: str, say):
    """``stop_check`` for :func:`sft_train`: True once the sampled accuracy on ``dev`` reaches the target."""

    def check(step: int) -> bool:
        acc = evaluate_accuracy(
            model,
            tokenizer,
            dev,
            max_new_tokens=settings.max_new_tokens,
            top_p=settings.eval_top_p,
            temperature=settings.eval_temperature,
            seed=seed + step,
            batch_size=settings.eval_batch_size,
        )
        say(f"demo {name}: step {step}, held-out accuracy {acc:.1%} (stops at {spec.stop_at_accuracy:.0%})")
        return acc >= spec.stop_at_accuracy

    return check


def _well_formed(text: str) -> bool:
    return text.startswith("<think>") and "</think> The answer is \\boxed{" in text and text.endswith("}.")


@contextlib.contextmanager
def _fixed_rng(seed: int):
    """Run with torch's global RNG seeded, restoring the caller's state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
