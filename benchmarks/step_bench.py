"""A full training step (rollout, student pass, teacher, update) of opdkit, side by side with TRL's.

    .venv/bin/python benchmarks/step_bench.py                          # tiny pair, V = 2,048 and 151,936
    .venv/bin/python benchmarks/step_bench.py --shape qwen2-0.5b --steps 4 --vocab 151936
    bash benchmarks/trl_env.sh                                         # once: TRL in .venv-trl (for the TRL rows)

Issue 11's setup: a Qwen2 student and teacher with random weights, the output rows padded to V (the
tokenizer has ~400 tokens, as Qwen2.5's checkpoints pad theirs), 8 prompts x 1 sample x 64 new tokens per
step, τ 1, top-p 0.9, lr 1e-5, float32, 2 threads. ``--shape tiny``: student hidden 128 / 2 layers, teacher
hidden 256 / 2 layers. ``--shape qwen2-0.5b``: the student has Qwen2-0.5B's shape (hidden 896, 24 layers,
14 heads, 2 KV heads, MLP 4864, tied embeddings; 494M parameters at V = 151,936), the teacher the tiny one.

Arms: opdkit with the teacher top-32 KL (π_old from the sampler, this version's default), the same with
π_old recomputed by a teacher-forced pass, `full_reverse_kl`; and TRL 1.16's `DistillationTrainer`
(full-vocabulary reverse KL, on-policy) when ``.venv-trl`` exists (``benchmarks/trl_step.py``). Every arm runs
in its own process on the same saved pair; reported: median seconds per stage over steps 3.. (steps 2..
with ``--steps`` < 5), and the process's peak resident memory (``ru_maxrss``: weights, optimizer state,
activations, allocator caches — the same measure for every arm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("time_rollout_s", "time_student_s", "time_teacher_s", "time_update_s", "time_step_s")
ARMS = {
    "top-32 KL, π_old from the sampler": {},
    "top-32 KL, π_old recomputed": {"rollout.old_logprobs": "recompute"},
    "full_reverse_kl": {"objective.kind": "full_reverse_kl"},
}
SHAPES = {  # student, teacher: build_tiny_model keyword arguments
    "tiny": ({"hidden_size": 128, "num_layers": 2, "intermediate_size": 256},
             {"hidden_size": 256, "num_layers": 2, "intermediate_size": 512}),
    "qwen2-0.5b": ({"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2,
                    "intermediate_size": 4864, "tie_word_embeddings": True},
                   {"hidden_size": 256, "num_layers": 2, "intermediate_size": 512}),
}
PROMPTS = [[{"role": "user", "content": f"Compute {a} + {b} and explain."}] for a in range(10) for b in range(10)]


def build_pair(root: Path, vocab: int, shape: str = "tiny") -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import corpus

    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer

    tok = train_tokenizer(corpus(), vocab_size=400)
    s_kw, t_kw = SHAPES[shape]
    student = build_tiny_model(tok, vocab_size=vocab, seed=0, **s_kw)
    teacher = build_tiny_model(tok, vocab_size=vocab, seed=1, **t_kw)
    return save_model_dir(student, tok, root / "student"), save_model_dir(teacher, tok, root / "teacher")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_arm(spec: dict) -> dict:
    """In a fresh process: train ``spec["steps"]`` steps with ``spec["over"]``; medians and peak RSS."""
    from opdkit.config import load_config
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    base = {"model.path": spec["student"], "teacher.path": spec["teacher"], "rollout.max_new_tokens": 64,
            "rollout.n_samples": 1, "rollout.top_p": 0.9, "optim.prompts_per_step": 8, "optim.mini_batches": 1,
            "optim.micro_batch_size": 8, "optim.lr": 1e-5, "optim.total_steps": spec["steps"],
            "run.save_every": 0, "run.tensorboard": False, "objective.top_k": 32, "run.threads": 2}
    over = dict(spec["over"])
    if over.get("objective.kind") == "full_reverse_kl":
        base.pop("objective.top_k")
    cfg = load_config(None, {**base, **over})
    Trainer(cfg, Path(spec["out"]), prompts=PROMPTS, progress=False, log=lambda _m: None).run()
    rows = read_metrics(Path(spec["out"]))
    skip = 2 if spec["steps"] >= 5 else 1
    out = {k: statistics.median(r[k] for r in rows[skip:]) for k in STAGES}
    out["tokens"] = statistics.median(r["response_length"] for r in rows[skip:])
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _subprocess_json(cmd: list[str], out_json: Path) -> dict | None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out_json.exists():
        print(f"  (failed: {' '.join(cmd[:3])} ... exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out_json.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="*", default=[2048, 151936])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--arms", nargs="*", default=[*ARMS, "trl"], help="subset of the arm names, 'trl'")
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--_arm", help=argparse.SUPPRESS)  # internal: run one opdkit arm (a JSON spec)
    args = ap.parse_args()
    if args._arm:
        spec = json.loads(args._arm)
        Path(spec["json"]).write_text(json.dumps(run_arm(spec)))
        return
    arms = [a for a in args.arms if a in ARMS or a == "trl"]
    have_trl = Path(args.trl_python).exists()
    first = 3 if args.steps >= 5 else 2
    print(f"# one training step, {args.shape} pair, 8 prompts x 64 new tokens, median of steps {first}-{args.steps}, "
          f"2 threads; each arm in its own process\n")
    print("| V | arm | rollout [s] | student pass [s] | teacher [s] | update [s] | step [s] | peak RSS [MiB] | "
          "TRL step / this step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for V in args.vocab:
            student, teacher = build_pair(Path(tmp) / f"v{V}", V, args.shape)
            results: dict[str, dict | None] = {}
            for i, name in enumerate(arms):
                out_json = Path(tmp) / f"arm-{V}-{i}.json"
                if name == "trl":
                    if not have_trl:
                        continue
                    cmd = [args.trl_python, str(ROOT / "benchmarks" / "trl_step.py"), "--student", str(student),
                           "--teacher", str(teacher), "--steps", str(args.steps), "--json", str(out_json)]
                    r = _subprocess_json(cmd, out_json)
                    if r is not None:
                        gen = r.get("gen_s")
                        r = {"time_step_s": statistics.median(r["step_s"][first - 1:]),
                             "peak_rss_mib": r["peak_rss_mib"],
                             "time_rollout_s": statistics.median(gen[first - 1:]) if gen else None}
                else:
                    spec = {"student": str(student), "teacher": str(teacher), "over": ARMS[name],
                            "steps": args.steps, "out": str(Path(tmp) / f"run-{V}-{i}"), "json": str(out_json)}
                    r = _subprocess_json([sys.executable, __file__, "--_arm", json.dumps(spec)], out_json)
                results[name] = r
            trl = (results.get("trl") or {}).get("time_step_s")
            for name in arms:
                r = results.get(name)
                if r is None:
                    continue
                label = "TRL 1.16 DistillationTrainer" if name == "trl" else f"opdkit, {name}"
                cells = [f"{r[k]:.3f}" if r.get(k) is not None else "—" for k in STAGES]
                if name == "trl":
                    cells[1:4] = ["—", "—", "—"]
                ratio = f"{trl / r['time_step_s']:.2f}x" if trl else "—"
                print(f"| {V} | {label} | {' | '.join(cells)} | {r['peak_rss_mib']:.0f} | {ratio} |", flush=True)
    if not have_trl and "trl" in arms:
        print(f"\n(TRL rows skipped: no {args.trl_python}; `bash benchmarks/trl_env.sh` creates it.)")


if __name__ == "__main__":
    main()
