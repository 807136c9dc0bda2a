"""pi_old from the sampler against a second (teacher-forced) student pass: training steps side by side.

    .venv/bin/python benchmarks/pi_old_bench.py                  # the demo's models and config, 30 steps each

Runs the demo's OPD configuration (16 prompts x 4 samples, 48 new tokens, teacher top-16 KL) for ``--steps``
steps twice in one process, with ``rollout.old_logprobs=recompute`` and ``=sampler``, alternating the order
per repeat, and prints the median seconds per step of each stage (steps 3 onward) and the ratio. The demo's
models come from its cache (built if missing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def run(models, setting: str, steps: int, out: Path) -> list[dict]:
    from opdkit.config import load_config
    from opdkit.demo.run import _flatten, _train_prompts, demo_config
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    cfg = demo_config()
    over = {**_flatten(cfg), "model.path": str(models.student_dir), "teacher.path": str(models.teacher_dir),
            "optim.total_steps": steps, "run.save_every": 0, "run.tensorboard": False, "eval.every_steps": 0,
            "rollout.old_logprobs": setting}
    cfg = load_config(None, over)
    Trainer(cfg, out, prompts=_train_prompts(steps * 16, 0), progress=False, log=lambda _m: None).run()
    return read_metrics(out)


def main() -> None:
    from opdkit.demo.cache import prepare_demo_models

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    models = prepare_demo_models(cache_dir=args.cache_dir, log=lambda m: print(m, file=sys.stderr))
    times: dict[str, dict[str, list[float]]] = {"recompute": {}, "sampler": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = ("recompute", "sampler") if r % 2 == 0 else ("sampler", "recompute")
            for setting in order:
                rows = run(models, setting, args.steps, Path(tmp) / f"{setting}-{r}")
                for row in rows[2:]:
                    for k in ("time_rollout_s", "time_student_s", "time_teacher_s", "time_update_s", "time_step_s"):
                        times[setting].setdefault(k, []).append(row[k])
    print(f"# demo OPD step, {args.steps} steps x {args.repeats} repeats per setting, median seconds (steps 3+)\n")
    print("| stage | recompute | sampler | recompute / sampler |")
    print("|---|---|---|---|")
    for k in ("time_rollout_s", "time_student_s", "time_teacher_s", "time_update_s", "time_step_s"):
        a, b = statistics.median(times["recompute"][k]), statistics.median(times["sampler"][k])
        print(f"| {k} | {a:.4f} | {b:.4f} | {a / b:.2f}x |" if b > 0 else f"| {k} | {a:.4f} | {b:.4f} | — |")


if __name__ == "__main__":
    main()
