"""The configuration tree: every field a user can set, declared once with its default, documentation and
allowed values. This is the page to read to know what a setting does; ``opdkit.config.loader`` turns YAML
files and ``a.b=value`` overrides into these frozen dataclasses and validates them from this metadata.

Only the standard library is imported here.
"""

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Config",
    "DataConfig",
    "EnvConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RolloutConfig",
    "RunConfig",
    "TeacherConfig",
]


def _f(default: Any, doc: str, *, choices=None, ge=None, gt=None, le=None, lt=None, length=None) -> Any:
    """Declare a field: its default, its one documentation string, and what values are allowed.

    Bounds (``ge``: >=, ``gt``: >, ``le``: <=, ``lt``: <) apply to each item of a list field and are
    skipped for ``None``; ``length`` fixes a list's length.
    """
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "length": length}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_DTYPES = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class ModelConfig:
    """The student, the model being trained."""

    path: str | None = _f(None, "student model directory (a Hugging Face causal LM)")
    dtype: str = _f(
        "float32",
        "dtype the student is loaded in; auto = the checkpoint's own. Trainable weights are always kept in "
        "float32 (master weights); frozen ones (a LoRA base) stay in this dtype",
        choices=_DTYPES,
    )
    trust_remote_code: bool = _f(False, "run modelling code shipped in the model directory; only if you trust it")
    chat_template: str = _f(
        "model",
        "how prompts are rendered: model = the tokenizer's own chat template; none = no template, the messages' "
        "text joined by blank lines (base models); or the path of a Jinja template file",
    )
    logits_chunk_size: int = _f(
        256,
        "student positions per chunk wherever full-vocabulary logits are formed (student pass, dense losses, "
        "full reverse KL): memory O(chunk x vocab), recomputed in the backward pass",
        ge=1,
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    lora_r: int = _f(0, "LoRA rank; 0 = full fine-tuning", ge=0)
    lora_alpha: float = _f(16.0, "LoRA scale numerator (updates are scaled by lora_alpha / lora_r)", gt=0)
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch input", ge=0, lt=1)
    lora_target_modules: list[str] = _f([], "module names to adapt; empty = peft's default for the architecture")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher that scores the student's samples: a local model (path) or a remote server (url)."""

    path: str | None = _f(None, "teacher model directory (a Hugging Face causal LM); or set url")
    dtype: str = _f(
        "run",
        "weights dtype of the teacher (it is never trained): run = the run's compute precision (bfloat16 when "
        "run.precision resolves to bf16, i.e. on a CUDA GPU that supports it; float32 on a CPU, where bf16 is "
        "several times slower); auto = the checkpoint's own",
        choices=("run",) + _DTYPES,
    )
    trust_remote_code: bool = _f(False, "run modelling code shipped in the model directory; only if you trust it")
    url: str | None = _f(
        None,
        "address of a remote teacher instead of path: an `opdkit serve-teacher` server (http://HOST:PORT) or a "
        "vLLM OpenAI-compatible server (teacher.api=openai); several servers of one teacher, comma-separated: "
        "process r of a multi-process run uses the (r mod n)-th",
    )
    api: str = _f(
        "auto",
        "the protocol of teacher.url: opdkit (opdkit serve-teacher), openai (vLLM's /v1/completions with "
        "prompt_logprobs), auto = ask the server",
        choices=("auto", "opdkit", "openai"),
    )
    token_file: str | None = _f(None, "a file holding the bearer token the teacher server requires (teacher.url)")
    timeout_s: float = _f(300.0, "time limit of one request to the teacher server, seconds (teacher.url)", gt=0)
    retries: int = _f(
        8, "tries after the first when the teacher server is unreachable or busy, with exponential back-off "
        "from 0.5 s (at most 30 s apart), so a run rides through a server restart (teacher.url)", ge=0
    )
    served_model: str | None = _f(
        None, "the model name to ask a vLLM server for (teacher.api=openai; default: the one it serves)"
    )
    tokenizer_path: str | None = _f(
        None,
        "a local copy of the remote teacher's tokenizer, for the pre-flight check (teacher.api=openai; default: "
        "the student's, verified against the server's /tokenize)",
    )
    chunk_size: int = _f(256, "response positions scored per chunk; bounds memory to O(chunk_size x vocab)", ge=1)
    per_task: list[str] = _f(
        [],
        "a teacher per task, as TASK=DIRECTORY (a local model; tasks not listed use teacher.path). Teachers named "
        "twice are loaded once. Each must pass the pre-flight check against the student",
    )
    own_chat_template: bool = _f(
        False,
        "score the student's responses after the prompt rendered with the teacher's own chat template, not the "
        "student's (needs a shared vocabulary and a teacher tokenizer with a chat template)",
    )


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling the student's responses."""

    temperature: float = _f(1.0, "sampling temperature", gt=0)
    top_p: float = _f(
        0.9, "nucleus sampling: keep the smallest token set with this much probability (inside the top-k set "
        "when top_k is on); 1 = off", gt=0, le=1
    )
    top_k: int = _f(0, "sample only among the k most likely tokens (all tokens tied with the k-th kept); 0 = off",
                    ge=0)
    max_new_tokens: int = _f(512, "maximum response length in tokens", ge=1)
    n_samples: int = _f(8, "responses sampled per prompt", ge=1)
    stop: list[str] = _f([], "strings that end a response, besides the end-of-sequence token")
    stop_ids: list[int] = _f([], "token ids that end a response, besides the end-of-sequence token", ge=0)
    seed: int = _f(
        0,
        "sampling seed: each response's seed is a function of (rollout.seed, step, prompt position, sample "
        "index), so a run samples the same responses on any number of processes",
        ge=0,
    )
    old_logprobs: str = _f(
        "auto",
        "where pi_old comes from: sampler (the log-probs recorded while sampling: no second student pass), "
        "recompute (a teacher-forced pass of the student), or auto (sampler when run.precision resolves to fp32, "
        "the support is not the student's own top-K and rollout.engine=hf, else recompute). In fp32 both agree "
        "to float rounding",
        choices=("auto", "sampler", "recompute"),
    )
    engine: str = _f(
        "hf", "generation engine: hf (Hugging Face generate, the trainer's own module) or vllm (an in-process vLLM "
        "engine per process, pip install 'opdkit[vllm]'; weights synced before each rollout, pi_old recomputed)",
        choices=("hf", "vllm")
    )
    vllm_kv_cache_gb: float = _f(4.0, "GiB of KV cache for the vLLM engine (rollout.engine=vllm)", gt=0)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The distillation loss (METHOD.md)."""

    kind: str = _f(
        "support_kl",
        "support_kl: divergence on a support set per position (the paper's method); "
        "sampled_token: policy gradient on the per-token reward log q - log pi; "
        "full_reverse_kl: exact reverse KL over the whole vocabulary",
        choices=("support_kl", "sampled_token", "full_reverse_kl"),
    )
    support: str = _f(
        "teacher_topk",
        "which tokens form the support set of a position",
        choices=("teacher_topk", "student_topk", "teacher_topk_plus_sampled", "teacher_topp"),
    )
    top_k: int = _f(32, "support set size K (teacher_topp: the most ids a position may have, K_max)", ge=1)
    support_top_p: float = _f(
        0.9,
        "teacher_topp: a position's support is the fewest of the teacher's most likely ids whose probability "
        "reaches this (at least support_min_k, at most top_k ids)", gt=0, le=1)
    support_min_k: int = _f(
        2, "teacher_topp: the fewest ids a position's support may have (>= 2 when renormalised: the KL of a "
        "renormalised one-id support is 0, so such a position teaches nothing)", ge=1)
    renormalize: bool = _f(True, "renormalise both distributions inside the support (the paper's stable form)")
    divergence: str = _f(
        "reverse_kl", "divergence computed on the support", choices=("reverse_kl", "forward_kl", "jsd")
    )
    jsd_beta: float = _f(0.5, "generalized JSD weight when divergence=jsd: 0 = forward KL, 1 = reverse KL", ge=0, le=1)
    tail_bucket: bool = _f(False, "add one slot holding the probability outside the support (needs renormalize=false)")
    gamma: float = _f(0.0, "sampled_token: discount of future rewards; 0 = token-level, 1 = sequence-level", ge=0, le=1)
    reward_clip: float | None = _f(None, "sampled_token: clip per-token rewards to [-c, c]; null = no clip", gt=0)
    ppo_clip_eps: float = _f(0.2, "sampled_token: PPO clip range of the ratio pi / pi_old", gt=0)
    topp_correction: str = _f(
        "none",
        "sampled_token with truncated rollouts (rollout.top_p < 1 or rollout.top_k > 0): importance weights for "
        "rollouts drawn from the truncated student; token = each token's loss times the mass Z_t = pi / pi_p of "
        "the set it was drawn from; sequence = every token times min(prod_t Z_t, topp_correction_clip), the "
        "product over every sampled token (special tokens masked from the loss included); none = the paper's "
        "estimator",
        choices=("none", "token", "sequence"),
    )
    topp_correction_clip: float = _f(
        1.0, "sampled_token, topp_correction=sequence: the weight's upper bound, in (0, 1] (prod_t Z_t is at most 1, "
        "so 1 = no clip)", gt=0, le=1)
    aggregation: str = _f(
        "token-mean",
        "how per-token losses are reduced to one number",
        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    )
    special_tokens: list[str | int] | None = _f(
        None,
        "tokens masked out of the loss where the student samples them: each one token of the student's "
        "vocabulary, as text ('<|im_end|>', 'think') or as an id; null = the student's EOS and chat-template "
        "tokens; [] = none",
    )
    special_token_mode: str = _f(
        "first", "mask the first occurrence of each special id per response, or all", choices=("first", "all")
    )
    drop_special_from_support: bool = _f(False, "also remove the special token ids from support sets")
    loss_coef: float = _f(1.0, "multiplier on the loss", gt=0)
    fused: bool = _f(True, "compute the support KL from hidden states without forming full-vocabulary logits")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, its schedule, and how a rollout batch is cut into optimizer steps."""

    lr: float = _f(2e-6, "learning rate", ge=0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", ge=0, lt=1, length=2)
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay", ge=0)
    eps: float = _f(1e-8, "AdamW epsilon (added to the root of the second moment)", gt=0)
    grad_clip: float | None = _f(1.0, "clip the global gradient norm to this; null = no clip", gt=0)
    schedule: str = _f("constant", "learning-rate schedule after warmup", choices=("constant", "cosine"))
    warmup_steps: int = _f(
        0, "training steps (rollout batches) of linear warm-up from 0 (x mini_batches optimizer steps), at most "
        "total_steps",
        ge=0,
    )
    total_steps: int = _f(100, "training steps, one rollout batch each", ge=1)
    prompts_per_step: int = _f(
        16, "prompts per training step; the rollout batch is prompts_per_step x rollout.n_samples responses", ge=1
    )
    mini_batches: int = _f(2, "optimizer steps per rollout batch (it is split into this many mini-batches)", ge=1)
    micro_batch_size: int = _f(8, "sequences per forward/backward pass; gradients accumulate over a mini-batch", ge=1)
    max_skipped_steps: int = _f(5, "consecutive steps with a non-finite gradient norm skipped before aborting", ge=1)


@dataclass(frozen=True)
class DataConfig:
    """Where the prompts come from."""

    train_path: str | list[str] | None = _f(
        None,
        "training data: a JSONL file of prompts or environments (a line with \"env\": see `opdkit envs --help`), "
        "textworld:DIR (every game in DIR), alfworld:SPLIT (ALFWorld's games; env.alfworld_data or ALFWORLD_DATA), "
        "each optionally as TASK=SOURCE, or a list of them (multi-task: one task per source unless lines name theirs)",
    )
    eval_path: str | list[str] | None = _f(
        None, "evaluation benchmark(s): a file (JSONL, JSON or Parquet: the training format or a public benchmark's "
        "columns, see `opdkit eval --help`), NAME=FILE, a built-in (demo, rg:TASK), or a list of them; null = none"
    )
    prompt_key: str = _f("prompt", "JSON field holding the prompt")
    answer_key: str = _f("answer", "JSON field holding the reference answer")
    max_prompt_tokens: int = _f(1024, "longest prompt in tokens, after the chat template (see prompt_overflow)", ge=1)
    prompt_overflow: str = _f(
        "error",
        "a prompt longer than max_prompt_tokens: error (names its file and line), skip (dropped, counted in a "
        "warning), or truncate_left (its last max_prompt_tokens tokens are kept; prompt_truncated_frac in metrics)",
        choices=("error", "skip", "truncate_left"),
    )
    shuffle: bool = _f(True, "shuffle the training prompts")
    task_sampling: str = _f(
        "round_robin",
        "with several tasks: which task each training step's batch comes from: round_robin (the tasks in turn, "
        "as the paper alternates ALFWorld and math batches), weighted (drawn by data.task_weights, seeded), or "
        "mixed (batches drawn from all tasks' prompts pooled; tasks must all be prompts, or all environments)",
        choices=("round_robin", "weighted", "mixed"),
    )
    task_weights: list[str] = _f(
        [], "data.task_sampling=weighted: TASK=WEIGHT for every task (weights > 0, relative)"
    )


@dataclass(frozen=True)
class EnvConfig:
    """Multi-turn environments (TextWorld, ALFWorld, ...): how the student plays an episode."""

    max_turns: int = _f(20, "actions per episode; an episode still going after them ends unsuccessful", ge=1)
    max_turn_tokens: int = _f(64, "tokens the student may write per turn", ge=1)
    max_episode_tokens: int = _f(
        4096, "tokens per episode, prompt and observations included; an episode that would pass it ends", ge=2
    )
    admissible_commands: bool = _f(
        False, "list the commands the game accepts in every observation (TextWorld and ALFWorld give them)"
    )
    system_prompt: str = _f(
        "You are playing a text adventure game. Read the observation and reply with exactly one command.",
        "the system message of every episode; empty = none",
    )
    processes: int = _f(
        2, "worker processes stepping the environments in parallel; 0 = in the training process, without time "
        "limits (debugging)", ge=0
    )
    step_timeout_s: float = _f(
        60.0, "time limit of one environment reset or step; an environment over it (or one that raises) ends its "
        "episode as a recorded failure, and the batch goes on", gt=0
    )
    alfworld_data: str | None = _f(None, "ALFWorld's data folder (default: the ALFWORLD_DATA environment variable)")


@dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation on data.eval_path: sampled answers graded against the reference (avg@n)."""

    every_steps: int = _f(
        0, "evaluate every this many steps; 0 = only at the end (never without data.eval_path)", ge=0
    )
    at_start: bool = _f(False, "also evaluate before the first step (logged as step 0: the curve's starting point)")
    n_samples: int = _f(1, "responses per problem; the score is their mean (avg@n)", ge=1)
    temperature: float = _f(1.0, "sampling temperature", gt=0)
    top_p: float = _f(0.9, "nucleus sampling threshold; 1 = off", gt=0, le=1)
    greedy: bool = _f(False, "greedy decoding (the most likely token at every step) instead of sampling; n_samples 1")
    max_new_tokens: int = _f(512, "maximum response length in tokens", ge=1)
    max_problems: int = _f(0, "evaluate at most this many problems of each benchmark (the first ones); 0 = all", ge=0)
    batch_size: int = _f(64, "responses generated per call during evaluation", ge=1)
    answer_fallbacks: list[str] = _f(
        [], "when a response has no \\boxed{} answer, try these in order: answer_is ('The answer is X'), "
        "answer_colon ('Answer: X'), hash ('#### X'), last_number; empty = boxed answers only (the paper's rule)",
        choices=("answer_is", "answer_colon", "hash", "last_number"),
    )
    prompt_template: str = _f(
        "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
        "how a benchmark problem becomes the user message ({problem} is replaced; literal braces doubled); not "
        "applied to a file's 'prompt' column, which is used as it is",
    )
    grading_processes: int = _f(2, "worker processes grading math answers; 0 = grade in the training process", ge=0)
    grading_timeout_s: float = _f(5.0, "time limit of one grade in seconds; an answer over it counts as wrong", gt=0)


@dataclass(frozen=True)
class RunConfig:
    """Bookkeeping: output directory, seeds, checkpoints, logging, device."""

    out_dir: str | None = _f(
        None, "run directory (new or empty; paths are relative to the working directory, ~ expanded); null = a "
        "new directory under runs/"
    )
    seed: int = _f(0, "seed of the data order and of the mini-batch split", ge=0)
    save_every: int = _f(50, "checkpoint every this many steps; 0 = only at the end", ge=0)
    keep_last: int = _f(2, "checkpoints kept on disk", ge=1)
    log_every: int = _f(1, "log metrics every this many steps (the last step is always logged)", ge=1)
    tensorboard: bool = _f(True, "also write TensorBoard event files")
    overwrite: bool = _f(
        False,
        "start again in an out_dir that opdkit created as a run (it has .opdkit-run): its run files are removed, "
        "any other file stays; a folder opdkit did not create is never written to",
    )
    device: str = _f(
        "auto",
        "auto = cuda when available, else cpu; cuda on a machine without CUDA is an error. Under torchrun or "
        "accelerate launch each process uses its own GPU",
        choices=("auto", "cpu", "cuda"),
    )
    threads: int = _f(
        0,
        "torch CPU threads per process; 0 = the cores this process may use (CPU affinity, cgroup quota) divided by "
        "the processes on this machine. A busy core slows a 2-thread torch 20-70x: give fewer threads on a "
        "shared machine",
        ge=0,
    )
    precision: str = _f(
        "auto",
        "compute precision of every student pass (rollout, pi_old, loss), by autocast; weights stay float32. "
        "auto = bf16 on a CUDA GPU that supports it, else fp32 (bf16 on a CPU is several times slower)",
        choices=("auto", "fp32", "bf16"),
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration, one section per stage of the pipeline."""

    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


