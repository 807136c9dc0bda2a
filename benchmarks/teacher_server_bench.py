"""The teacher behind HTTP (``opdkit serve-teacher``): bytes on the wire, throughput, and a step's time split.

    .venv/bin/python benchmarks/teacher_server_bench.py            # V = 151,936, ~6 min on 2 cores

Setup: step_bench's tiny Qwen2 pair with the output rows padded to V = 151,936 (teacher hidden 256, 2 layers),
float32. The server runs in a child process on loopback with 1 torch thread; the clients are threads of this
process. All rows of a table are measured in this one run.

1. Bytes per scored response token of a real ``/v1/score`` answer (K = 32, 8 sequences x 64 response tokens,
   header included) against the bf16 logits a full-vocabulary teacher would send (2 V bytes).
2. Server throughput: C concurrent clients (1, 4, 16), each sending requests of 2 sequences x (24 prompt +
   64 response) tokens for a fixed time; scored tokens per second, requests per model call (cross-request
   merging), and the same batches scored by a ``LocalTeacher`` in this process with 1 thread as the reference.
3. A training step (step_bench's 8 prompts x 64 tokens, top-32 KL, 2 threads) with the teacher in the
   trainer's process and with it behind the server (its own process, 2 threads: the trainer waits while it
   scores), each trainer in a fresh process: median seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _batch(V: int, B: int, P: int, T: int, seed: int):
    import torch

    from opdkit.types import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(V, 300), (B, P + T), generator=g)
    att = torch.ones(B, P + T, dtype=torch.long)
    return RolloutBatch(ids, att, P, torch.ones(B, T, dtype=torch.bool), ids[:, P:].clone(), torch.zeros(B, T),
                        torch.zeros(B, T), ("length",) * B, tuple(range(B)))


def bytes_section(url: str, V: int) -> None:
    import httpx

    from opdkit.teacher.wire import ScoreParams, encode_request, signal_bytes_per_token

    b = _batch(V, 8, 24, 64, 0)
    body = encode_request(b, ScoreParams(top_k=32))
    r = httpx.post(f"{url}/v1/score", content=body, timeout=600)
    r.raise_for_status()
    n = int(b.response_mask_B_T.sum())
    per = len(r.content) / n
    print("## 1. bytes per scored response token (K = 32)\n")
    print("| what | bytes / token | vs bf16 logits |")
    print("|---|---:|---:|")
    print(f"| /v1/score answer, header included (8 x 64 tokens) | {per:.1f} | 1/{2 * V / per:.0f} |")
    print(f"| the same, payload only (32 int32 ids + 32 float32 log-probs + 2 floats) | "
          f"{signal_bytes_per_token(32)} | 1/{2 * V / signal_bytes_per_token(32):.0f} |")
    print(f"| the request, per response token (ids, masks; prompt included) | {len(body) / n:.1f} | — |")
    print(f"| full-vocabulary bf16 logits (V = {V}) | {2 * V} | 1 |\n", flush=True)


def throughput_section(url: str, teacher_dir: Path, V: int, seconds: float) -> None:
    import httpx
    import torch

    from opdkit.teacher import LocalTeacher
    from opdkit.teacher.remote import RemoteTeacher

    batches = [_batch(V, 2, 24, 64, s) for s in range(16)]
    tokens_per_req = int(batches[0].response_mask_B_T.sum())
    torch.set_num_threads(1)
    local = LocalTeacher.from_pretrained(teacher_dir, top_k=32)
    local.score(batches[0])
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        local.score(batches[n % len(batches)])
        n += 1
    local_tps = n * tokens_per_req / (time.perf_counter() - t0)
    print("## 2. server throughput (requests of 2 x 64 response tokens, K = 32; server: 1 thread)\n")
    print("| clients | tokens scored / s | requests / model call | vs LocalTeacher in-process (1 thread) |")
    print("|---:|---:|---:|---:|")
    print(f"| in-process LocalTeacher | {local_tps:.0f} | 1.00 | 1.00x |", flush=True)
    for clients in (1, 4, 16):
        before = httpx.get(f"{url}/health").json()["stats"]
        counts = [0] * clients
        stop_at = time.perf_counter() + seconds
        start = time.perf_counter()

        def client(c, counts=counts, stop_at=stop_at, clients=clients):
            remote = RemoteTeacher(url, top_k=32)
            i = c
            while time.perf_counter() < stop_at:
                remote.score(batches[i % len(batches)])
                counts[c] += 1
                i += clients

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        after = httpx.get(f"{url}/health").json()["stats"]
        reqs = after["requests"] - before["requests"]
        calls = after["model_calls"] - before["model_calls"]
        tps = sum(counts) * tokens_per_req / wall
        print(f"| {clients} | {tps:.0f} | {reqs / max(calls, 1):.2f} | {tps / local_tps:.2f}x |", flush=True)
    print()


def step_section(student: Path, teacher: Path, url: str, steps: int) -> None:
    from step_bench import STAGES, _subprocess_json

    print(f"## 3. one training step, local vs served teacher (8 prompts x 64 tokens, top-32 KL, median of steps "
          f"3-{steps})\n")
    print("| teacher | rollout [s] | student pass [s] | teacher [s] | update [s] | step [s] |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in (("in the trainer's process", {}),
                           ("served (opdkit serve-teacher, own process, 2 threads)",
                            {"teacher.path": None, "teacher.url": url})):
            out_json = Path(tmp) / f"{len(name)}.json"
            spec = {"student": str(student), "teacher": str(teacher), "over": over, "steps": steps,
                    "out": str(Path(tmp) / f"run{len(name)}"), "json": str(out_json)}
            r = _subprocess_json([sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--_arm",
                                  json.dumps(spec)], out_json)
            if r:
                print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in STAGES) + " |", flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seconds", type=float, default=20.0, help="per throughput row")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sections", type=int, nargs="*", default=[1, 2, 3])
    args = ap.parse_args()
    from tests.teacher.serving import served

    from step_bench import build_pair

    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = build_pair(Path(tmp), args.vocab, "tiny")
        print(f"# teacher server, tiny Qwen2 teacher at V = {args.vocab}\n")
        with served(teacher) as (url, _):  # 1 thread: the clients of section 2 have the other core
            if 1 in args.sections:
                bytes_section(url, args.vocab)
            if 2 in args.sections:
                throughput_section(url, teacher, args.vocab, args.seconds)
        if 3 in args.sections:
            with served(teacher, "--threads", "2") as (url, _):  # the trainer waits meanwhile: 2 threads
                step_section(student, teacher, url, args.steps)


if __name__ == "__main__":
    main()
