"""A training run for the multi-process tests: ``torchrun --nproc_per_node N tests/train/dist_worker.py SPEC``.

SPEC is a JSON file: ``{"overrides": {...}, "prompts": [...], "run_dir": DIR, "resume": bool}``, optionally
``"die_after_step": N, "die_rank": R`` (process R kills itself with SIGKILL once step N is logged). The run is a
real ``Trainer``; the only additions are observers: one on the optimizer's ``step`` that records the
gradient of every trainable parameter before the first optimizer step (rank 0 writes them to
``RUN_DIR/grads.safetensors``), and one that lists the student module's forward passes of each process
(``RUN_DIR/forwards-RANK.json``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def observe_first_grads(trainer) -> dict:
    """A dict that, once the trainer has run, holds every trainable parameter's gradient as it was just
    before the first optimizer step (an observer wrapped around the optimizer's ``step``)."""
    grads: dict = {}
    opt = trainer.c.optimizer
    step = opt.step

    def observed_step(*args, **kwargs):
        if not grads:
            for name, p in trainer.student.named_parameters():
                if p.grad is not None:
                    grads[name] = p.grad.detach().clone()
        return step(*args, **kwargs)

    opt.step = observed_step
    return grads


def main(spec_path: str) -> None:
    from safetensors.torch import save_file

    from opdkit.config import load_config
    from opdkit.train import Trainer

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(None, spec["overrides"])
    trainer = Trainer(cfg, spec["run_dir"], prompts=spec["prompts"], resume=spec.get("resume", False),
                      progress=False, log=lambda _m: None)
    grads = observe_first_grads(trainer)
    student = trainer.c.accelerator.unwrap_model(trainer.c.module)
    forward, calls = student.forward, []

    def counted_forward(fn, *args, **kwargs):  # which student passes this process ran, in order
        calls.append(getattr(fn, "__name__", "?"))
        return forward(fn, *args, **kwargs)

    student.forward = counted_forward

    def on_step(step, metrics, tr):  # a process that dies at a chosen moment (as a real crash would)
        if step == spec.get("die_after_step") and tr.c.dist.rank == spec.get("die_rank", 0):
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.run(on_step=on_step)
    rank = trainer.c.dist.rank
    (Path(spec["run_dir"]) / f"forwards-{rank}.json").write_text(json.dumps(calls))
    if trainer.c.dist.is_main and grads:
        save_file({k: v.contiguous() for k, v in grads.items()}, str(Path(spec["run_dir"]) / "grads.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
