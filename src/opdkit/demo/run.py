"""``opdkit demo``: on-policy distillation end to end, offline, on a CPU, in minutes.

1. Build (or load from the cache) the demo's tokenizer, a teacher fine-tuned on worked arithmetic
   solutions, and a weaker student (``opdkit.demo.models``).
2. Measure the student's accuracy, run OPD with the config in ``opdkit/demo/demo.yaml`` (the same file
   as ``configs/demo.yaml``): the student samples its own solutions, the teacher scores its top-K
   tokens, the student learns the renormalised support-set reverse KL. The student never sees a
   ground-truth solution; answers are used only to grade.
3. Measure again, print a table, write ``demo_summary.json`` and plots under the output directory.

``--compare`` runs, on the same seed and budget, sampled-token OPD, the teacher-top-K KL with and
without renormalisation, and off-policy distillation (supervised fine-tuning on teacher samples: the
baseline OPD must beat to be worth its cost), and writes a comparison table and plot.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from opdkit.config import Config, apply_overrides, config_from_dict, load_config
from opdkit.errors import OpdkitError

__all__ = ["ARMS", "DemoArm", "accuracy_evaluator", "demo_config", "run_demo", "train_prompts"]


@dataclass(frozen=True)
class DemoArm:
    name: str
    label: str
    overrides: dict[str, Any]


# Same seed, same number of steps, prompts and samples in every arm; only the objective differs.
ARMS = (
    DemoArm("support_kl", "teacher top-K KL, renormalised (the paper's method)", {}),
    DemoArm("support_kl_no_renorm", "teacher top-K KL, not renormalised", {"objective.renormalize": False}),
    DemoArm(
        "sampled_token",
        "sampled-token OPD (top-p 1.0)",
        {"objective.kind": "sampled_token", "rollout.top_p": 1.0, "objective.gamma": 0.0},
    ),
)
OFF_POLICY = DemoArm("off_policy_sft", "off-policy distillation (SFT on teacher samples)", {})


def demo_config(overrides: dict[str, Any] | None = None) -> Config:
    """The demo's config (``opdkit/demo/demo.yaml``) with ``overrides`` (dotted keys) applied."""
    text = resources.files("opdkit.demo").joinpath("demo.yaml").read_text()
    import yaml

    cfg = config_from_dict(yaml.safe_load(text) or {}, source="opdkit/demo/demo.yaml")
    return load_config(None, {**_flatten(cfg), **(overrides or {})})


def _flatten(cfg: Config) -> dict[str, Any]:
    from opdkit.config import config_to_dict

    tree = config_to_dict(cfg)
    return {f"{section}.{key}": value for section, fields in tree.items() for key, value in fields.items()}


def _accuracy(model, tokenizer, problems, settings, seed: int) -> float:
    """The demo's accuracy protocol (``DemoSettings``' sampling) for any model: the trainer's evaluator."""
    return accuracy_evaluator(problems, settings, seed).evaluate(model, tokenizer)["eval_accuracy"]


def accuracy_evaluator(problems, settings, seed: int):
    """The demo's accuracy protocol (``DemoSettings``' sampling) as the trainer's evaluator."""
    from opdkit.demo.sampling import demo_evaluator

    return demo_evaluator(problems, max_new_tokens=settings.max_new_tokens, top_p=settings.eval_top_p,
                          temperature=settings.eval_temperature, seed=seed, batch_size=settings.eval_batch_size)


def train_prompts(n: int, seed: int):
    from opdkit.data import PromptRecord
    from opdkit.demo.task import chat_messages, make_problems

    return [PromptRecord(tuple(chat_messages(p)), p.answer) for p in make_problems(n, seed + 17, "train")]


def _run_opd(arm: DemoArm, cfg: Config, models, eval_problems, run_dir: Path, log) -> dict[str, Any]:
    from opdkit.train import Trainer

    settings = models.settings
    cfg = load_config(None, {**_flatten(cfg), **arm.overrides})
    n_prompts = cfg.optim.total_steps * cfg.optim.prompts_per_step

    t0 = time.perf_counter()
    trainer = Trainer(
        cfg, run_dir, prompts=train_prompts(n_prompts, cfg.run.seed), overwrite=True, progress=True,
        evaluator=accuracy_evaluator(eval_problems, settings, cfg.run.seed),
    )
    result = trainer.run()
    seconds = time.perf_counter() - t0
    from opdkit.train.metrics import read_metrics
    from opdkit.train.plots import plot_run

    rows = read_metrics(run_dir)
    plot_run(run_dir)
    final = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
    log(f"demo: {arm.name}: accuracy {final[-1]:.1%} after {cfg.optim.total_steps} steps ({seconds:.0f} s)")
    return {"accuracy": final[-1], "seconds": seconds, "run_dir": str(result.run_dir), "curve": [
        (r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None
    ]}


def teacher_sample_problems(problems, texts, finished) -> list:
    """Problems whose ``solution`` is the teacher's own finished sample (the reference is never used)."""
    return [dataclasses.replace(p, solution=text) for p, text, done in zip(problems, texts, finished) if done]


def _run_off_policy(cfg: Config, models, eval_problems, out: Path, log) -> dict[str, Any]:
    """SFT of the student on teacher samples: as many samples and optimizer steps as the OPD arm."""
    import torch

    from opdkit.demo.models import generate_responses, load_demo_model, load_demo_tokenizer
    from opdkit.demo.sft import build_examples, sft_train
    from opdkit.demo.task import make_problems

    t0 = time.perf_counter()
    settings = models.settings
    tok = load_demo_tokenizer(models.tokenizer_dir)
    teacher = load_demo_model(models.teacher_dir)
    n = cfg.optim.total_steps * cfg.optim.prompts_per_step
    problems = make_problems(n, cfg.run.seed + 17, "train")
    samples = []
    for i in range(cfg.rollout.n_samples):  # the same number of responses per prompt as the OPD arms
        out_i = generate_responses(
            teacher, tok, problems, max_new_tokens=cfg.rollout.max_new_tokens, top_p=cfg.rollout.top_p,
            temperature=cfg.rollout.temperature, seed=cfg.run.seed + 1000 + i, batch_size=settings.eval_batch_size,
        )
        samples += teacher_sample_problems(problems, out_i.texts, out_i.finished)
    del teacher
    student = load_demo_model(models.student_dir)
    torch.manual_seed(cfg.run.seed)
    if not samples:  # a teacher that never finished a response leaves nothing to imitate
        log("demo: off-policy SFT: the teacher finished no response; the student is left as it was")
    else:
        sft_train(
            student,
            build_examples(tok, samples),
            pad_id=tok.pad_token_id,
            steps=cfg.optim.total_steps * cfg.optim.mini_batches,
            batch_size=max(1, len(samples) // max(cfg.optim.total_steps * cfg.optim.mini_batches, 1)),
            lr=cfg.optim.lr,
            warmup=0,
            min_lr_ratio=1.0,
            weight_decay=cfg.optim.weight_decay,
            seed=cfg.run.seed,
        )
    acc = _accuracy(student, tok, eval_problems, settings, seed=cfg.run.seed)
    seconds = time.perf_counter() - t0
    log(f"demo: {OFF_POLICY.name}: accuracy {acc:.1%} ({seconds:.0f} s, {len(samples)} teacher samples)")
    (out / OFF_POLICY.name).mkdir(parents=True, exist_ok=True)
    return {"accuracy": acc, "seconds": seconds, "teacher_samples": len(samples)}


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


def _plot_compare(results: dict[str, dict], teacher_acc: float, student_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        if r.get("curve"):
            steps = [0] + [s for s, _ in r["curve"]]
            ax.plot(steps, [student_acc] + [a for _, a in r["curve"]], marker=".", label=name)
        else:  # off-policy SFT has no curve: its final accuracy at the end of the same budget
            last = max((s for v in results.values() for s, _ in v.get("curve", [])), default=0)
            ax.scatter([last], [r["accuracy"]], marker="*", s=120, label=name)
    ax.axhline(teacher_acc, color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("training step")
    ax.set_ylabel("eval accuracy (avg@1, top-p 0.9)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_DEMO_MARK = "created by opdkit demo\n"


def run_demo(
    out_dir: str | Path | None = None,
    *,
    compare: bool = False,
    cache_dir: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    settings=None,
    log=print,
) -> dict[str, Any]:
    """Run the demo; returns the summary written to ``OUT/demo_summary.json``."""
    from opdkit.demo.models import load_demo_model, load_demo_tokenizer, prepare_demo_models
    from opdkit.demo.task import make_problems
    from opdkit.train.run_dir import MARKER_FILE, check_run_dir, new_run_dir

    start = time.perf_counter()
    from opdkit.paths import check_output_dir

    out = Path(out_dir) if out_dir is not None else new_run_dir("runs", "demo")
    check_run_dir(out, resume=False, overwrite=True, what="--out")  # new, empty, or opdkit's own
    if (out / MARKER_FILE).is_file() and (out / MARKER_FILE).read_text() != _DEMO_MARK:
        raise OpdkitError(f"--out '{out}': holds a training run, not an earlier demo's output; choose another")
    if cache_dir is not None:
        check_output_dir(cache_dir, "--cache-dir")
    if overrides:  # checked now, not after minutes of building models
        apply_overrides(demo_config(), overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text(_DEMO_MARK)
    models = prepare_demo_models(cache_dir, log=log, settings=settings)
    cfg = demo_config({"model.path": str(models.student_dir), "teacher.path": str(models.teacher_dir)})
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    eval_problems = make_problems(models.settings.eval_problems, cfg.run.seed, "eval")
    tok = load_demo_tokenizer(models.tokenizer_dir)
    teacher_acc = _accuracy(load_demo_model(models.teacher_dir), tok, eval_problems, models.settings, cfg.run.seed)
    student_acc = _accuracy(load_demo_model(models.student_dir), tok, eval_problems, models.settings, cfg.run.seed)
    log(f"demo: teacher accuracy {teacher_acc:.1%}, student before OPD {student_acc:.1%}")

    arms = ARMS if compare else ARMS[:1]
    results = {arm.name: _run_opd(arm, cfg, models, eval_problems, out / arm.name, log) for arm in arms}
    if compare:
        results[OFF_POLICY.name] = _run_off_policy(cfg, models, eval_problems, out, log)
    wall = time.perf_counter() - start

    main = results["support_kl"]
    summary = {
        "teacher_accuracy": teacher_acc,
        "student_accuracy_before": student_acc,
        "student_accuracy_after": main["accuracy"],
        "wall_seconds": wall,
        "eval_problems": len(eval_problems),
        "opd_steps": cfg.optim.total_steps,
        "models_built": models.built,
        "model_build_seconds": models.build_seconds if models.built else 0.0,
        "run_dir": main["run_dir"],
    }
    if compare:
        summary["compare"] = {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in results.items()}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    rows = [("", "accuracy", "seconds"), ("teacher", f"{teacher_acc:.1%}", ""),
            ("student before OPD", f"{student_acc:.1%}", "")]
    labels = {a.name: a.label for a in (*ARMS, OFF_POLICY)}
    for name, r in results.items():
        rows.append((f"student after: {labels[name]}", f"{r['accuracy']:.1%}", f"{r['seconds']:.0f}"))
    rows.append(("whole demo (wall)", "", f"{wall:.0f}"))
    table = _table(rows)
    print(table)
    if compare:
        (out / "compare.md").write_text(
            "| arm | accuracy | seconds |\n|---|---|---|\n"
            + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows[1:])
        )
        _plot_compare(results, teacher_acc, student_acc, out / "compare.png")
    log(f"demo: wrote {out / 'demo_summary.json'}")
    return summary
