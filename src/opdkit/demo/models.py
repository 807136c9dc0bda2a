"""The demo's tokenizer, teacher and weaker student: built offline once, cached, verified on every load.

What is built (all numbers live in :class:`DemoSettings`):

1. a byte-level BPE tokenizer (``vocab_size`` tokens, ChatML template) trained on task dialogues and
   filler English, so that a teacher top-K support set (K = 16) is a real truncation of the vocabulary;
2. the **teacher**: a tiny Qwen2 causal LM trained by supervised fine-tuning on worked solutions of
   :mod:`opdkit.demo.task` (loss on the response tokens only, :mod:`opdkit.demo.sft`);
3. the **student**: the same architecture from another random initialisation, fine-tuned on the same
   kind of data for far fewer steps, so that it already writes well-formed responses (the
   ``<think>...</think> The answer is \\boxed{..}`` format, ending with ``<|im_end|>``) but gets few
   answers right. On-policy distillation then improves it from its own samples.

Both are evaluated with METHOD.md's protocol (sampling, τ = 1.0, top-p 0.9, one sample per problem) on
eval-split problems, and the accuracies are stored with the models.

Cache: ``<cache_dir>/demo-<key>`` where ``cache_dir`` defaults to ``$XDG_CACHE_HOME/opdkit`` (or
``~/.cache/opdkit``) and ``key`` hashes the settings, the seed and :data:`CACHE_FORMAT`, so changed settings
build a new entry. A build writes into a temporary directory next to it and renames it into place only
when complete, with ``manifest.json`` (sha256 and size of every file) written last. A load re-hashes every
file; a missing manifest, a missing, extra, truncated or altered file, or a pickle file makes the entry
invalid, and it is removed and rebuilt (never used). Weights are safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opdkit.demo.task import DEFAULT_TASK, Problem, TaskSpec, accuracy, corpus_for_tokenizer, make_problems
from opdkit.errors import InputError, OpdkitError

__all__ = [
    "CACHE_FORMAT",
    "ModelSpec",
    "DemoSettings",
    "DemoModels",
    "Responses",
    "prepare_demo_models",
    "default_cache_dir",
    "cache_key",
    "verify_cache_entry",
    "load_demo_model",
    "load_demo_tokenizer",
    "generate_responses",
    "evaluate_accuracy",
]

CACHE_FORMAT = 1  # bump when the build code changes what a given DemoSettings produces
MANIFEST = "manifest.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


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
        eval_batch_size: prompts per ``generate`` call.
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


@dataclass(frozen=True)
class DemoModels:
    """A verified cache entry: where the models are and how good they are.

    Attributes:
        root: the cache entry directory.
        teacher_dir, student_dir: Hugging Face model directories (safetensors weights and the tokenizer).
        tokenizer_dir: the tokenizer alone (the same one is saved in both model directories).
        teacher_accuracy, student_accuracy: eval accuracies measured at build time (sampled, top-p).
        teacher_seconds, student_seconds: wall-clock seconds of each fine-tuning at build time.
        build_seconds: wall-clock seconds of the whole build (tokenizer, both SFTs, evaluations).
        built: True if this call built the entry, False if it was loaded from the cache.
        info: everything else measured at build time (param counts, vocabulary size, response lengths ...).
        settings: the settings the entry was built with.
        seed: the seed it was built with.
    """

    root: Path
    teacher_dir: Path
    student_dir: Path
    tokenizer_dir: Path
    teacher_accuracy: float
    student_accuracy: float
    teacher_seconds: float
    student_seconds: float
    build_seconds: float
    built: bool
    info: dict = field(default_factory=dict)
    settings: DemoSettings = DemoSettings()
    seed: int = 0


# ------------------------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/opdkit`` if set, else ``~/.cache/opdkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "opdkit"


def _settings_dict(settings: DemoSettings, seed: int) -> dict:
    return {"format": CACHE_FORMAT, "seed": seed, "settings": dataclasses.asdict(settings)}


def cache_key(settings: DemoSettings, seed: int = 0) -> str:
    """A short hash of the settings, the seed and the cache format."""
    blob = json.dumps(_settings_dict(settings, seed), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


_REQUIRED = tuple(
    f"{d}/{f}" for d in ("teacher", "student") for f in ("config.json", "model.safetensors", "tokenizer.json")
) + ("tokenizer/tokenizer.json",)


def verify_cache_entry(root: str | Path, key: str | None = None) -> dict | None:
    """The manifest of a complete, intact entry at ``root`` (matching ``key`` if given), else None.

    Checks: the manifest parses; its key matches; the required files are listed; every file on disk
    is listed and every listed file exists with the recorded size and sha256; no pickle files.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files: dict = manifest["files"]
        if key is not None and manifest.get("key") != key:
            return None
        if any(r not in files for r in _REQUIRED) or sorted(files) != _files(root):
            return None
        for rel, meta in files.items():
            path = root / rel
            if path.suffix in _PICKLE_SUFFIXES:
                return None
            if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(root: Path, key: str, settings: DemoSettings, seed: int, info: dict) -> dict:
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": _sha256(root / rel)} for rel in _files(root)}
    manifest = {"key": key, **_settings_dict(settings, seed), "info": info, "files": files}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(root / MANIFEST)
    return manifest


def _discard(path: Path) -> None:
    """Move ``path`` out of the way (atomically), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        path.rename(trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def _to_models(root: Path, manifest: dict, settings: DemoSettings, seed: int, built: bool) -> DemoModels:
    info = manifest["info"]
    return DemoModels(
        root=root,
        teacher_dir=root / "teacher",
        student_dir=root / "student",
        tokenizer_dir=root / "tokenizer",
        teacher_accuracy=info["teacher_accuracy"],
        student_accuracy=info["student_accuracy"],
        teacher_seconds=info["teacher_seconds"],
        student_seconds=info["student_seconds"],
        build_seconds=info["build_seconds"],
        built=built,
        info=info,
        settings=settings,
        seed=seed,
    )


def prepare_demo_models(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = print,
    settings: DemoSettings | None = None,
) -> DemoModels:
    """The demo's tokenizer, teacher and student, from the cache if intact, else built (minutes on a CPU).

    Args:
        cache_dir: where cache entries live (default :func:`default_cache_dir`).
        seed: seeds the tokenizer corpus, the problems, the initialisations and the data order.
        force: rebuild even if an intact entry exists.
        log: progress messages (None: silent).
        settings: the demo's numbers (default ``DemoSettings()``).
    """
    settings = settings if settings is not None else DemoSettings()
    say = log or (lambda _msg: None)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(settings, seed)
    root = base / f"demo-{key}"
    if not force:
        manifest = verify_cache_entry(root, key)
        if manifest is not None:
            say(f"demo: using cached models in {root}")
            return _to_models(root, manifest, settings, seed, built=False)
        if root.exists():
            say(f"demo: cache entry {root} is incomplete or corrupt; rebuilding it")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{key}.tmp-", dir=base))
    try:
        info = _build(tmp, settings, seed, say)
        manifest = _write_manifest(tmp, key, settings, seed, info)
        _discard(root)
        try:
            tmp.rename(root)
        except OSError:  # another process put an entry there meanwhile: keep it if it is intact
            other = verify_cache_entry(root, key)
            if other is None:
                _discard(root)
                tmp.rename(root)
            else:
                manifest = other
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"demo: models ready in {root}")
    return _to_models(root, manifest, settings, seed, built=True)


# ------------------------------------------------------------------------------------------------ build
def _build(out: Path, settings: DemoSettings, seed: int, say: Callable[[str], None]) -> dict:
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
        res = generate_responses(
            model,
            tokenizer,
            eval_problems,
            max_new_tokens=settings.max_new_tokens,
            top_p=settings.eval_top_p,
            temperature=settings.eval_temperature,
            seed=seed,
            batch_size=settings.eval_batch_size,
        )
        acc = accuracy(res.texts, [p.answer for p in eval_problems])
        eval_seconds = time.perf_counter() - t0
        info.update(
            {
                f"{name}_accuracy": acc,
                f"{name}_seconds": round(seconds, 2),
                f"{name}_eval_seconds": round(eval_seconds, 2),
                f"{name}_params": n_params,
                f"{name}_mean_response_tokens": sum(res.num_tokens) / len(res.num_tokens),
                f"{name}_finished_fraction": sum(res.finished) / len(res.finished),
                f"{name}_format_fraction": sum(_well_formed(t) for t in res.texts) / len(res.texts),
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


# ------------------------------------------------------------------------------------------------ loading
def load_demo_model(path: str | Path, *, device=None):
    """A demo model directory as a causal LM in eval mode (safetensors only: a pickle file is refused)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = Path(path)
    if not (p / "model.safetensors").is_file():
        raise OpdkitError(f"demo model '{p}': no model.safetensors (opdkit loads demo weights from safetensors only)")
    model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, local_files_only=True)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_demo_tokenizer(path: str | Path):
    """The demo tokenizer saved in ``path`` (a model directory or the entry's ``tokenizer`` directory)."""
    from opdkit.hf import load_tokenizer

    return load_tokenizer(path, require_chat_template=True)


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass(frozen=True)
class Responses:
    """Sampled responses, one per problem: decoded ``texts`` (special tokens removed), ``num_tokens``
    generated (EOS included), and whether each ``finished`` with EOS within the budget."""

    texts: list[str]
    num_tokens: list[int]
    finished: list[bool]


def generate_responses(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    greedy: bool = False,
) -> Responses:
    """One response per problem with ``model.generate`` on left-padded chat prompts.

    Sampling (τ = ``temperature``, nucleus ``top_p``, no top-k) unless ``greedy``. The same seed, problems,
    settings and batch size give the same responses; the caller's RNG state is left untouched.
    """
    import torch
    from transformers import GenerationConfig

    from opdkit.demo.sft import encode_prompts

    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens and batch_size: expected >= 1, got {max_new_tokens}, {batch_size}")
    if not greedy and not (0 < top_p <= 1 and temperature > 0):
        raise InputError(f"expected 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = {} if greedy else {"top_p": top_p, "temperature": temperature}
    config = GenerationConfig(
        do_sample=not greedy,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        **sampling,
    )
    device = next(model.parameters()).device
    prompts = encode_prompts(tokenizer, problems)
    texts: list[str] = []
    num_tokens: list[int] = []
    finished: list[bool] = []
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)[
                :, width:
            ]
            for row in out.tolist():
                done = eos in row
                n = row.index(eos) + 1 if done else len(row)
                texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
                num_tokens.append(n)
                finished.append(done)
    model.train(was_training)
    return Responses(texts, num_tokens, finished)


def evaluate_accuracy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    greedy: bool = False,
) -> float:
    """Fraction of ``problems`` answered correctly by one sampled (or greedy) response each.

    METHOD.md's protocol by default: τ = 1.0, top-p 0.9, answer = last ``\\boxed{}`` after ``</think>``.
    """
    if not problems:
        return 0.0
    res = generate_responses(
        model,
        tokenizer,
        problems,
        max_new_tokens=max_new_tokens,
        top_p=top_p,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        greedy=greedy,
    )
    return accuracy(res.texts, [p.answer for p in problems])
