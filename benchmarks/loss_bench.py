"""Benchmark: the support-set KL from hidden states, naive dense path vs ``support_kl_from_hidden``.

Measures forward + backward wall time and peak memory of

(a) the naive dense path a user would write without opdkit: ``logits = hidden @ weight.T`` (full
    ``[N, V]``), ``log_softmax`` over ``V``, gather at the K support ids, renormalised support KL;
(b) ``opdkit.losses.support_kl_from_hidden`` (gathers only the K support rows of ``weight``, chunked),

at Qwen2.5-0.5B-like sizes (V = 151936, H = 896, K = 32), and checks that both give the same loss
and the same gradients (of ``hidden`` and ``weight``). Run from the repository root:

    .venv/bin/python benchmarks/loss_bench.py                       # N = 2048 4096, float32, CPU
    .venv/bin/python benchmarks/loss_bench.py --tokens 1024 --repeats 1 --device cuda

Peak memory = the rise of allocated memory during one forward + backward over what was held before
(inputs, weights and the ``.grad`` buffers, which a warm-up iteration allocates first; the measured
iteration accumulates into them, as a trainer does). CUDA: ``torch.cuda.max_memory_allocated``.
CPU: the allocator events of ``torch.profiler`` (``profile_memory=True``): every "[memory]" event
carries the bytes allocated (> 0) or freed (< 0); sorted by time, their running sum is the memory
held at each instant, and its maximum is the peak rise. The script checks this method against a
known 100 MB allocation before measuring. Memory that libraries allocate outside torch's allocator
(e.g. oneDNN/MKL scratch buffers) is not seen on CPU.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opdkit.losses import support_kl_from_hidden

MiB = 1024.0**2
DEFAULT_CHUNK = inspect.signature(support_kl_from_hidden).parameters["chunk_size"].default  # None: per device


# --------------------------------------------------------------------------------------------------
# (a) The naive dense path, written out as a user would without opdkit.
# --------------------------------------------------------------------------------------------------
def naive_dense_support_kl(hidden, weight, support_ids, teacher_logprobs, mask):
    """Per-token KL(π̄‖q̄), π and q renormalised inside the K support ids, via full [N, V] logits."""
    logits = hidden @ weight.T  # [N, V]
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    student = logp.gather(-1, support_ids)  # [N, K]
    lp_s = student - torch.logsumexp(student, dim=-1, keepdim=True)  # renormalise inside the support
    lp_t = teacher_logprobs - torch.logsumexp(teacher_logprobs, dim=-1, keepdim=True)
    per_token = (lp_s.exp() * (lp_s - lp_t)).sum(-1)
    return per_token * mask


def naive_loss(d: Data) -> torch.Tensor:
    per_token = naive_dense_support_kl(d.hidden, d.weight, d.ids, d.teacher, d.mask.to(d.hidden.dtype))
    return per_token.sum() / d.mask.sum()


def fused_loss(d: Data, chunk_size: int, check_inputs: bool = True) -> torch.Tensor:
    per_token = support_kl_from_hidden(
        d.hidden, d.weight, d.ids, d.teacher, d.mask, chunk_size=chunk_size, check_inputs=check_inputs
    )
    return per_token.sum() / d.mask.sum()


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
@dataclass
class Data:
    hidden: torch.Tensor  # [N, H] leaf, requires grad
    weight: torch.Tensor  # [V, H] leaf, requires grad
    ids: torch.Tensor  # [N, K] int64, distinct per row
    teacher: torch.Tensor  # [N, K] teacher full-vocab log-probs at ids (<= 0)
    mask: torch.Tensor  # [N] bool


def make_data(N: int, V: int, H: int, K: int, dtype: torch.dtype, device: torch.device, seed: int) -> Data:
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float32)
    weight = torch.randn(V, H, generator=g, dtype=torch.float32) * 0.02
    # A random teacher: logits -> full-vocab log-softmax -> top-K (distinct ids, valid log-probs <= 0).
    ids, teacher = [], []
    for s in range(0, N, 256):
        n = min(256, N - s)
        t_logp = torch.log_softmax(torch.randn(n, V, generator=g) * 3.0, dim=-1)
        vals, idx = t_logp.topk(K, dim=-1)
        ids.append(idx)
        teacher.append(vals)
    mask = torch.rand(N, generator=g) < 0.95
    return Data(
        hidden=hidden.to(device=device, dtype=dtype).requires_grad_(True),
        weight=weight.to(device=device, dtype=dtype).requires_grad_(True),
        ids=torch.cat(ids).to(device),
        teacher=torch.cat(teacher).to(device=device, dtype=dtype),
        mask=mask.to(device),
    )


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rise_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak rise of allocated memory while ``fn`` runs, over what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    events.sort()
    held = peak = 0
    for _, _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def self_check_memory(device: torch.device) -> float:
    """The method must read ~100 MB for a 100 MB allocation (plus a freed temporary of 50 MB)."""

    def fn():
        big = torch.empty(25_000_000, dtype=torch.float32, device=device)  # 100,000,000 bytes
        big.fill_(1.0)
        del big
        tmp = torch.empty(12_500_000, dtype=torch.float32, device=device)  # 50 MB, freed: no effect
        del tmp

    rise = peak_rise_bytes(fn, device)
    if not (99_000_000 <= rise <= 101_000_000):
        raise RuntimeError(f"memory measurement self-check failed: 100 MB allocation read as {rise / 1e6:.1f} MB")
    return rise / 1e6


@dataclass
class Result:
    name: str
    N: int
    times_s: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    loss: float = float("nan")
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None

    @property
    def time_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu_times_s)


def bench(name: str, loss_fn: Callable[[Data], torch.Tensor], d: Data, repeats: int, keep_grads: bool) -> Result:
    device = d.hidden.device
    res = Result(name=name, N=d.hidden.shape[0])
    d.hidden.grad = None
    d.weight.grad = None

    def step() -> torch.Tensor:
        loss = loss_fn(d)
        loss.backward()
        return loss.detach()

    # Warm-up: allocates the .grad buffers; its gradients (into fresh .grad) are the exact gradients.
    res.loss = float(step())
    sync(device)
    if keep_grads:
        res.grad_hidden = d.hidden.grad.detach().clone()
        res.grad_weight = d.weight.grad.detach().clone()
    # Memory: one more iteration, accumulating into the existing .grad buffers.
    res.peak_bytes = peak_rise_bytes(step, device)
    # Time: median of `repeats` iterations.
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        res.times_s.append(time.perf_counter() - t0)
        res.cpu_times_s.append(time.process_time() - c0)
    print(
        f"    {name} N={res.N}: wall [s] "
        + " ".join(f"{t:.3f}" for t in res.times_s)
        + "; process CPU [s] "
        + " ".join(f"{t:.3f}" for t in res.cpu_times_s),
        flush=True,
    )
    d.hidden.grad = None
    d.weight.grad = None
    return res


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (elementwise relative error is meaningless where ref ~ 0)."""
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def compare(r: Result, ref: Result) -> tuple[float, float, float]:
    loss_rel = abs(r.loss - ref.loss) / max(abs(ref.loss), 1e-300)
    return loss_rel, max_rel(r.grad_hidden, ref.grad_hidden), max_rel(r.grad_weight, ref.grad_weight)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096], help="N values (default 2048 4096)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per case; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK,
        help="chunk size of the main comparison (default: the library default for the device: 256 on a CPU, "
        "1024 on a GPU)",
    )
    p.add_argument("--chunk-sizes", type=int, nargs="*", default=[256, 1024, 4096], help="chunk sizes of the sweep")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.chunk_size is None:  # the library's own choice for this device
        args.chunk_size = 256 if args.device == "cpu" else 1024

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    V, H, K = args.vocab, args.hidden, args.k
    tokens = sorted(args.tokens)
    t_start = time.perf_counter()

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}"
    print(f"# loss_bench: V={V} H={H} K={K} dtype={args.dtype} device={device} repeats={args.repeats}")
    print(
        f"# {dev_name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"python {platform.python_version()}"
    )
    mem_method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler [memory] events"
    print(f"# peak memory: {mem_method}; self-check, 100 MB allocation reads {self_check_memory(device):.2f} MB")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (timings assume an idle machine)")

    main_rows, sweep_rows, checks_rows = [], [], []
    peaks: dict[tuple[str, int], int] = {}
    ratio_at: dict[int, tuple[float, float, float]] = {}
    worst_rel = 0.0
    for N in tokens:
        torch.manual_seed(args.seed)
        d = make_data(N, V, H, K, dtype, device, args.seed + N)
        dense = bench("dense", naive_loss, d, args.repeats, keep_grads=True)
        print(f"  N={N} dense: {dense.time_s:.3f} s, peak {dense.peak_bytes / MiB:.1f} MiB", flush=True)
        fused_by_chunk: dict[int, Result] = {}
        cases = [(c, True) for c in sorted(set(args.chunk_sizes) | {args.chunk_size})]
        cases.append((args.chunk_size, False))
        for c, chk in cases:
            label = f"{c}" + ("" if chk else " (check_inputs=False)")
            r = bench(
                f"fused chunk={label}",
                lambda dd, c=c, chk=chk: fused_loss(dd, c, chk),
                d,
                args.repeats,
                keep_grads=True,
            )
            rel = compare(r, dense)
            r.grad_hidden = r.grad_weight = None
            if chk:
                fused_by_chunk[c] = r
            worst_rel = max(worst_rel, *rel)
            print(
                f"  N={N} fused chunk={label}: {r.time_s:.3f} s, peak {r.peak_bytes / MiB:.1f} MiB, "
                f"max rel diff loss {rel[0]:.2e} grad_h {rel[1]:.2e} grad_w {rel[2]:.2e}",
                flush=True,
            )
            sweep_rows.append(
                [
                    str(N),
                    label,
                    f"{r.time_s:.3f}",
                    f"{r.cpu_s:.3f}",
                    f"{r.peak_bytes / MiB:.1f}",
                    f"{dense.time_s / r.time_s:.1f}x",
                    f"{dense.cpu_s / r.cpu_s:.1f}x",
                    f"{dense.peak_bytes / r.peak_bytes:.1f}x",
                    f"{max(rel):.1e}",
                ]
            )
            if c == args.chunk_size and chk:
                checks_rows.append([str(N), f"{rel[0]:.1e}", f"{rel[1]:.1e}", f"{rel[2]:.1e}"])
        f = fused_by_chunk[args.chunk_size]  # the check_inputs=True run
        peaks[("dense", N)], peaks[("fused", N)] = dense.peak_bytes, f.peak_bytes
        ratio_at[N] = (dense.time_s / f.time_s, dense.peak_bytes / f.peak_bytes, dense.cpu_s / f.cpu_s)
        main_rows.append(
            [
                str(N),
                f"{dense.time_s:.3f}",
                f"{f.time_s:.3f}",
                f"{dense.time_s / f.time_s:.1f}x",
                f"{dense.cpu_s / f.cpu_s:.1f}x",
                f"{dense.peak_bytes / MiB:.1f}",
                f"{f.peak_bytes / MiB:.1f}",
                f"{dense.peak_bytes / f.peak_bytes:.1f}x",
            ]
        )
        del d, dense, fused_by_chunk, f

    print()
    print(
        f"Forward + backward, V={V}, H={H}, K={K}, {args.dtype}, {dev_name}, torch {torch.__version__}; "
        f"time = median of {args.repeats} (wall clock; CPU = process CPU time, less sensitive to other load); "
        "peak = rise over inputs + weights + .grad buffers."
    )
    print()
    print(f"Main comparison (support_kl_from_hidden at chunk_size={args.chunk_size}):")
    print()
    print(
        md_table(
            [
                "N tokens",
                "(a) dense time [s]",
                "(b) fused time [s]",
                "time a/b",
                "CPU time a/b",
                "(a) dense peak [MiB]",
                "(b) fused peak [MiB]",
                "memory a/b",
            ],
            main_rows,
        )
    )
    print()
    print("Max relative difference (b) vs (a): |loss_b - loss_a| / |loss_a|; max|g_b - g_a| / max|g_a| for grads:")
    print()
    print(md_table(["N tokens", "loss", "grad hidden", "grad weight"], checks_rows))
    print()
    print("Chunk-size sweep of support_kl_from_hidden (ratios against (a) at the same N):")
    print()
    print(
        md_table(
            [
                "N tokens",
                "chunk_size",
                "time [s]",
                "CPU time [s]",
                "peak [MiB]",
                "time a/b",
                "CPU time a/b",
                "memory a/b",
                "max rel diff",
            ],
            sweep_rows,
        )
    )
    print()

    # Target checks.
    n_hi = tokens[-1]
    speed = min(r[0] for r in ratio_at.values())
    print("Target checks:")
    print(
        f"  [{'MET' if speed >= 10 else 'MISSED'}] (b) at least 10x faster: "
        + ", ".join(f"{ratio_at[n][0]:.1f}x at N={n}" for n in tokens)
        + " (process CPU time: "
        + ", ".join(f"{ratio_at[n][2]:.1f}x" for n in tokens)
        + ")"
    )
    mem_hi = ratio_at[n_hi][1]
    print(f"  [{'MET' if mem_hi >= 5 else 'MISSED'}] at least 5x less peak memory at N={n_hi}: {mem_hi:.1f}x")
    if len(tokens) >= 2:
        n_lo = tokens[0]
        slope_a = (peaks[("dense", n_hi)] - peaks[("dense", n_lo)]) / (n_hi - n_lo)
        slope_b = (peaks[("fused", n_hi)] - peaks[("fused", n_lo)]) / (n_hi - n_lo)
        slope_ratio = slope_a / slope_b if slope_b > 0 else math.inf
        print(
            f"  [{'MET' if slope_ratio >= 20 else 'MISSED'}] peak memory grows at least 20x less per token: "
            f"(a) {slope_a / 1024:.1f} KiB/token, (b) {slope_b / 1024:.2f} KiB/token, ratio "
            + ("inf (b does not grow)" if math.isinf(slope_ratio) else f"{slope_ratio:.0f}x")
            + f" (N={n_lo}->{n_hi})"
        )
    else:
        print("  [SKIPPED] per-token memory slope needs two --tokens values")
    print(
        f"  [{'MET' if worst_rel <= 1e-5 else 'MISSED'}] results equal to 1e-5 relative: "
        f"max relative difference {worst_rel:.1e} (loss, grad hidden, grad weight; all N and chunk sizes)"
    )
    print(
        f"# total runtime {time.perf_counter() - t_start:.0f} s; load average at end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
