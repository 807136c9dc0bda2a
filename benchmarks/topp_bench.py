"""Nucleus (top-p) truncation: transformers' TopPLogitsWarper (a full sort per row) against opdkit's
sort-free FastTopPLogitsWarper, side by side in one run, at a real vocabulary.

    .venv/bin/python benchmarks/topp_bench.py                 # V = 151,936, batch 8, ~1 min
    .venv/bin/python benchmarks/topp_bench.py --vocab 32000 --batch 64

Logit shapes: ``peaked`` (one dominant token); ``zipf-*`` (a language model's next-token shape: the r-th
most likely token has logit -a log r plus noise, a = 3.0, 1.6, 1.2: nuclei of a few, tens and thousands of
tokens); ``flat`` (Gaussian logits with sd 3: thousands of tokens, the partial selection's worst case).
Both processors are checked to keep the same tokens on every input before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


ZIPF = {"zipf-steep": 3.0, "zipf": 1.6, "zipf-wide": 1.2}  # logit = -a log(rank): the nucleus grows as a falls


def logits(kind: str, B: int, V: int, g: torch.Generator) -> torch.Tensor:
    if kind in ZIPF:
        ranks = torch.stack([torch.randperm(V, generator=g) for _ in range(B)]).float() + 1
        return -ZIPF[kind] * torch.log(ranks) + 0.3 * torch.randn(B, V, generator=g)
    if kind == "peaked":
        x = torch.randn(B, V, generator=g)
        x[:, 0] += 20
        return x
    return 3 * torch.randn(B, V, generator=g)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    from opdkit.rollout.nucleus import FastTopPLogitsWarper, top_p_keep

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hf, fast = TopPLogitsWarper(args.top_p), FastTopPLogitsWarper(args.top_p)
    print(f"# top-p {args.top_p}, V = {args.vocab}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    print("| logits | nucleus size (mean) | transformers ms | opdkit ms | speed-up |")
    print("|---|---|---|---|---|")
    for kind in ("peaked", "zipf-steep", "zipf", "zipf-wide", "flat"):
        x = logits(kind, args.batch, args.vocab, g)
        keep = top_p_keep(x, args.top_p)
        assert torch.equal(keep, ~torch.isinf(hf(None, x.clone()))), kind
        t_hf = median_time(lambda x=x: hf(None, x), args.repeats)
        t_fast = median_time(lambda x=x: fast(None, x), args.repeats)
        print(f"| {kind} | {keep.sum(-1).float().mean():.0f} | {1e3 * t_hf:.1f} | {1e3 * t_fast:.1f} | "
              f"{t_hf / t_fast:.1f}x |")


if __name__ == "__main__":
    main()
