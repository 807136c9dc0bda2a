"""Benchmark: the full-vocabulary reverse KL (``objective.kind: full_reverse_kl``), three ways.

Forward + backward of ``Σ_v π(v) [log π(v) − log q(v)]`` at N response positions, from the student's
hidden states ``[N, H]`` and LM-head weight ``[V, H]`` against the teacher's full log-probs ``[N, V]``:

(a) dense, unchunked: ``logits = hidden @ weight.T`` (full ``[N, V]``) then ``full_reverse_kl`` — what a
    trainer without chunking does (TRL's full-vocabulary KL);
(b) the old opdkit path: the support KL from hidden states with the whole vocabulary as the support
    (``support_kl_from_hidden`` with ``K = V``), which gathers ``[chunk, V, H]`` rows of the weight;
(c) opdkit's ``FullReverseKL`` objective: chunked dense logits, each chunk recomputed in the backward pass
    (memory ``O(chunk x V)``).

Run from the repository root:

    .venv/bin/python benchmarks/full_kl_bench.py     # V = 2048 (H 128, N 512); V = 151936 (H 896, N 512 and 2048)

Peak memory is measured as in ``loss_bench.py`` (the rise of torch-allocated memory during one forward +
backward, from the profiler's allocator events on CPU). A configuration whose first allocation would exceed
``--max-gib`` is not run and the table says how much it would need.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import md_table, peak_rise_bytes, self_check_memory  # noqa: E402
from opdkit.losses import full_reverse_kl, support_kl_from_hidden  # noqa: E402
from opdkit.modeling import OutputHead  # noqa: E402
from opdkit.objectives import FullReverseKL, LossInputs  # noqa: E402

MiB = 1024.0**2


def make(N, V, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.02)
    teacher = torch.log_softmax(3 * torch.randn(N, V, generator=g), -1)
    mask = torch.ones(N, dtype=torch.bool)
    return hidden, head, teacher, mask


def dense(hidden, head, teacher, mask, chunk):
    return full_reverse_kl(hidden @ head.weight.T, teacher, mask).sum() / mask.sum()


def old_gather(hidden, head, teacher, mask, chunk):
    N, V = teacher.shape
    ids = torch.arange(V).expand(N, V)
    return support_kl_from_hidden(hidden, head.weight, ids, teacher, mask, chunk_size=chunk).sum() / mask.sum()


def chunked(hidden, head, teacher, mask, chunk):
    N, V = teacher.shape
    obj = FullReverseKL.__new__(FullReverseKL)
    obj.temperature, obj.chunk_size = 1.0, chunk
    x = LossInputs(mask[None], torch.zeros(1, N, dtype=torch.long), torch.zeros(1, N), torch.zeros(1, N),
                   torch.arange(V).expand(1, N, V), teacher[None], torch.zeros(1, N))
    per, _ = obj.per_token(OutputHead(head), hidden[None], x, ppo=False)
    return per.sum() / mask.sum()


def run(fn, data, chunk, repeats):
    hidden, head, teacher, mask = data

    def step():
        loss = fn(hidden, head, teacher, mask, chunk)
        loss.backward()
        return float(loss)

    loss = step()  # warm-up allocates the .grad buffers
    peak = peak_rise_bytes(step, torch.device("cpu"))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    hidden.grad = None
    head.weight.grad = None
    return loss, statistics.median(times), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="N at V = 151936 (512 at V = 2048)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256, help="positions per chunk for (b) and (c)")
    ap.add_argument("--max-gib", type=float, default=16.0)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory self-check "
          f"{self_check_memory(torch.device('cpu')):.1f} MB for 100 MB")
    rows = []
    for V, H, N in [(2048, 128, 512)] + [(151936, 896, n) for n in args.tokens]:
        data = make(N, V, H)
        results = {}
        for name, fn in (("dense", dense), ("old", old_gather), ("chunked", chunked)):
            # the largest single buffer each path asks for, in bytes (float32)
            need = {"dense": N * V * 4, "old": min(args.chunk, N) * V * H * 4, "chunked": args.chunk * V * 4}[name]
            if need > args.max_gib * 1024**3:
                results[name] = None
                print(f"V={V} N={N}: {name}: not run, one buffer alone is {need / 1024**3:.1f} GiB", flush=True)
                continue
            results[name] = run(fn, data, args.chunk, args.repeats) + (need,)
            print(f"V={V} N={N}: {name}: loss {results[name][0]:.6f}, {results[name][1]:.3f} s, "
                  f"peak {results[name][2] / MiB:.0f} MiB", flush=True)
        c = results["chunked"]
        for name, label in (("dense", "(a) dense, unchunked"), ("old", "(b) old: support KL with K = V"),
                            ("chunked", "(c) FullReverseKL, chunked")):
            r = results[name]
            if r is None:
                need = {"dense": N * V * 4, "old": min(args.chunk, N) * V * H * 4}[name]
                rows.append([str(V), str(H), str(N), label, "not run", f"needs {need / 1024**3:.0f} GiB at once"]
                            + [""] * 3)
                continue
            rows.append([str(V), str(H), str(N), label, f"{r[1]:.3f}", f"{r[2] / MiB:.0f}", f"{r[1] / c[1]:.2f}x",
                         f"{r[2] / max(c[2], 1):.2f}x", f"{abs(r[0] - c[0]) / abs(c[0]):.1e}"])
    print()
    print(md_table(["V", "H", "N", "path", "time [s]", "peak [MiB]", "time / (c)", "memory / (c)", "loss rel. diff"],
                   rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
