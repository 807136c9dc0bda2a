"""Nucleus (top-p) truncation and a whole sampling step: transformers (a full sort per row) against opdkit
(no sort of V), side by side in one run, at a real vocabulary.

    .venv/bin/python benchmarks/topp_bench.py                 # V = 151,936, batch 8, ~1 min
    .venv/bin/python benchmarks/topp_bench.py --vocab 32000 --batch 64

Logit shapes: ``peaked`` (one dominant token); ``zipf-*`` (a language model's next-token shape: the r-th
most likely token has logit -a log r plus noise, a = 3.0, 1.6, 1.2: nuclei of a few, tens and thousands of
tokens); ``flat`` (Gaussian logits with sd 3: thousands of tokens); ``random-model`` (sd 0.05, what a
random-weight model gives: nearly the whole vocabulary in the nucleus).

Columns: transformers' ``TopPLogitsWarper``; opdkit's ``FastTopPLogitsWarper`` (the warper's kept set token for
token: where its float32 rounding could decide, it sorts like the warper); ``top_p_keep(...,
match_rounding=False)``, the exact (float64) nucleus the sampler uses; then one sampling step as each does it
— transformers: warper, softmax, ``torch.multinomial``; opdkit: ``opdkit.rollout.draw.draw_step`` (which
also records π_old, the entropy, the log-normaliser and the truncated log-prob, and blocks a pad token).
The warper-exact set is checked equal to the warper's on every input, and the exact nucleus's differences
from it are counted.
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
    if kind == "random-model":
        return 0.05 * torch.randn(B, V, generator=g)
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

    from opdkit.rollout.draw import draw_step
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
    seeds = torch.arange(args.batch)
    print(f"# top-p {args.top_p}, V = {args.vocab}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    print("| logits | nucleus size (mean) | transformers warper ms | opdkit warper-exact ms | speed-up | "
          "opdkit exact nucleus ms | speed-up | tokens differing from the warper | transformers sampling step ms | "
          "opdkit draw_step ms | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def hf_step(x):
        probs = torch.softmax(hf(None, x.clone()), -1)
        return torch.multinomial(probs, 1)

    for kind in ("peaked", "zipf-steep", "zipf", "zipf-wide", "flat", "random-model"):
        x = logits(kind, args.batch, args.vocab, g)
        ref = ~torch.isinf(hf(None, x.clone()))
        keep = top_p_keep(x, args.top_p)
        assert torch.equal(keep, ref), kind
        exact = top_p_keep(x, args.top_p, match_rounding=False)
        t_hf = median_time(lambda x=x: hf(None, x.clone()), args.repeats)
        t_fast = median_time(lambda x=x: fast(None, x), args.repeats)
        t_exact = median_time(lambda x=x: top_p_keep(x, args.top_p, match_rounding=False), args.repeats)
        t_hf_step = median_time(lambda x=x: hf_step(x), args.repeats)
        t_draw = median_time(lambda x=x: draw_step(x, seeds_B=seeds, step=0, top_p=args.top_p, block_id=3),
                             args.repeats)
        print(f"| {kind} | {keep.sum(-1).float().mean():.0f} | {1e3 * t_hf:.1f} | {1e3 * t_fast:.1f} | "
              f"{t_hf / t_fast:.1f}x | {1e3 * t_exact:.1f} | {t_hf / t_exact:.1f}x | {int((exact != ref).sum())} | "
              f"{1e3 * t_hf_step:.1f} | {1e3 * t_draw:.1f} | {t_hf_step / t_draw:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
