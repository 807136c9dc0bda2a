"""A full opdkit training step (rollout, student pass, teacher, update) at V = 2,048 and V = 151,936.

    .venv/bin/python benchmarks/step_bench.py                     # ~5 min on 2 cores
    .venv/bin/python benchmarks/step_bench.py --vocab 2048 --steps 6

The issue's setup (issue 11): a tiny Qwen2 student (hidden 128) and teacher (hidden 256), random weights,
the vocabulary padded to V rows (the tokenizer has ~400 tokens, as Qwen2.5's checkpoints pad theirs),
8 prompts x 1 sample x 64 new tokens per step, τ 1, top-p 0.9, lr 1e-5, fp32, 2 threads; teacher top-32 KL
with π_old from the sampler (this version's default) and with a recomputed π_old, and `full_reverse_kl`.
Median seconds per stage over steps 3 onward. TRL is not installed here: its figures are the ones the issue
recorded for the same setup on this machine (0.49 s at V = 2,048, 13.2 s at V = 151,936), to be compared
with care (a different run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRL = {2048: 0.49, 151936: 13.2}  # recorded in issue 11 (TRL 1.16 DistillationTrainer, same setup, this CPU)
STAGES = ("time_rollout_s", "time_student_s", "time_teacher_s", "time_update_s", "time_step_s")


def build_pair(root: Path, vocab: int):
    from tests.tiny_models import corpus

    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer

    tok = train_tokenizer(corpus(), vocab_size=400)
    student = build_tiny_model(tok, hidden_size=128, num_layers=2, intermediate_size=256, vocab_size=vocab, seed=0)
    teacher = build_tiny_model(tok, hidden_size=256, num_layers=2, intermediate_size=512, vocab_size=vocab, seed=1)
    return save_model_dir(student, tok, root / "student"), save_model_dir(teacher, tok, root / "teacher")


def run(student, teacher, over: dict, steps: int, out: Path) -> dict[str, float]:
    from opdkit.config import load_config
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    prompts = [[{"role": "user", "content": f"Compute {a} + {b} and explain."}] for a in range(10) for b in range(10)]
    base = {"model.path": str(student), "teacher.path": str(teacher), "rollout.max_new_tokens": 64,
            "rollout.n_samples": 1, "rollout.top_p": 0.9, "optim.prompts_per_step": 8, "optim.mini_batches": 1,
            "optim.micro_batch_size": 8, "optim.lr": 1e-5, "optim.total_steps": steps, "run.save_every": 0,
            "run.tensorboard": False, "objective.top_k": 32, "run.threads": 2}
    cfg = load_config(None, {**base, **over})
    Trainer(cfg, out, prompts=prompts, progress=False, log=lambda _m: None).run()
    rows = read_metrics(out)[2:]
    return {k: statistics.median(r[k] for r in rows) for k in STAGES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="*", default=[2048, 151936])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    arms = {"top-32 KL, π_old from the sampler": {},
            "top-32 KL, π_old recomputed": {"rollout.old_logprobs": "recompute"},
            "full_reverse_kl": {"objective.kind": "full_reverse_kl", "objective.top_k": None}}
    print(f"# opdkit step, 8 prompts x 64 new tokens, median of steps 3-{args.steps}, 2 threads\n")
    print("| V | arm | rollout | student pass | teacher | update | step | TRL step (issue) | TRL / opdkit |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for V in args.vocab:
            student, teacher = build_pair(Path(tmp) / f"v{V}", V)
            for name, over in arms.items():
                over = {k: v for k, v in over.items() if v is not None}
                t = run(student, teacher, over, args.steps, Path(tmp) / f"run-{V}-{len(name)}")
                trl = TRL.get(V)
                vs = f"{trl} | {trl / t['time_step_s']:.2f}x" if trl else "— | —"
                print(f"| {V} | {name} | {t['time_rollout_s']:.3f} | {t['time_student_s']:.3f} | "
                      f"{t['time_teacher_s']:.3f} | {t['time_update_s']:.3f} | {t['time_step_s']:.3f} | {vs} |",
                      flush=True)


if __name__ == "__main__":
    main()
