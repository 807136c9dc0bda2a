"""Run an experiment (``opdkit.experiments.arms``) on the demo task: every arm's OPD run, its accuracy curve and
training metrics, and (``probe``) its gradient variance at the starting student; then the report.

The gradient probe: a short run of the arm's own config whose every step computes one rollout batch's gradient
and clears it before the optimizer sees it (``Components.grad_probe``), so the weights never move; the batches
are independent (new prompts, new seeds). From ``B`` batch gradients ``g_b`` (all trainable parameters):
``grad_variance = Σ_b ‖g_b − ḡ‖² / (B − 1)`` (the trace of a batch gradient's covariance), ``grad_mean_sq =
‖ḡ‖² − grad_variance / B`` (an unbiased estimate of ``‖E g‖²``), and their ratio ``noise_to_signal``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.experiments.arms import Arm, Experiment, get_experiment
from opdkit.paths import write_text_atomic

__all__ = ["EOS_SWAPPED", "eos_swapped_teacher", "run_experiment"]

EOS_SWAPPED = ("<|im_end|>", "<|endoftext|>")
MARKER = ".opdkit-experiment"  # an experiment's output folder: reusable by the next run of one
_MEANS = ("loss", "grad_norm", "negative_reward_frac", "reward_skew", "teacher_support_mass", "student_support_mass",
          "support_size", "response_length", "truncation_rate", "topp_weight", "rollout_tail_mass")


def eos_swapped_teacher(teacher_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of the teacher whose output rows of ``<|im_end|>`` and ``<|endoftext|>`` are swapped: it predicts
    ``<|endoftext|>`` where it would end its turn, and reads its input as before (untied embeddings only)."""
    from opdkit.hf import load_causal_lm, load_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(teacher_dir)
    vocab = tok.get_vocab()  # (not unk_token_id: the demo's unknown token is <|endoftext|> itself)
    if any(t not in vocab for t in EOS_SWAPPED):
        raise OpdkitError(f"the teacher's tokenizer lacks one of {EOS_SWAPPED}")
    ids = [vocab[t] for t in EOS_SWAPPED]
    model = load_causal_lm(teacher_dir)
    head = model.get_output_embeddings().weight
    if head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        raise OpdkitError("the teacher ties its input and output embeddings: its output rows cannot be swapped alone")
    with torch.no_grad():
        a, b = ids
        head[[a, b]] = head[[b, a]].clone()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


class _Probe:
    """Collects each batch's gradient (flattened, float64) and clears it, so that no weight moves."""

    def __init__(self):
        self.grads: list[torch.Tensor] = []

    def __call__(self, params: Sequence[torch.Tensor]) -> None:
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double()
                                     .reshape(-1) for p in params]))
        for p in params:
            p.grad = None

    def stats(self) -> dict[str, float]:
        G = torch.stack(self.grads)
        B = G.shape[0]
        mean = G.mean(0)
        var = float((G - mean).square().sum() / (B - 1))
        signal = float(mean.square().sum()) - var / B
        # ‖E g‖² is estimated without bias as ‖ḡ‖² − var/B; at or below 0 the signal is not resolved
        return {"grad_variance": var, "grad_mean_sq": signal,
                "noise_to_signal": var / signal if signal > 0 else math.nan, "probe_batches": B}


def _config(arm: Arm, student_dir, teacher_dir, steps: int | None, seed: int, extra: dict):
    from opdkit.demo.run import demo_config

    over = {"model.path": str(student_dir), "teacher.path": str(teacher_dir), "run.seed": seed, **extra}
    if steps is not None:
        over["optim.total_steps"] = steps
        over["eval.every_steps"] = max(1, steps // 5)
        over["run.save_every"] = 0
    return demo_config({**over, **arm.overrides})


def _run_arm(arm: Arm, cfg, models, eval_problems, run_dir: Path, log) -> dict[str, Any]:
    from opdkit.demo.run import accuracy_evaluator, train_prompts
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    t0 = time.perf_counter()
    n = cfg.optim.total_steps * cfg.optim.prompts_per_step
    trainer = Trainer(cfg, run_dir, prompts=train_prompts(n, cfg.run.seed), overwrite=True, progress=False,
                      evaluator=accuracy_evaluator(eval_problems, models.settings, cfg.run.seed), log=lambda _m: None)
    trainer.run()
    rows = read_metrics(run_dir)
    curve = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    out: dict[str, Any] = {"accuracy": curve[-1][1], "curve": curve, "seconds": time.perf_counter() - t0,
                           "steps": len(rows), "run_dir": str(run_dir)}
    for key in _MEANS:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            out[key] = sum(values) / len(values)
            out[f"{key}_curve"] = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    out["skipped_steps"] = rows[-1].get("skipped_steps", 0)
    log(f"experiment: {arm.name}: accuracy {out['accuracy']:.1%} ({out['seconds']:.0f} s)")
    return out


def _probe_arm(arm: Arm, cfg, run_dir: Path, batches: int) -> dict[str, float]:
    from opdkit.config import load_config
    from opdkit.demo.run import _flatten, train_prompts
    from opdkit.train import Trainer

    pcfg = load_config(None, {**_flatten(cfg), "optim.total_steps": batches, "eval.every_steps": 0,
                              "run.save_every": 0, "run.seed": cfg.run.seed + 7919})
    probe = _Probe()
    trainer = Trainer(pcfg, run_dir, prompts=train_prompts(batches * pcfg.optim.prompts_per_step, pcfg.run.seed),
                      overwrite=True, progress=False, log=lambda _m: None)
    trainer.c.grad_probe = probe
    trainer.run()
    return probe.stats()


def run_experiment(
    name: str,
    out_dir: str | Path,
    *,
    models=None,
    cache_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    probe_batches: int = 8,
    arms: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    eval_problems: int | None = None,
    fresh: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run experiment ``name``; write ``results.json``, ``results.csv``, ``results.md`` and ``NAME.png`` under
    ``out_dir``; return the results.

    ``models``: a :class:`~opdkit.demo.cache.DemoModels` (default: the demo's, built into ``cache_dir`` if
    missing); ``steps``: OPD steps per arm (default: the demo's); ``arms``: a subset of the arms' names;
    ``extra``: further overrides for every arm (e.g. a toy budget); ``eval_problems``: fewer eval problems.

    ``results.json`` is rewritten after every arm. A rerun into the same folder with the same settings keeps
    the arms already finished there (an interrupted experiment continues where it stopped; ``arms`` adds
    to it); other settings are refused unless ``fresh``, which discards them.
    """
    from opdkit.demo.models import load_demo_model, load_demo_tokenizer
    from opdkit.demo.run import _accuracy, demo_config
    from opdkit.demo.task import make_problems
    from opdkit.experiments.report import write_report
    from opdkit.interrupt import Interrupted

    exp: Experiment = get_experiment(name)
    chosen = list(exp.arms) if arms is None else [a for a in exp.arms if a.name in set(arms)]
    if arms is not None and len(chosen) != len(set(arms)):
        unknown = sorted(set(arms) - {a.name for a in exp.arms})
        raise OpdkitError(f"arms: {unknown} not in {name} ({', '.join(a.name for a in exp.arms)})")
    out = Path(out_dir)
    mark = f"created by opdkit experiment {name}\n"
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise OpdkitError(f"--out '{out}': a folder that holds other files; give a new or empty folder (or an "
                              f"earlier run of {name}'s)")
        if (out / MARKER).read_text(encoding="utf-8") != mark:
            raise OpdkitError(f"--out '{out}': holds another experiment's results; give a new folder for {name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(mark, encoding="utf-8")
    t0 = time.perf_counter()
    if models is None:
        from opdkit.demo.cache import prepare_demo_models

        models = prepare_demo_models(cache_dir, log=log)
    settings = models.settings
    problems = make_problems(eval_problems or settings.eval_problems, seed, "eval")
    # stored as the number it stands for: a rerun that names the demo's own number is the same run
    n_steps = steps if steps is not None else demo_config({}).optim.total_steps
    run_settings = {"steps": n_steps, "seed": seed, "probe_batches": probe_batches if exp.probe else 0,
                    "eval_problems": len(problems), "extra": dict(extra or {}),
                    "models": _models_id(models)}
    summary = _earlier(out / "results.json", name, run_settings, fresh)
    if fresh:  # the discarded arms' run folders go with their results
        for sub in ("runs", "probes"):
            shutil.rmtree(out / sub, ignore_errors=True)
    earlier = float(summary.get("seconds", 0.0))  # the earlier runs' seconds, counted in the total
    todo = [a for a in chosen if a.name not in summary["arms"]]
    done = list(summary["arms"])
    if done:
        log(f"experiment {name}: {len(done)} arm(s) kept from the earlier run in {out} ({', '.join(done)})")
    summary.update(title=exp.title, claim=exp.claim, seed=seed, steps=n_steps, eval_problems=len(problems),
                   settings=run_settings)
    tok = load_demo_tokenizer(models.tokenizer_dir)
    if "teacher_accuracy" not in summary:
        summary["teacher_accuracy"] = _accuracy(load_demo_model(models.teacher_dir), tok, problems, settings, seed)
        summary["student_accuracy_before"] = _accuracy(load_demo_model(models.student_dir), tok, problems,
                                                       settings, seed)
    log(f"experiment {name}: teacher {summary['teacher_accuracy']:.1%}, student before "
        f"{summary['student_accuracy_before']:.1%}, {len(todo)} arm(s) to run")
    teachers = {"demo": models.teacher_dir}
    if any(a.teacher == "eos_swapped" for a in todo):
        teachers["eos_swapped"] = eos_swapped_teacher(models.teacher_dir, out / "teacher_eos_swapped")
        if "eos_swapped_teacher_accuracy" not in summary:
            summary["eos_swapped_teacher_accuracy"] = _accuracy(load_demo_model(teachers["eos_swapped"]), tok,
                                                                problems, settings, seed)
        log(f"experiment {name}: the end-swapped teacher's own accuracy "
            f"{summary['eos_swapped_teacher_accuracy']:.1%}")
    for arm in todo:
        cfg = _config(arm, models.student_dir, teachers[arm.teacher], steps, seed, dict(extra or {}))
        try:
            r = _run_arm(arm, cfg, models, problems, out / "runs" / _safe(arm.name), log)
            if exp.probe and probe_batches >= 2:
                r.update(_probe_arm(arm, cfg, out / "probes" / _safe(arm.name), probe_batches))
        except Interrupted:
            finished = ", ".join(a for a in summary["arms"]) or "none"
            raise Interrupted(f"experiment {name} stopped during arm {arm.name}; finished arms ({finished}) are "
                              f"saved in {out / 'results.json'}. Continue with the same command (same --out, "
                              "--steps, --seed, --probe-batches): finished arms are kept, this one starts "
                              "over") from None
        r.update(label=arm.label, x=arm.x, teacher=arm.teacher)
        summary["arms"][arm.name] = r
        summary["arms"] = {a.name: summary["arms"][a.name] for a in exp.arms if a.name in summary["arms"]}
        summary["seconds"] = time.perf_counter() - t0 + earlier
        _save(out / "results.json", summary)
    summary["seconds"] = time.perf_counter() - t0 + earlier
    _save(out / "results.json", summary)
    write_report(exp, summary, out)
    log(f"experiment {name}: wrote {out / 'results.md'} ({summary['seconds']:.0f} s)")
    return summary


def _models_id(models) -> str:
    """The demo models' identity: their cache folder (its name carries the build's settings and format)."""
    return Path(models.student_dir).resolve().parent.name


def _earlier(path: Path, name: str, run_settings: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """The results of an earlier run into the same folder to continue from (an empty summary if none)."""
    empty: dict[str, Any] = {"experiment": name, "arms": {}}
    if fresh or not path.is_file():
        return empty
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OpdkitError(f"{path}: unreadable earlier results ({exc}); give --fresh to start over") from None
    if prev.get("settings") != run_settings:
        before = prev.get("settings") or {}
        diff = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in run_settings.items() if before.get(k) != v)
        raise OpdkitError(f"--out '{path.parent}': holds results of {name} at other settings ({diff}); give a new "
                          "folder, or --fresh to discard them")
    return prev


def _save(path: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
