"""Training with a remote teacher (``teacher.url``) equals training with the same teacher loaded locally."""

from __future__ import annotations

import torch

from opdkit.config import load_config
from opdkit.train import Trainer
from tests.teacher.serving import served

PROMPTS = [[{"role": "user", "content": f"What is {a} * {b}?"}] for a in range(4) for b in range(4)]


def _cfg(dirs, **over):
    base = {
        "model.path": str(dirs["qwen2"]), "teacher.path": str(dirs["llama"]), "objective.top_k": 8,
        "rollout.max_new_tokens": 10, "rollout.n_samples": 2, "optim.prompts_per_step": 4,
        "optim.total_steps": 3, "optim.lr": 1e-2, "run.save_every": 1, "run.tensorboard": False,
        "objective.special_tokens": ["<|im_end|>"], "objective.drop_special_from_support": True,
        "rollout.temperature": 0.8,
    }
    base.update(over)
    return load_config(None, base)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.c.lm.state_dict().items()}


def test_remote_teacher_trains_to_the_same_weights(tmp_path, tiny_model_dirs):
    local = Trainer(_cfg(tiny_model_dirs), tmp_path / "local", prompts=PROMPTS, progress=False, log=lambda _m: None)
    local.run()
    with served(tiny_model_dirs["llama"]) as (url, _):
        cfg = _cfg(tiny_model_dirs, **{"teacher.path": None, "teacher.url": url})
        lines: list[str] = []
        remote = Trainer(cfg, tmp_path / "remote", prompts=PROMPTS, progress=False, log=lines.append)
        remote.run()
        a, b = _weights(local), _weights(remote)
        assert a.keys() == b.keys()
        changed = False
        for k in a:
            assert torch.equal(a[k], b[k]), k
            changed |= not torch.equal(a[k], _initial(tiny_model_dirs)[k])
        assert changed  # the runs trained: equality is not two untouched models

        # a run started with the local teacher resumes with the served one (same model: same digest)
        cfg2 = _cfg(tiny_model_dirs, **{"optim.total_steps": 4})
        Trainer(cfg2, tmp_path / "moved", prompts=PROMPTS, progress=False, log=lambda _m: None).run()
        # (4 steps with the local teacher as the reference; then 3 local + 1 remote after a resume)
        ref = _weights_of(tmp_path / "moved")
        part = Trainer(_cfg(tiny_model_dirs, **{"optim.total_steps": 3}), tmp_path / "part", prompts=PROMPTS,
                       progress=False, log=lambda _m: None)
        part.run()
        resumed = Trainer(_cfg(tiny_model_dirs, **{"optim.total_steps": 4, "teacher.path": None, "teacher.url": url}),
                          tmp_path / "part", prompts=PROMPTS, progress=False, log=lambda _m: None, resume=True)
        resumed.run()
        got = _weights(resumed)
        for k in ref:
            assert torch.equal(ref[k], got[k]), k


_INIT: dict = {}


def _initial(dirs):
    if not _INIT:
        from opdkit.hf import load_causal_lm

        _INIT.update(load_causal_lm(dirs["qwen2"]).state_dict())
    return _INIT


def _weights_of(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))
