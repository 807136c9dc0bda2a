"""Config -> the components of a run: process group, precision, student, teacher, objective, sampler,
evaluator, optimizer, schedule and run directory. Each seam is built by its one factory.

Order matters for a user: every setting that is refused, every file that is missing and every model that
cannot be loaded fails here, *before* the run directory is created or emptied; only then does the main
process write ``config.yaml`` (see ``opdkit.train.run_dir``).

The student is wrapped in :class:`StudentModule` and handed to ``accelerator.prepare``: every student pass
(sampling, the π_old pass, the loss) runs inside that module's forward, so that DDP prepares its gradient
averaging and FSDP gathers its parameters. Buffers are not broadcast on each forward
(``broadcast_buffers=False``): the student's buffers (rotary frequencies) never change, and processes run
different numbers of forward passes (their micro-batches and responses differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdkit.config import Config
from opdkit.errors import OpdkitError
from opdkit.train.dist import Dist
from opdkit.train.precision import Precision, resolve_precision, upcast_trainable

__all__ = ["Components", "StudentModule", "build_components"]


class StudentModule(torch.nn.Module):
    """The student as ``accelerate`` sees it: ``module(fn, *args, **kw)`` runs ``fn(self.lm, *args, **kw)``
    inside this module's forward, where a DDP or FSDP wrapper does its work."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        from opdkit.modeling import causal_lm

        # FSDP's auto-wrap policy reads the transformer layer classes from here.
        self._no_split_modules = getattr(causal_lm(lm), "_no_split_modules", None)

    def forward(self, fn, *args, **kwargs):
        return fn(self.lm, *args, **kwargs)


def _generate(lm, **kwargs):
    return lm.generate(**kwargs)


@dataclass
class Components:
    """Everything one run needs (built by :func:`build_components`)."""

    cfg: Config
    run_dir: Path
    accelerator: Any
    dist: Dist
    precision: Precision
    tokenizer: Any
    module: Any  # the prepared StudentModule (DDP/FSDP wrapped under several processes)
    lm: Any  # the student causal LM inside it (a peft model with LoRA)
    optimizer: Any
    scheduler: Any
    sampler: Any
    teacher: Any
    objective: Any
    evaluator: Any
    special_ids: list[int]
    prompts: list
    head_description: str
    identity: dict  # digests of the student and teacher directories and of the chat template, checked on resume
    load_dtype: torch.dtype = torch.float32  # the dtype the student was loaded in: the exported model's
    pi_old_from_sampler: bool = False  # rollout.old_logprobs resolved: no second student pass
    schedule: Any = None  # opdkit.train.tasks.TaskSchedule: which records each step takes
    teachers: dict = field(default_factory=dict)  # task -> its own teacher (teacher.per_task); others: teacher
    env_pool: Any = None  # opdkit.envs.pool.EnvPool when the training data holds environments
    env_template: Any = None  # opdkit.envs.base.PromptTemplate of the episodes
    episode_settings: Any = None  # opdkit.envs.episodes.EpisodeSettings
    # Called with the trainable parameters after each mini-batch's backward, before clipping (a measurement
    # hook: opdkit.experiments reads each batch's gradient there, and clears it so that nothing is updated).
    grad_probe: Any = None


def _pi_old_from_sampler(cfg: Config, precision: Precision, objective) -> bool:
    """``rollout.old_logprobs`` resolved. The sampler's log-probs equal a teacher-forced pass's only when both
    run in float32 (generate's logits are float32 either way, a bf16 pass is not), and it records no top-K."""
    setting = cfg.rollout.old_logprobs
    why = ("rollout.engine=vllm records only the truncated log-prob it sampled with"
           if cfg.rollout.engine == "vllm" else
           "run.precision resolves to bf16 (the training passes would differ from generate's float32 logits)"
           if precision.name != "fp32" else
           "objective.support=student_topk needs the student's own top-K, which only the student pass gives"
           if objective.student_topk else None)
    if setting == "sampler" and why:
        raise OpdkitError(f"rollout.old_logprobs=sampler: not possible here, {why}; use auto or recompute")
    return setting == "sampler" or (setting == "auto" and why is None)


def _device_settings(cfg: Config) -> bool:
    """Whether to run on CUDA; a request that cannot be honoured is an error."""
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise OpdkitError("run.device: 'cuda' was asked for, but this machine has no usable CUDA GPU "
                          "(torch.cuda.is_available() is False); use run.device=cpu or auto")
    return cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())


PATH_KEYS = ("model.path", "teacher.path", "teacher.token_file", "teacher.tokenizer_path", "data.train_path",
             "data.eval_path", "env.alfworld_data", "teacher.per_task", "run.out_dir")


def resolve_paths(cfg: Config) -> Config:
    """``cfg`` with its paths absolute (relative to the working directory) and ``~`` expanded; so is
    ``model.chat_template`` when it names a file."""
    from opdkit.config import apply_overrides

    fix = {}
    for key in PATH_KEYS + ("model.chat_template",):
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or (key == "model.chat_template" and value in ("model", "none")):
            continue
        if key in ("data.eval_path", "data.train_path", "teacher.per_task"):
            specs = value if isinstance(value, list) else [value]
            fixed = [{"data.eval_path": _absolute_benchmark, "data.train_path": _absolute_source,
                      "teacher.per_task": _absolute_source}[key](v) for v in specs]
            if fixed != specs:
                fix[key] = fixed if isinstance(value, list) else fixed[0]
            continue
        absolute = os.path.abspath(os.path.expanduser(value))
        if absolute != value:
            fix[key] = absolute
    return apply_overrides(cfg, fix) if fix else cfg


def _absolute_source(spec: str) -> str:
    """A ``[TASK=]SOURCE`` training source (or ``TASK=DIR`` teacher) with its file or folder made absolute."""
    from opdkit.data.sources import split_task_name

    task, source = split_task_name(spec)
    if source.startswith("alfworld:"):
        return spec
    prefix = "textworld:" if source.startswith("textworld:") else ""
    absolute = prefix + os.path.abspath(os.path.expanduser(source[len(prefix):]))
    return f"{task}={absolute}" if task is not None else absolute


def _absolute_benchmark(spec: str) -> str:
    """A benchmark spec with its file made absolute (built-ins and datasets by name stay as they are)."""
    from opdkit.eval.benchmarks import parse_benchmark_spec

    try:
        name, source = parse_benchmark_spec(spec)
    except OpdkitError as exc:
        raise OpdkitError(f"data.eval_path: {exc}") from None
    if source == "demo" or source.startswith(("rg:", "hf:", "alfworld:")):
        return spec
    if source.startswith("textworld:"):
        absolute = "textworld:" + os.path.abspath(os.path.expanduser(source[len("textworld:"):]))
        return f"{name}={absolute}" if "=" in spec else absolute
    absolute = os.path.abspath(os.path.expanduser(source))
    return f"{name}={absolute}" if "=" in spec else absolute


def refuse_unsupported(cfg: Config) -> None:
    """Combinations that are not supported (yet): refused before anything is loaded."""
    if cfg.rollout.engine == "vllm":
        if cfg.model.lora_r > 0:
            raise OpdkitError("rollout.engine=vllm with model.lora_r > 0 is not supported yet (the engine would "
                              "need the adapters merged at every sync); use rollout.engine=hf")
        if cfg.rollout.old_logprobs == "sampler":
            raise OpdkitError("rollout.old_logprobs=sampler with rollout.engine=vllm: vLLM records the truncated "
                              "log-prob it sampled with, not the untruncated pi_old; use auto or recompute")
    if cfg.model.path is None or (cfg.teacher.path is None and cfg.teacher.url is None):
        raise OpdkitError("model.path and teacher.path (or teacher.url) must be set to train")


@contextlib.contextmanager
def _naming(key: str):
    """Prefix a model-loading error with the config key that named the directory."""
    from opdkit.hf import ModelLoadError

    try:
        yield
    except ModelLoadError as exc:
        raise ModelLoadError(f"{key}: {exc}") from None


def _check_batch_shape(cfg: Config, world: int) -> None:
    B = cfg.optim.prompts_per_step * cfg.rollout.n_samples
    per_mini = B // cfg.optim.mini_batches
    if per_mini < world:
        raise OpdkitError(
            f"optim.prompts_per_step x rollout.n_samples = {B} responses per step, cut into optim.mini_batches = "
            f"{cfg.optim.mini_batches}, leaves {per_mini} per optimizer step: fewer than the {world} processes "
            "(each process needs at least one response of every mini-batch)"
        )


def _wrap_lora(model, cfg: Config):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise OpdkitError("model.lora_r > 0 needs peft: pip install 'opdkit[lora]' (or pip install peft)") from exc
    m = cfg.model
    lora = LoraConfig(
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules=list(m.lora_target_modules) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise OpdkitError(f"model.lora_target_modules: {exc}") from None


def _load_prompts(cfg: Config, prompts):
    from opdkit.data import PromptRecord
    from opdkit.data.sources import load_sources
    from opdkit.envs.data import env_defaults

    if prompts is None:
        if cfg.data.train_path is None:
            raise OpdkitError("data.train_path must be set (or prompts passed in) to train")
        prompts = load_sources(cfg.data.train_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
                               env_defaults=env_defaults(cfg.env), alfworld_data=cfg.env.alfworld_data)
    records = [p if isinstance(p, PromptRecord) else PromptRecord(tuple(p)) for p in prompts]
    if not records:
        raise OpdkitError("no training prompts")
    return records


def eval_settings(cfg: Config):
    """The evaluator's settings from ``cfg.eval`` (and the run's seed)."""
    from opdkit.eval import EvalSettings

    e = cfg.eval
    return EvalSettings(n_samples=e.n_samples, temperature=e.temperature, top_p=e.top_p, greedy=e.greedy,
                        max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=cfg.run.seed,
                        fallbacks=tuple(e.answer_fallbacks), grading_processes=e.grading_processes,
                        grading_timeout_s=e.grading_timeout_s)


def eval_benchmarks(cfg: Config) -> list:
    """The benchmarks of ``data.eval_path`` (one spec or a list), loaded with the ``eval.*`` settings."""
    from opdkit.eval.benchmarks import load_benchmarks

    specs = cfg.data.eval_path if isinstance(cfg.data.eval_path, list) else [cfg.data.eval_path]
    if not specs:
        raise OpdkitError("data.eval_path: an empty list; set null for no evaluation")
    fields = {k: v for k, v in (("prompt", cfg.data.prompt_key), ("answer", cfg.data.answer_key))
              if v != k}
    from opdkit.envs.data import env_defaults

    return load_benchmarks(specs, fields=fields, template=cfg.eval.prompt_template,
                           max_problems=cfg.eval.max_problems, env_defaults=env_defaults(cfg.env),
                           alfworld_data=cfg.env.alfworld_data)


def _build_evaluator(cfg: Config, dist: Dist, generate_fn, eval_problems):
    from opdkit.config import EvalConfig
    from opdkit.eval import SamplingEvaluator

    if eval_problems is None:
        if cfg.data.eval_path is None:
            changed = [f"eval.{k}" for k, v in vars(EvalConfig()).items() if getattr(cfg.eval, k) != v]
            if changed:
                raise OpdkitError(f"{', '.join(changed)}: set, but there is nothing to evaluate (data.eval_path is "
                                  "not set); set data.eval_path or remove them")
            return None
        eval_problems = eval_benchmarks(cfg)
    elif cfg.eval.max_problems:
        eval_problems = list(eval_problems)[: cfg.eval.max_problems]
    from opdkit.envs.base import template_from_config
    from opdkit.envs.episodes import EpisodeSettings
    from opdkit.envs.evaluate import CombinedEvaluator, EpisodeEvaluator, is_env_benchmark
    from opdkit.eval.benchmarks import Benchmark

    items = list(eval_problems)
    envs = [b for b in items if isinstance(b, Benchmark) and is_env_benchmark(b)]
    texts = [b for b in items if not (isinstance(b, Benchmark) and is_env_benchmark(b))]
    text_eval = SamplingEvaluator(texts, eval_settings(cfg), rank=dist.rank, world=dist.world, reduce_sum=dist.sum,
                                  generate_fn=generate_fn) if texts else None
    if not envs:
        return text_eval
    env_eval = EpisodeEvaluator(envs, eval_settings(cfg), template=template_from_config(cfg.env),
                                episode=EpisodeSettings.from_config(cfg.env),
                                processes=cfg.env.processes, timeout_s=cfg.env.step_timeout_s, rank=dist.rank,
                                world=dist.world, reduce_sum=dist.sum, generate_fn=generate_fn)
    return env_eval if text_eval is None else CombinedEvaluator([text_eval, env_eval])


def build_components(
    cfg: Config,
    run_dir: str | Path | None,
    *,
    prompts=None,
    eval_problems=None,
    evaluator=None,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
) -> Components:
    """Build a run from ``cfg`` (see the module docstring for the order). ``run_dir=None``: a new directory
    under ``runs/``. ``evaluator`` replaces the one ``data.eval_path`` would build."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from opdkit.check import check_pair, require_compatible
    from opdkit.data.chat import apply_chat_template_setting
    from opdkit.data.prompts import check_prompt_lengths
    from opdkit.hf import load_causal_lm, load_tokenizer, model_dir_digest
    from opdkit.modeling import context_length, output_head, verify_output_head, vocab_rows
    from opdkit.objectives import build_objective
    from opdkit.rollout import build_sampler
    from opdkit.special_tokens import resolve_special_ids
    from opdkit.teacher import build_teacher
    from opdkit.train.run_dir import check_run_dir, create_run_dir, new_run_dir
    from opdkit.train.schedule import make_scheduler

    refuse_unsupported(cfg)
    cfg = resolve_paths(cfg)  # absolute, ~ expanded: a run resumes from any working directory
    if run_dir is not None:
        run_dir = os.path.abspath(os.path.expanduser(str(run_dir)))
    cuda = _device_settings(cfg)
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="no",  # autocast is opdkit's own precision policy (opdkit.train.precision)
        step_scheduler_with_optimizer=False,  # the schedule steps once per optimizer step, on every process
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    dist = Dist(accelerator)
    from opdkit.threads import configure_threads

    configure_threads(cfg.run.threads)
    _check_batch_shape(cfg, dist.world)
    if dist.is_fsdp and cfg.model.lora_r > 0:
        raise OpdkitError("model.lora_r > 0 under FSDP is not supported yet (export would need the sharded "
                          "adapters gathered and merged); use DDP (no --use_fsdp) for LoRA")
    path = Path(dist.broadcast(str(run_dir if run_dir is not None else new_run_dir()) if dist.is_main else None))
    if dist.is_main:
        check_run_dir(path, resume=resume, overwrite=overwrite)
    dist.barrier()
    precision = resolve_precision(cfg.run.precision, accelerator.device, log=log if dist.is_main else None)
    device = accelerator.device

    records = _load_prompts(cfg, prompts)
    with _naming("model.path"):
        tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        lm = load_causal_lm(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                            device=device)
    apply_chat_template_setting(tokenizer, cfg.model.chat_template, where=f"model.path '{cfg.model.path}'")
    verify_output_head(lm)
    load_dtype = next((p.dtype for p in lm.parameters() if p.is_floating_point()), torch.float32)
    if cfg.model.gradient_checkpointing:
        enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.x; older: the alias
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora_r > 0:
        with torch.random.fork_rng(devices=[]):  # the adapters' random init: the same on every process and run
            torch.manual_seed(cfg.run.seed)
            lm = _wrap_lora(lm, cfg)
    upcast_trainable(lm)

    objective = build_objective(cfg.objective, temperature=cfg.rollout.temperature,
                                chunk_size=cfg.model.logits_chunk_size)
    special_ids = resolve_special_ids(tokenizer, cfg.objective.special_tokens)
    student_rows = vocab_rows(lm)
    if objective.request.support != "full" and cfg.objective.top_k > student_rows:
        raise OpdkitError(f"objective.top_k: {cfg.objective.top_k} is more than the student's vocabulary "
                          f"({student_rows} output rows)")
    max_pos = context_length(lm)
    if max_pos is not None and dist.is_main and cfg.rollout.max_new_tokens + cfg.data.max_prompt_tokens > max_pos:
        log(f"warning: rollout.max_new_tokens + data.max_prompt_tokens = "
            f"{cfg.rollout.max_new_tokens + cfg.data.max_prompt_tokens} exceeds the student's "
            f"max_position_embeddings ({max_pos}); " + (
                "the vLLM engine ends a response at that context" if cfg.rollout.engine == "vllm"
                else "long responses will run past what it was trained on"))
    drop_ids = special_ids if cfg.objective.drop_special_from_support else ()
    teacher_model = None
    if cfg.teacher.url is not None:  # the pre-flight check runs against the server's tokenizer and vocabulary
        teacher = build_teacher(cfg, objective.request, student_vocab_size=student_rows, drop_ids=drop_ids,
                                student_tokenizer=tokenizer)
        teacher_tok, teacher_rows, teacher_name = teacher.tokenizer, teacher.vocab_size, cfg.teacher.url
    else:
        with _naming("teacher.path"):
            teacher_tok = load_tokenizer(cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code)
            from opdkit.train.precision import teacher_dtype as _teacher_dtype

            teacher_dtype = _teacher_dtype(cfg.teacher.dtype, precision)
            if cfg.teacher.dtype == "bfloat16" and device.type == "cpu" and dist.is_main:
                log("warning: teacher.dtype=bfloat16 on a CPU: correct, but several times slower than float32 (a "
                    "1.5B Qwen2 forward measured 7x); teacher.dtype=run picks float32 here")
            teacher_model = load_causal_lm(cfg.teacher.path, dtype=teacher_dtype,
                                           trust_remote_code=cfg.teacher.trust_remote_code, device=device)
        teacher_rows, teacher_name = vocab_rows(teacher_model), cfg.teacher.path
    report = check_pair(tokenizer, teacher_tok, student_rows=student_rows, teacher_rows=teacher_rows,
                        student=cfg.model.path, teacher=teacher_name)
    require_compatible(report)
    if cfg.teacher.own_chat_template and not getattr(teacher_tok, "chat_template", None):
        raise OpdkitError(f"teacher.own_chat_template: the teacher tokenizer '{teacher_name}' has no chat template")
    if teacher_model is not None:
        teacher = build_teacher(cfg, objective.request, student_vocab_size=student_rows, drop_ids=drop_ids,
                                model=teacher_model, tokenizer=teacher_tok)
    if cfg.data.prompt_overflow == "truncate_left" and cfg.teacher.own_chat_template:
        raise OpdkitError("data.prompt_overflow=truncate_left with teacher.own_chat_template=true is not supported "
                          "yet (the teacher's own rendering would need the same truncation); use error or skip")
    records = check_prompt_lengths(records, tokenizer, cfg.data.max_prompt_tokens, overflow=cfg.data.prompt_overflow,
                                   log=log if dist.is_main else None)

    from opdkit.train.tasks import TaskSchedule

    schedule = TaskSchedule(records, mode=cfg.data.task_sampling, weights=cfg.data.task_weights, seed=cfg.run.seed,
                            shuffle=cfg.data.shuffle)
    teachers = _task_teachers(cfg, schedule, objective, student_rows=student_rows, drop_ids=drop_ids,
                              student_tok=tokenizer, teacher_dtype=None if cfg.teacher.url else teacher_dtype,
                              device=device, main=teacher_model, log=log if dist.is_main else None)
    env_pool, env_template, episode_settings = _environments(cfg, records, eval_problems, context=max_pos,
                                                             log=log if dist.is_main else (lambda _m: None))

    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = make_adamw(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                           weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=cfg.optim.schedule,
                               warmup_steps=cfg.optim.warmup_steps * cfg.optim.mini_batches,
                               total_steps=cfg.optim.total_steps * cfg.optim.mini_batches)
    with warnings.catch_warnings():
        # torch 2.13 renames broadcast_buffers=False to forward_sync_buffers=False, which accelerate cannot pass
        # yet; the old name still does exactly what is needed here.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
        module, optimizer, scheduler = accelerator.prepare(StudentModule(lm), optimizer, scheduler)
    inner = accelerator.unwrap_model(module).lm

    def generate_fn(**kwargs):
        # Through the prepared module: FSDP gathers the weights inside its forward, and its processes must
        # keep stepping together until the longest response ends.
        if dist.is_fsdp and dist.world > 1:
            kwargs["synced_gpus"] = True
        with precision.autocast():
            return module(_generate, **kwargs)

    truncate = cfg.data.max_prompt_tokens if cfg.data.prompt_overflow == "truncate_left" else None
    pi_old_from_sampler = _pi_old_from_sampler(cfg, precision, objective)
    vllm = None
    if cfg.rollout.engine == "vllm":
        ctx = context_length(inner)
        vllm = {"model_dir": cfg.model.path, "dtype": "bfloat16" if precision.name == "bf16" else "float32",
                "max_model_len": min(max(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                                         episode_settings.max_tokens if episode_settings else 0), ctx or 1 << 30),
                "kv_cache_gb": cfg.rollout.vllm_kv_cache_gb, "seed": cfg.rollout.seed,
                "trust_remote_code": cfg.model.trust_remote_code}
    sampler = build_sampler(cfg.rollout, inner, tokenizer, generate_fn=generate_fn, max_prompt_tokens=truncate,
                            record_stats=pi_old_from_sampler, vllm=vllm)
    if evaluator is None:
        evaluator = _build_evaluator(cfg, dist, generate_fn, eval_problems)
    head_description = objective.describe(output_head(inner))

    if dist.is_main and not resume:
        create_run_dir(cfg, path, overwrite=overwrite)
    dist.barrier()
    return Components(
        pi_old_from_sampler=pi_old_from_sampler,
        cfg=cfg, run_dir=path, accelerator=accelerator, dist=dist, precision=precision, tokenizer=tokenizer,
        module=module, lm=inner, optimizer=optimizer, scheduler=scheduler, sampler=sampler, teacher=teacher,
        objective=objective, evaluator=evaluator, special_ids=special_ids, prompts=records,
        head_description=head_description, load_dtype=load_dtype, schedule=schedule, teachers=teachers,
        env_pool=env_pool, env_template=env_template, episode_settings=episode_settings,
        identity={
            "student_sha256": model_dir_digest(cfg.model.path),
            "teacher_sha256": (model_dir_digest(cfg.teacher.path) if cfg.teacher.url is None
                               else teacher.model_sha256),
            "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
            **({"task_teachers_sha256": {t: model_dir_digest(p) for t, p in _per_task(cfg).items()}}
               if cfg.teacher.per_task else {}),
        },
    )


def _per_task(cfg: Config) -> dict[str, str]:
    """``teacher.per_task`` as ``{task: directory}``."""
    out = {}
    for spec in cfg.teacher.per_task:
        task, sep, path = str(spec).partition("=")
        if not sep or not task.strip() or not path.strip():
            raise OpdkitError(f"teacher.per_task: {spec!r}: expected TASK=DIRECTORY")
        if task.strip() in out:
            raise OpdkitError(f"teacher.per_task: task {task.strip()!r} is given twice")
        out[task.strip()] = path.strip()
    return out


def _task_teachers(cfg: Config, schedule, objective, *, student_rows, drop_ids, student_tok, teacher_dtype, device,
                   main, log) -> dict:
    """The teachers of ``teacher.per_task`` by task, each checked against the student; a directory named
    twice (or equal to teacher.path) is loaded once."""
    from opdkit.check import check_pair, require_compatible
    from opdkit.hf import load_causal_lm, load_tokenizer
    from opdkit.modeling import vocab_rows
    from opdkit.teacher import build_teacher

    per = _per_task(cfg)
    if not per:
        return {}
    if not schedule.multitask:
        raise OpdkitError("teacher.per_task: needs a multi-task run with data.task_sampling round_robin or weighted "
                          "(a batch of data.task_sampling=mixed holds several tasks)")
    unknown = [t for t in per if t not in schedule.tasks]
    if unknown:
        raise OpdkitError(f"teacher.per_task: {', '.join(unknown)} is not a task of data.train_path (tasks: "
                          f"{', '.join(map(str, schedule.tasks))})")
    loaded: dict[str, Any] = {}
    out = {}
    for task, path in per.items():
        if path not in loaded:
            if main is not None and cfg.teacher.path is not None and _same_dir(path, cfg.teacher.path):
                loaded[path] = None  # the main teacher serves this task
            else:
                with _naming(f"teacher.per_task ({task})"):
                    tok = load_tokenizer(path)
                    model = load_causal_lm(path, dtype=teacher_dtype, device=device)
                report = check_pair(student_tok, tok, student_rows=student_rows, teacher_rows=vocab_rows(model),
                                    student=cfg.model.path, teacher=path)
                require_compatible(report)
                loaded[path] = build_teacher(cfg, objective.request, student_vocab_size=student_rows,
                                             drop_ids=drop_ids, model=model, tokenizer=tok)
                if log is not None:
                    log(f"opdkit: task {task}: teacher {path}")
        if loaded[path] is not None:
            out[task] = loaded[path]
    return out


def _evaluates_games(cfg: Config, eval_problems) -> bool:
    """Whether the run's evaluation plays games (then the ``env`` settings act on it)."""
    from opdkit.envs.evaluate import is_env_benchmark
    from opdkit.eval.benchmarks import Benchmark, is_env_spec

    if eval_problems is not None:
        return any(isinstance(b, Benchmark) and is_env_benchmark(b) for b in eval_problems)
    specs = cfg.data.eval_path if isinstance(cfg.data.eval_path, list) else [cfg.data.eval_path]
    return any(is_env_spec(s) for s in specs if s is not None)


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _environments(cfg: Config, records, eval_problems, *, context: int | None = None, log=print):
    """The worker pool, prompt template and episode limits when the training data holds environments; else
    ``(None, None, None)``, and an ``env.*`` setting changed from its default is refused (nothing reads it).

    With only environments to train on, ``rollout.max_new_tokens`` changed from its default is refused too
    (turns are ``env.max_turn_tokens`` long); ``env.max_episode_tokens`` is lowered to the student's
    ``context`` (logged)."""
    from opdkit.config import EnvConfig, RolloutConfig
    from opdkit.envs.base import template_from_config
    from opdkit.envs.episodes import EpisodeSettings, fit_episode_budget
    from opdkit.envs.pool import EnvPool

    if not any(r.env is not None for r in records):
        if not _evaluates_games(cfg, eval_problems):
            changed = [f"env.{k}" for k, v in vars(EnvConfig()).items() if getattr(cfg.env, k) != v]
            if changed:
                raise OpdkitError(f"{', '.join(changed)}: set, but the training data holds no environment (see "
                                  f"data.train_path); remove {'it' if len(changed) == 1 else 'them'}")
        return None, None, None
    if cfg.teacher.own_chat_template:
        raise OpdkitError("teacher.own_chat_template=true with environments in the training data is not supported "
                          "(the teacher would need each episode's conversation re-rendered turn by turn)")
    if all(r.env is not None for r in records) and cfg.rollout.max_new_tokens != RolloutConfig().max_new_tokens:
        raise OpdkitError("rollout.max_new_tokens: set, but every training record is an environment, whose turns "
                          "are env.max_turn_tokens long; remove it (or set env.max_turn_tokens)")
    env = fit_episode_budget(cfg.env, context, key="env.max_episode_tokens", log=log)
    return (EnvPool(cfg.env.processes, cfg.env.step_timeout_s), template_from_config(cfg.env),
            EpisodeSettings.from_config(env))


def make_adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it exists for these parameters (CPU and CUDA, float32/bf16): one
    pass over each tensor instead of a dozen (5.8x faster on this CPU at 134M parameters; the step of a
    0.5B-parameter student spends ~2 s in the default loop). The plain loop elsewhere (e.g. sharded DTensor
    parameters on a torch without fused support for them)."""
    params = list(params)
    devices = {p.device.type for p in params}
    if devices <= {"cpu", "cuda"} and all(type(p.data) is torch.Tensor for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kw)
