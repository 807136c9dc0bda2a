"""The numbers that decide the demo's tokenizer and models: :class:`ModelSpec` and :class:`DemoSettings`.

Every field enters the cache key (:mod:`opdkit.demo.cache`), so changing one builds a new cache entry.
Only the standard library and :mod:`opdkit.demo.task` are imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

from opdkit.demo.task import DEFAULT_TASK, TaskSpec
from opdkit.errors import InputError

__all__ = ["ModelSpec", "DemoSettings"]


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and supervised fine-tuning of one demo model.

    Attributes:
        arch: ``"qwen2"`` or ``"llama"``.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the transformer's shape.
        sft_steps: AdamW steps of supervised fine-tuning.
        batch_size: examples per step.
        lr: peak learning rate (linear warmup over ``warmup`` steps, then cosine to ``min_lr_ratio * lr``).
        warmup: warmup steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay on matrices (not on norms).
        train_problems: size of the pool of training problems (drawn from the task's train split).
        init_seed: offset added to the demo seed for the random initialisation and the data order.
        stop_at_accuracy: if > 0, stop fine-tuning early, at the first check where the sampled accuracy
            (METHOD.md's protocol) on ``check_problems`` held-out train-split problems reaches this value;
            this pins a weak student near a target accuracy whatever the machine's numerics.
        check_every: steps between two such checks.
        check_problems: problems per check.
        label_smoothing: cross-entropy label smoothing of the fine-tuning.
    """

    arch: str = "qwen2"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    sft_steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    train_problems: int = 6000
    init_seed: int = 0
    stop_at_accuracy: float = 0.0
    label_smoothing: float = 0.0
    check_every: int = 50
    check_problems: int = 100


@dataclass(frozen=True)
class DemoSettings:
    """Every number that decides the demo's tokenizer and models (all enter the cache key).

    Attributes:
        task: the problems' difficulty (:class:`opdkit.demo.task.TaskSpec`).
        vocab_size: BPE vocabulary size, special tokens included.
        tokenizer_texts: number of texts the tokenizer is trained on (half task, half filler).
        teacher: the teacher's architecture and (long) fine-tuning: 2000 steps of 32 with a cosine
            schedule (about 2.5 minutes of one CPU core; 99% sampled accuracy when measured).
        student: the same architecture from another initialisation, fine-tuned at a constant learning
            rate until its held-out sampled accuracy first reaches 15% (a few hundred steps): it writes
            the format and ends with EOS but gets most answers wrong. Its fine-tuning uses label
            smoothing 0.1: a student that is confidently wrong (entropy ~0.1 nats/token) gives the
            reverse KL almost no gradient (it vanishes with the student's probability of the teacher's
            token), and OPD then barely moves it (measured: 14.5% -> 24.5% in 60 steps without
            smoothing; 18.5% -> 47% in 100 steps with it).
        eval_problems: eval-split problems used to measure both accuracies.
        max_new_tokens: response budget when sampling (a solution is about 36 tokens with EOS).
        eval_top_p, eval_temperature: sampling used for the measured accuracies (METHOD.md's protocol).
        eval_batch_size: prompts per call of the sampler.
    """

    task: TaskSpec = DEFAULT_TASK
    vocab_size: int = 512
    tokenizer_texts: int = 4000
    teacher: ModelSpec = ModelSpec()
    student: ModelSpec = ModelSpec(
        sft_steps=1500,
        lr=3e-3,
        warmup=30,
        min_lr_ratio=1.0,
        init_seed=1,
        stop_at_accuracy=0.15,
        label_smoothing=0.1,
        check_every=25,
        check_problems=200,
    )
    eval_problems: int = 200
    max_new_tokens: int = 48
    eval_top_p: float = 0.9
    eval_temperature: float = 1.0
    eval_batch_size: int = 100

    def __post_init__(self):
        for name in ("teacher", "student"):
            spec = getattr(self, name)
            if spec.arch not in ("qwen2", "llama"):
                raise InputError(f"{name}.arch: expected 'qwen2' or 'llama', got {spec.arch!r}")
            if spec.sft_steps < 0 or spec.batch_size < 1 or spec.train_problems < 1:
                raise InputError(f"{name}: expected sft_steps >= 0, batch_size >= 1 and train_problems >= 1")
        if self.vocab_size < 300:
            raise InputError(f"vocab_size: expected >= 300 (so that top-K is a real truncation), got {self.vocab_size}")
        if self.eval_problems < 1 or self.max_new_tokens < 1:
            raise InputError("eval_problems and max_new_tokens: expected >= 1")
