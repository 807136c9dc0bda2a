"""Benchmark: time per training step and peak memory, one process against two (``torchrun``, CPU, gloo).

The same run (same responses, same weights: see tests/train/test_distributed.py) three ways, on a tiny
Qwen2 student and Llama teacher built here (hidden 256, 4 layers, 2048 output rows):

- 1 process with 2 intra-op threads (the whole 2-core machine to one process),
- 2 processes with 1 thread each (``torchrun --nproc_per_node 2``),
- 1 process with 1 thread (the per-process work of the 2-process run, done alone).

Time per step is the median of ``time_step_s`` over the logged steps after the first; peak memory is each
process's maximum resident set size (``ru_maxrss``). Run from the repository root:

    .venv/bin/python benchmarks/multiprocess_bench.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = r'''
import json, resource, sys
from opdkit.config import load_config
from opdkit.train import Trainer
spec = json.load(open(sys.argv[1]))
t = Trainer(load_config(None, spec["overrides"]), spec["run_dir"], prompts=spec["prompts"], progress=False,
            log=lambda m: None)
t.run()
rank = t.c.dist.rank
json.dump({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
          open(f"{spec['run_dir']}/rss-{rank}.json", "w"))
'''


def build_models(root: Path) -> dict[str, str]:
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import corpus

    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer

    tok = train_tokenizer(corpus(), vocab_size=400)
    out = {}
    for i, arch in enumerate(("qwen2", "llama")):
        model = build_tiny_model(tok, arch=arch, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                 intermediate_size=512, vocab_size=2048, seed=i)
        out[arch] = str(save_model_dir(model, tok, root / arch))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="opdkit-mp-bench-"))
    dirs = build_models(root)
    prompts = [[{"role": "user", "content": f"What is {a} + {b}? Show the steps."}] for a in range(8) for b in range(8)]
    overrides = {
        "model.path": dirs["qwen2"], "teacher.path": dirs["llama"], "rollout.max_new_tokens": 32,
        "rollout.n_samples": 4, "optim.prompts_per_step": 8, "optim.total_steps": args.steps,
        "optim.mini_batches": 1, "optim.micro_batch_size": 8, "objective.top_k": 32, "optim.lr": 1e-4,
        "run.save_every": 0, "run.tensorboard": False, "run.device": "cpu",
    }
    worker = root / "worker.py"
    worker.write_text(WORKER)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rows = []
    for label, nproc, threads in (("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1),
                                  ("1 process x 1 thread", 1, 1)):
        run_dir = root / f"run-{nproc}-{threads}"
        spec = root / f"spec-{nproc}-{threads}.json"
        spec.write_text(json.dumps({"overrides": overrides, "prompts": prompts, "run_dir": str(run_dir)}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), str(worker), str(spec)],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:])
            return 1
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(m["time_step_s"] for m in metrics[1:])
        parts = {k: statistics.median(m[k] for m in metrics[1:])
                 for k in ("time_rollout_s", "time_student_s", "time_teacher_s", "time_update_s")}
        rss = [json.loads((run_dir / f"rss-{i}.json").read_text())["maxrss_kib"] / 1024 for i in range(nproc)]
        rows.append((label, step_s, parts, rss, metrics[-1]["loss"]))
        print(f"{label}: {step_s:.3f} s/step, peak RSS per process {', '.join(f'{x:.0f}' for x in rss)} MiB",
              flush=True)
    base = rows[0][1]
    print("\n| setup | s / step | rollout | student pass | teacher | update | vs 1 x 2 threads | peak RSS / process "
          "[MiB] | loss at the last step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, step_s, parts, rss, loss in rows:
        print(f"| {label} | {step_s:.3f} | {parts['time_rollout_s']:.3f} | {parts['time_student_s']:.3f} | "
              f"{parts['time_teacher_s']:.3f} | {parts['time_update_s']:.3f} | {base / step_s:.2f}x | "
              f"{' / '.join(f'{x:.0f}' for x in rss)} | {loss:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
