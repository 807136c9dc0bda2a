"""The command line, run as a user runs it (a subprocess on the installed console script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _opdkit(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("opdkit", path=str(Path(sys.executable).parent)) or "opdkit"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_config_prints_the_resolved_tree_with_overrides(tmp_path):
    r = _opdkit("config", "configs/demo.yaml", "objective.top_k=8", "rollout.top_p=0.95")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["objective"]["top_k"] == 8 and resolved["rollout"]["top_p"] == 0.95
    out = tmp_path / "resolved.yaml"
    written = _opdkit("config", "configs/demo.yaml", "objective.top_k=8", "rollout.top_p=0.95", "--out", str(out))
    assert written.returncode == 0, written.stderr
    again = _opdkit("config", str(out))
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == resolved


@pytest.mark.parametrize(
    "args, needle",
    [
        (("config", "objective.topk=3"), "objective.top_k"),
        (("config", "rollout.top_p=1.5"), "rollout.top_p"),
        (("config", "no/such/file.yaml"), "no/such/file.yaml"),
    ],
)
def test_config_errors_are_one_clear_line(args, needle):
    r = _opdkit(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_toy_demo_runs_and_reports_every_objective():
    r = _opdkit("demo", "--toy", "--steps", "3")
    assert r.returncode == 0, r.stderr
    for label in ("sampled-token OPD", "renormalised", "tail bucket"):
        assert label in r.stdout


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.fail("ruff is not installed in the test environment (it is a dev extra)")
    r = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_command_reports_on_real_model_directories(tiny_model_dirs):
    r = _opdkit("check", "--student", str(tiny_model_dirs["qwen2"]), "--teacher", str(tiny_model_dirs["llama"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT" in r.stdout
    missing = _opdkit("check", "--student", "/no/such/dir", "--teacher", str(tiny_model_dirs["llama"]))
    assert missing.returncode == 2 and "/no/such/dir" in missing.stderr and "Traceback" not in missing.stderr


def test_analyze_commands(tmp_path):
    out = tmp_path / "var"
    r = _opdkit("analyze", "variance", "--out", str(out), "--T", "2,3", "--K", "1,2", "--gammas", "0,1",
                "--n-estimates", "10", "--samples-per-estimate", "50", "--no-plot")
    assert r.returncode == 0, r.stderr
    assert (out / "variance.csv").exists() and "gamma=1" in r.stdout
    bad = _opdkit("analyze", "run", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr and "Traceback" not in bad.stderr
