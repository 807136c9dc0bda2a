"""The demo pipeline end to end with tiny settings (the real sizes run in `make demo`)."""

from __future__ import annotations

import json

from opdkit.config import load_config
from opdkit.demo.run import demo_config, run_demo
from tests.demo.test_models import TINY_SETTINGS

FAST = [
    "optim.total_steps=2",
    "optim.prompts_per_step=2",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=8",
    "objective.top_k=4",
    "eval.every_steps=1",
    "run.tensorboard=false",
]


def test_demo_compare_writes_summary_table_and_plots(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, compare=True, cache_dir=tmp_path / "cache", overrides=FAST, settings=TINY_SETTINGS,
                       log=lambda _m: None)
    written = json.loads((out / "demo_summary.json").read_text())
    assert written == summary
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= written[key] <= 1.0
    assert written["wall_seconds"] > 0
    assert set(written["compare"]) == {"support_kl", "support_kl_no_renorm", "sampled_token", "off_policy_sft"}
    assert (out / "compare.md").exists() and (out / "compare.png").exists()
    assert (out / "support_kl" / "plots" / "loss.png").exists()
    rows = [json.loads(line) for line in (out / "support_kl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_accuracy"] is not None for r in rows] == [True, True]


def test_shipped_demo_config_is_the_packaged_one():
    assert load_config("configs/demo.yaml") == demo_config()


def test_off_policy_targets_are_the_teachers_finished_samples():
    from opdkit.demo.run import teacher_sample_problems
    from opdkit.demo.task import make_problems

    probs = make_problems(3, 0, "train")
    out = teacher_sample_problems(probs, ["a", "b", "c"], [True, False, True])
    assert [p.solution for p in out] == ["a", "c"]
    assert [p.prompt for p in out] == [probs[0].prompt, probs[2].prompt]
    assert all(p.solution != q.solution for p, q in zip(out, (probs[0], probs[2])))
