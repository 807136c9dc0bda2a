"""Multi-task training: the task schedule's order, and a run that alternates a math task and an environment
task, each scored by its own teacher, with per-task metrics and an environment evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from opdkit.config import load_config
from opdkit.data.prompts import PromptRecord
from opdkit.envs.base import EnvSpec
from opdkit.errors import OpdkitError
from opdkit.train.tasks import ALL, TaskSchedule


def _records(tasks: dict[str, int], env: set[str] = frozenset()) -> list[PromptRecord]:
    out = []
    for task, n in tasks.items():
        for i in range(n):
            spec = EnvSpec("scripted", {"first": f"{task} {i}", "goal": ["x"]}, task) if task in env else None
            out.append(PromptRecord(() if spec else ({"role": "user", "content": f"{task} {i}"},), None, task,
                                    env=spec))
    return out


def test_round_robin_alternates_tasks_and_each_task_keeps_its_own_order():
    sched = TaskSchedule(_records({"alf": 5, "math": 3}, {"alf"}), mode="round_robin", seed=1)
    assert [sched.group_of_step(s) for s in range(5)] == ["alf", "math", "alf", "math", "alf"]
    counters, seen = {}, {"alf": [], "math": []}
    for step in range(6):
        recs, positions, counters = sched.take(step, counters, 2)
        task = recs[0].task
        assert {r.task for r in recs} == {task}
        seen[task] += [r.messages or r.env.args["first"] for r in recs]
    assert counters == {"alf": 6, "math": 6}
    # each task's first epoch is a permutation of its records
    assert sorted(map(str, seen["alf"][:5])) == sorted(f"alf {i}" for i in range(5))
    # the same counters give the same records: what makes a resumed run take what the interrupted one would
    again = TaskSchedule(_records({"alf": 5, "math": 3}, {"alf"}), mode="round_robin", seed=1)
    assert again.take(4, {"alf": 4, "math": 4}, 2)[0] == sched.take(4, {"alf": 4, "math": 4}, 2)[0]


def test_weighted_sampling_follows_the_weights_and_depends_on_the_step_only():
    sched = TaskSchedule(_records({"a": 2, "b": 2}), mode="weighted", weights=["a=3", "b=1"], seed=0)
    draws = [sched.group_of_step(s) for s in range(4000)]
    assert abs(draws.count("a") / 4000 - 0.75) < 0.03
    assert draws == [sched.group_of_step(s) for s in range(4000)]
    with pytest.raises(OpdkitError, match="no weight for task"):
        TaskSchedule(_records({"a": 2, "b": 2}), mode="weighted", weights=["a=1"])
    with pytest.raises(OpdkitError, match="not a task"):
        TaskSchedule(_records({"a": 2, "b": 2}), mode="weighted", weights=["a=1", "b=1", "c=2"])
    with pytest.raises(OpdkitError, match="weight > 0"):
        TaskSchedule(_records({"a": 2, "b": 2}), mode="weighted", weights=["a=1", "b=0"])


def test_mixed_pools_one_kind_and_a_single_task_is_one_group():
    sched = TaskSchedule(_records({"a": 3, "b": 3}), mode="mixed", seed=0)
    assert not sched.multitask and sched.group_of_step(7) == ALL
    recs, _, counters = sched.take(0, {}, 6)
    assert {r.task for r in recs} == {"a", "b"} and counters == {ALL: 6}
    with pytest.raises(OpdkitError, match="both prompts and environments"):
        TaskSchedule(_records({"a": 2, "b": 2}, {"b"}), mode="mixed")
    with pytest.raises(OpdkitError, match="give each kind its own task"):
        TaskSchedule(_records({"a": 2}) + _records({"a": 1}, {"a"}), mode="round_robin")
    single = TaskSchedule(_records({"a": 4}), mode="round_robin", seed=3)
    assert not single.multitask  # one task: the plain single-task order


def test_a_two_step_multi_task_run_with_a_teacher_per_task(tmp_path, tiny_model_dirs):
    from opdkit.hf import load_causal_lm, load_tokenizer
    from opdkit.teacher.local import LocalTeacher
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps({"prompt": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(4)))
    games = tmp_path / "games.jsonl"
    games.write_text("".join(json.dumps({"env": "scripted", "task": "toy",
                                         "args": {"first": f"Room {i}. A key.", "goal": ["take key"]}}) + "\n"
                             for i in range(4)))
    cfg = load_config(None, {
        "model.path": str(tiny_model_dirs["qwen2"]), "teacher.path": str(tiny_model_dirs["llama"]),
        "teacher.per_task": [f"toy={tiny_model_dirs['qwen2']}"],
        "data.train_path": [f"math={math}", str(games)], "data.eval_path": str(games),
        "objective.top_k": 4, "rollout.max_new_tokens": 6, "rollout.n_samples": 2, "optim.prompts_per_step": 2,
        "optim.total_steps": 2, "optim.mini_batches": 1, "optim.lr": 1e-3, "run.tensorboard": False,
        "env.max_turns": 3, "env.max_turn_tokens": 5, "env.processes": 1, "eval.max_problems": 2,
        "run.save_every": 0, "run.precision": "fp32",
    })
    records = []
    trainer = Trainer(cfg, tmp_path / "run", progress=False, log=lambda _m: None)
    teachers = {name: LocalTeacher(load_causal_lm(d, dtype="float32").eval(), load_tokenizer(d), top_k=4)
                for name, d in (("llama", tiny_model_dirs["llama"]), ("qwen2", tiny_model_dirs["qwen2"]))}

    def on_step(step, metrics, tr):
        rec = tr.last_step
        # the step's own teacher, recomputed on the same batch before the update moved anything it depends on
        which = "qwen2" if metrics.get("task") == "toy" else "llama"
        expect = teachers[which].score(rec.batch)
        records.append((metrics["task"], rec, torch.equal(expect.support_ids_B_T_K, rec.signal.support_ids_B_T_K)
                        and torch.allclose(expect.teacher_logprobs_B_T_K, rec.signal.teacher_logprobs_B_T_K)))

    trainer.run(on_step=on_step)
    (t1, r1, same1), (t2, r2, same2) = records
    assert (t1, t2) == ("math", "toy") and same1 and same2
    assert r1.episodes is None and not any(r1.batch.turn_bounds)
    assert len(r2.episodes) == 4 and all(1 <= len(t) <= 3 for t in r2.batch.turn_bounds)
    rows = read_metrics(tmp_path / "run")
    assert [r["task"] for r in rows] == ["math", "toy"]
    assert "loss@math" in rows[0] and "episode_success@toy" in rows[1] and "episode_success" not in rows[0]
    assert 0.0 <= rows[1]["eval_games_success"] <= 1.0 and "eval_games_turns" in rows[1]


def test_environment_settings_without_environments_are_refused(tmp_path, tiny_model_dirs):
    from opdkit.train import Trainer

    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    cfg = load_config(None, {"model.path": str(tiny_model_dirs["qwen2"]), "teacher.path": str(tiny_model_dirs["llama"]),
                             "data.train_path": str(math), "env.max_turns": 3, "optim.prompts_per_step": 1,
                             "rollout.n_samples": 2, "run.tensorboard": False})
    with pytest.raises(OpdkitError, match="env.max_turns: set, but the training data holds no environment"):
        Trainer(cfg, tmp_path / "run", progress=False, log=lambda _m: None)


def test_a_teacher_for_an_unknown_task_is_refused(tmp_path, tiny_model_dirs):
    from opdkit.train import Trainer

    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2", "task": "a"}) + "\n"
                    + json.dumps({"prompt": "What is 2 + 1?", "answer": "3", "task": "b"}) + "\n")
    cfg = load_config(None, {"model.path": str(tiny_model_dirs["qwen2"]), "teacher.path": str(tiny_model_dirs["llama"]),
                             "data.train_path": str(math), "teacher.per_task": [f"c={tiny_model_dirs['qwen2']}"],
                             "optim.prompts_per_step": 1, "rollout.n_samples": 2, "run.tensorboard": False})
    with pytest.raises(OpdkitError, match="teacher.per_task: c is not a task"):
        Trainer(cfg, tmp_path / "run", progress=False, log=lambda _m: None)


def test_environment_settings_act_on_an_evaluation_of_games(tmp_path, tiny_model_dirs):
    """Prompts for training and a JSONL of games for evaluation: env.* shapes the evaluation episodes."""
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    games = tmp_path / "games.jsonl"
    games.write_text(json.dumps({"env": "scripted", "args": {"first": "A key.", "goal": ["take key"]}}) + "\n")
    cfg = load_config(None, {"model.path": str(tiny_model_dirs["qwen2"]), "teacher.path": str(tiny_model_dirs["llama"]),
                             "data.train_path": str(math), "data.eval_path": str(games), "env.max_turns": 2,
                             "env.max_turn_tokens": 3, "optim.prompts_per_step": 1, "rollout.n_samples": 2,
                             "rollout.max_new_tokens": 4, "optim.total_steps": 1, "run.tensorboard": False,
                             "run.save_every": 0})
    Trainer(cfg, tmp_path / "run", progress=False, log=lambda _m: None).run()
    (row,) = read_metrics(tmp_path / "run")
    assert row["eval_games_turns"] == 2  # the scripted game never ends on its own: env.max_turns did
