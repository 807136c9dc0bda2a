"""Thread count from the cores a process may use: affinity, cgroup quota (v1 and v2), processes per machine."""

from __future__ import annotations

import os

import torch

from opdkit.threads import _cgroup_quota, available_cores, configure_threads


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(v1) is None
    assert _cgroup_quota(tmp_path / "missing") is None


def test_available_cores_is_capped_by_the_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: still one thread
    assert available_cores(tmp_path) == 1
    assert available_cores(tmp_path / "none") == len(os.sched_getaffinity(0))


def test_configure_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 * available_cores()))  # more processes than cores
        assert configure_threads(0) == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert configure_threads(0) == available_cores()
    finally:
        torch.set_num_threads(before)


def test_run_threads_reaches_torch(tmp_path, tiny_model_dirs):
    from opdkit.config import load_config
    from opdkit.train import Trainer

    before = torch.get_num_threads()
    try:
        cfg = load_config(None, {
            "model.path": str(tiny_model_dirs["qwen2"]), "teacher.path": str(tiny_model_dirs["llama"]),
            "objective.top_k": 4, "optim.total_steps": 1, "run.tensorboard": False, "run.threads": 1,
        })
        said = []
        Trainer(cfg, tmp_path / "run", prompts=[[{"role": "user", "content": "hi"}]], progress=False, log=said.append)
        assert torch.get_num_threads() == 1 and any("1 CPU thread(s) each" in m for m in said)
    finally:
        torch.set_num_threads(before)
