"""Run ``opdkit serve-teacher`` in a child process for a test (real HTTP on loopback)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time


@contextlib.contextmanager
def served(model_dir, *args: str, port: int = 0, timeout_s: float = 120.0):
    """Yield ``(url, process)`` of a teacher server on 127.0.0.1 (``port`` 0: any free port); stop it after."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "opdkit.cli", "serve-teacher", "--model", str(model_dir), "--port", str(port),
         "--threads", "1", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = _wait_listening(proc, timeout_s)
        yield url, proc
    finally:
        stop(proc)


def _wait_listening(proc, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"teacher server exited {proc.returncode}:\n{''.join(lines)}")
            continue
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return m.group(1)
    raise RuntimeError(f"teacher server did not start in {timeout_s} s:\n{''.join(lines)}")


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()
