"""Multi-process training for real: ``torchrun --nproc_per_node 2`` on CPU (gloo), against one process.

A run does not depend on the number of processes: the same responses are sampled (per-trajectory seeds),
cut into the same mini-batches, and the gradient is normalised by the whole mini-batch's token count, so 1
and 2 processes reach the same weights, up to float32 summation order (the all-reduce adds per-process
partial gradients). The gradients of the first optimizer step agree to a relative 1e-4, and so does every
logged metric of every step. The weights after 3 AdamW steps at lr 1e-2 (which move weights by up to ~5e-2)
agree to 1e-3: AdamW divides each gradient by its own running magnitude, so weights whose gradients are
tiny amplify summation-order noise. For scale, one process with micro-batch size 3 against micro-batch
size 1, the same 3 steps, measured a largest weight difference of 2.9e-4; 1 against 2 processes, 4.7e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opdkit.train.metrics import METRICS, read_metrics

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a in range(4) for b in range(4)]
WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[2]
NOT_COMPARED = {k for k in METRICS if k.startswith("time_")} | {"tokens_per_s"}


def _overrides(dirs, **over):
    base = {
        "model.path": str(dirs["qwen2"]), "teacher.path": str(dirs["llama"]), "objective.top_k": 8,
        "rollout.max_new_tokens": 8, "rollout.n_samples": 2, "optim.prompts_per_step": 4,
        "optim.total_steps": 3, "optim.mini_batches": 2, "optim.micro_batch_size": 3, "optim.lr": 1e-2,
        "run.save_every": 2, "run.tensorboard": False, "optim.warmup_steps": 2,  # lr steps once per update
    }
    base.update(over)
    return base


def _run(tmp_path: Path, name: str, overrides: dict, nproc: int, *, resume=False, expect_ok=True, **extra):
    spec = {"overrides": overrides, "prompts": PROMPTS, "run_dir": str(tmp_path / name), "resume": resume, **extra}
    spec_file = tmp_path / f"{name}-{int(resume)}.json"
    spec_file.write_text(json.dumps(spec))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), str(WORKER), str(spec_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == expect_ok, r.stderr[-4000:]
    return tmp_path / name


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _grads(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "grads.safetensors"))


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in rows]


def _assert_rows_close(a, b, rel=1e-4):
    assert len(a) == len(b)
    for ra, rb in zip(_comparable(a), _comparable(b), strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-6), (ra["step"], k, ra[k], rb[k])
            else:
                assert ra[k] == rb[k], (ra["step"], k)


def test_two_processes_reach_the_weights_of_one(tmp_path, tiny_model_dirs):
    bench = tmp_path / "bench.jsonl"  # evaluation on two benchmarks, dealt to the processes
    bench.write_text("".join(json.dumps({"problem": f"What is {a} + 2?", "answer": str(a + 2)}) + "\n"
                             for a in range(5)))
    over = _overrides(tiny_model_dirs, **{"data.eval_path": [f"sums={bench}", "demo"], "eval.every_steps": 2,
                                          "eval.max_problems": 3, "eval.n_samples": 2, "eval.max_new_tokens": 6})
    one = _run(tmp_path, "one", over, 1)
    two = _run(tmp_path, "two", over, 2)
    # same responses (the counts of these fractions are exact), same logged metrics, same gradients, same weights
    _assert_rows_close(read_metrics(one), read_metrics(two))
    evaluated = [r for r in read_metrics(two) if "eval_accuracy" in r]
    assert [r["step"] for r in evaluated] == [2, 3]  # every 2 steps and after the last
    assert all({"eval_sums_accuracy", "eval_demo_accuracy", "eval_no_answer_rate"} <= r.keys() for r in evaluated)
    g1, g2 = _grads(one), _grads(two)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7)
    w0 = _weights_of(tiny_model_dirs["qwen2"])
    w1, w2 = _weights(one), _weights(two)
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1)
    assert moved > 1e-3  # training did move the weights
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3
    # one process wrote the run directory, and the checkpoint holds both processes' RNG states
    ckpt = two / "checkpoints" / "step-000002"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()


def _weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_a_killed_two_process_run_resumes_exactly(tmp_path, tiny_model_dirs):
    """Process 1 dies (SIGKILL) after step 3; torchrun stops the other; the last checkpoint is step 2.
    Resuming with 2 processes ends exactly where an uninterrupted run does."""
    over = _overrides(tiny_model_dirs, **{"optim.total_steps": 4})
    straight = _run(tmp_path, "straight", over, 2)
    run = _run(tmp_path, "killed", over, 2, expect_ok=False, die_after_step=3, die_rank=1)
    assert len(read_metrics(run)) == 3 and not (run / "final").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000002"]
    _run(tmp_path, "killed", over, 2, resume=True)
    _assert_rows_close(read_metrics(straight), read_metrics(run), rel=1e-6)
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preempting_torchrun_stops_both_processes_after_the_same_step(tmp_path, tiny_model_dirs):
    """SIGTERM to torchrun (a cluster's preemption): it forwards the signal, both processes finish the step,
    save it and exit; resuming with 2 processes ends where an uninterrupted run does."""
    import signal
    import time

    over = _overrides(tiny_model_dirs, **{"optim.total_steps": 30, "run.save_every": 0})
    straight = _run(tmp_path, "straight", over, 2)
    spec = {"overrides": over, "prompts": PROMPTS, "run_dir": str(tmp_path / "pre")}
    (tmp_path / "pre.json").write_text(json.dumps(spec))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "pre.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "pre"
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(run)) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    done = len(read_metrics(run))
    assert 2 <= done < 30 and [c.name for c in (run / "checkpoints").iterdir()] == [f"step-{done:06d}"]
    _run(tmp_path, "pre", over, 2, resume=True)
    _assert_rows_close(read_metrics(straight), read_metrics(run), rel=1e-6)
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_processes_with_unequal_shares_run_their_forward_passes_in_lockstep(tmp_path, tiny_model_dirs):
    """5 responses over 2 processes (3 and 2 rows) with micro-batches of 2: both processes still run the same
    sequence of student forward passes (what FSDP, which gathers parameters inside each forward, needs)."""
    over = _overrides(tiny_model_dirs, **{"optim.prompts_per_step": 5, "rollout.n_samples": 1,
                                         "optim.mini_batches": 1, "optim.micro_batch_size": 2,
                                         "optim.total_steps": 2, "rollout.old_logprobs": "recompute"})
    run = _run(tmp_path, "uneven", over, 2)
    f0 = json.loads((run / "forwards-0.json").read_text())
    f1 = json.loads((run / "forwards-1.json").read_text())
    assert f0 == f1 and f0.count("student_pass") == 4 and f0.count("fn") == 4
    # pi_old from the sampler (the float32 default on a CPU): no student pass at all, still in lockstep
    fast = _run(tmp_path, "uneven-sampler", {**over, "rollout.old_logprobs": "auto"}, 2)
    g0 = json.loads((fast / "forwards-0.json").read_text())
    assert g0 == json.loads((fast / "forwards-1.json").read_text()) and g0.count("student_pass") == 0
    _assert_rows_close(read_metrics(fast), read_metrics(run), rel=1e-3)
    one = _run(tmp_path, "uneven1", over, 1)
    _assert_rows_close(read_metrics(one), read_metrics(run))


def test_a_two_process_multi_task_run_with_episodes_equals_one_process(tmp_path, tiny_model_dirs):
    """Math batches and text-game episodes in turn, each process playing its share of the episodes in its own
    worker pool: the same episodes, metrics and weights as one process."""
    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                            for a in range(6)))
    games = tmp_path / "games.jsonl"
    games.write_text("".join(json.dumps({"env": "scripted", "task": "toy", "args": {
        "first": f"Room {i}. A key.", "goal": ["take key"], "replies": {"look": "A key."}}}) + "\n" for i in range(6)))
    over = _overrides(tiny_model_dirs, **{
        "data.train_path": [f"math={math}", str(games)], "env.max_turns": 3, "env.max_turn_tokens": 5,
        "env.processes": 1, "data.eval_path": str(games), "eval.max_problems": 3, "eval.n_samples": 2})
    one = _run(tmp_path, "one", over, 1, prompts=None)
    two = _run(tmp_path, "two", over, 2, prompts=None)
    rows1, rows2 = read_metrics(one), read_metrics(two)
    assert [r["task"] for r in rows1] == ["math", "toy", "math"]
    assert "episode_turns@toy" in rows1[1] and "eval_games_success" in rows1[-1]
    _assert_rows_close(rows1, rows2)
    w1, w2 = _weights(one), _weights(two)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3


@pytest.mark.parametrize("setting", [
    {"objective.support": "teacher_topp", "objective.support_top_p": 0.02},  # support_size, capped_frac
    {"objective.kind": "sampled_token", "rollout.top_p": 0.5, "objective.topp_correction": "sequence"},
], ids=["nucleus", "topp_correction"])
def test_two_processes_log_the_nucleus_and_topp_metrics_of_one(tmp_path, tiny_model_dirs, setting):
    """The per-position metrics of nucleus supports and the top-p correction are reduced over processes: the
    same values (and weights) with two processes as with one."""
    over = _overrides(tiny_model_dirs, **{"optim.total_steps": 2, "run.save_every": 0, **setting})
    rows1, rows2 = read_metrics(_run(tmp_path, "one", over, 1)), read_metrics(_run(tmp_path, "two", over, 2))
    logged = ({"support_size", "support_size_capped_frac"} if "objective.support" in setting else {"topp_weight"})
    assert all(logged | {"rollout_tail_mass"} <= r.keys() for r in rows1)
    _assert_rows_close(rows1, rows2)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3
