"""Benchmark: teacher scoring of a rollout, naive full logits vs ``opdkit.teacher.LocalTeacher`` (chunked).

Scores B x T response tokens (default 8 x 1024, after left-padded prompts of up to 32 tokens) with a tiny
causal LM that has a real-size vocabulary (V = 151936, Qwen2.5's LM head; hidden 64, 2 layers), so the
LM head and the log-softmax over V dominate, as they do for a real teacher's memory:

(a) naive: ``model(input_ids, attention_mask, position_ids).logits`` (full ``[B, L, V]``), ``log_softmax``
    over V at the response positions, ``topk``, gather of the sampled token, log-sum-exp;
(b) ``LocalTeacher.score``: transformer body once, then LM head + log-softmax + top-K over ``chunk_size``
    response positions at a time (O(chunk_size x V) memory).

Both run under ``torch.no_grad``; the script checks that they return the same top-K ids and log-probs.
Peak memory = the rise of allocated memory during one scoring call over what was held before (weights,
inputs), measured as in ``benchmarks/loss_bench.py`` (whose ``peak_rise_bytes`` is imported: CUDA
``max_memory_allocated``; CPU: the running sum of ``torch.profiler`` allocator events, self-checked on a
known 100 MB allocation). Run from the repository root:

    .venv/bin/python benchmarks/teacher_bench.py                      # 8 x 1024, float32, CPU
    .venv/bin/python benchmarks/teacher_bench.py --batch 2 --response-len 256 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_bench import cpu_model, md_table, peak_rise_bytes, self_check_memory, sync  # noqa: E402
from opdkit.teacher import LocalTeacher, position_ids_from_mask  # noqa: E402
from opdkit.tiny import build_tiny_model, train_tokenizer  # noqa: E402
from opdkit.types import RolloutBatch  # noqa: E402

MiB = 1024.0**2


def naive_score(model, batch: RolloutBatch, k: int, temperature: float = 1.0):
    """What one writes without opdkit: full logits, log-softmax over V, top-K, gather."""
    out = model(
        input_ids=batch.input_ids_B_L,
        attention_mask=batch.attention_mask_B_L,
        position_ids=position_ids_from_mask(batch.attention_mask_B_L),
    )
    P, T = batch.prompt_len, batch.response_len
    logits = out.logits[:, P - 1 : P + T - 1].float()  # [B, T, V] (a view for a float32 model)
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    vals, ids = logp.topk(k, dim=-1)
    sampled = logp.gather(-1, batch.sampled_ids_B_T.unsqueeze(-1)).squeeze(-1)
    lse = logits[..., 0] - logp[..., 0]
    return ids, vals, sampled, lse


def make_batch(B: int, P: int, T: int, vocab: int, seed: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, P + T), generator=g)
    att = torch.ones(B, P + T, dtype=torch.long)
    for b in range(B):  # left padding: prompts of P/2 .. P tokens
        pad = int(torch.randint(0, P // 2 + 1, (1,), generator=g))
        ids[b, :pad] = 0
        att[b, :pad] = 0
    return RolloutBatch(
        input_ids_B_L=ids,
        attention_mask_B_L=att,
        prompt_len=P,
        response_mask_B_T=torch.ones(B, T, dtype=torch.long),
        sampled_ids_B_T=ids[:, P:].clone(),
        old_logprobs_B_T=torch.zeros(B, T),
        sampling_logprobs_B_T=torch.zeros(B, T),
        finish_reason=("length",) * B,
        prompt_index=tuple(range(B)),
    )


def measure(fn, device: torch.device, repeats: int):
    """(result of a warm-up call, peak rise in bytes, median time in s)."""
    with torch.no_grad():
        result = fn()  # warm-up, and the result compared below
        peak = peak_rise_bytes(fn, device)
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return result, peak, statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=256, help="chunk size of the main comparison (the default)")
    p.add_argument("--chunk-sizes", type=int, nargs="*", default=[64, 256, 1024], help="chunk sizes of the sweep")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-scale", type=float, default=20.0, help="LM-head weights are multiplied by this")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    B, T, P, V, K = args.batch, args.response_len, args.prompt_len, args.vocab, args.k
    t_start = time.perf_counter()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}"
    print(f"# teacher_bench: B={B} T={T} P={P} V={V} H={args.hidden} layers={args.layers} K={K} float32 "
          f"device={device} repeats={args.repeats}")
    print(f"# {dev_name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}")
    mem_method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler [memory] events"
    print(f"# peak memory: {mem_method}; self-check, 100 MB allocation reads {self_check_memory(device):.2f} MB")

    tok = train_tokenizer([f"the answer is {i} plus {i * 7} times {i % 13}" for i in range(200)], vocab_size=300)
    model = build_tiny_model(
        tok, hidden_size=args.hidden, num_layers=args.layers, vocab_size=V,
        max_position_embeddings=max(2048, P + T), seed=args.seed,
    )
    with torch.no_grad():  # a peaked, teacher-like distribution instead of a near-uniform random init (fewer ties)
        model.get_output_embeddings().weight.mul_(args.head_scale)
    model = model.to(device)
    batch = make_batch(B, P, T, V, args.seed).to(device)

    naive, naive_peak, naive_t, naive_times = measure(lambda: naive_score(model, batch, K), device, args.repeats)
    print(f"  naive: {naive_t:.3f} s ({' '.join(f'{t:.2f}' for t in naive_times)}), peak {naive_peak / MiB:.1f} MiB",
          flush=True)
    n_ids, n_vals, n_sampled, n_lse = naive

    rows, main_row, worst = [], None, 0.0
    for c in sorted(set(args.chunk_sizes) | {args.chunk_size}):
        teacher = LocalTeacher(model, top_k=K, chunk_size=c)
        sig, peak, t, times = measure(lambda teacher=teacher: teacher.score(batch), device, args.repeats)
        # ids may differ only where two tokens' log-probs tie to float32 rounding (swapped order); the
        # log-probs are compared slot by slot, so a swap of non-tied tokens would show in max abs diff.
        id_mismatch = int((sig.support_ids_B_T_K != n_ids).sum())
        diff = max(
            float((sig.teacher_logprobs_B_T_K - n_vals).abs().max()),
            float((sig.sampled_logprobs_B_T - n_sampled).abs().max()),
            float((sig.logsumexp_B_T - n_lse).abs().max()),
        )
        worst = max(worst, diff)
        print(f"  chunked chunk={c}: {t:.3f} s ({' '.join(f'{x:.2f}' for x in times)}), peak {peak / MiB:.1f} MiB, "
              f"id mismatches {id_mismatch}, max abs diff {diff:.1e}", flush=True)
        row = [str(c), f"{t:.3f}", f"{peak / MiB:.1f}", f"{naive_t / t:.2f}x", f"{naive_peak / peak:.1f}x",
               f"{id_mismatch}", f"{diff:.1e}"]
        rows.append(row)
        if c == args.chunk_size:
            main_row = (t, peak, id_mismatch, diff)

    t, peak, id_mismatch, diff = main_row
    print()
    print(f"Teacher scoring of {B} x {T} response tokens (prompts padded to {P}), V={V}, tiny body "
          f"(H={args.hidden}, {args.layers} layers), K={K}, float32, {dev_name}, torch {torch.__version__}; "
          f"time = median of {args.repeats}; peak = rise over weights + inputs.")
    print()
    print(md_table(
        ["scorer", "time [s]", "peak [MiB]"],
        [["(a) naive full logits", f"{naive_t:.3f}", f"{naive_peak / MiB:.1f}"],
         [f"(b) LocalTeacher, chunk_size={args.chunk_size}", f"{t:.3f}", f"{peak / MiB:.1f}"],
         ["ratio a/b", f"{naive_t / t:.2f}x", f"{naive_peak / peak:.1f}x"]],
    ))
    print()
    print("Chunk-size sweep (ratios against (a); 'id mismatches' = top-K ids differing from (a); "
          "max abs diff over top-K log-probs, sampled log-probs and log-sum-exp):")
    print()
    print(md_table(["chunk_size", "time [s]", "peak [MiB]", "time a/b", "memory a/b", "id mismatches", "max abs diff"],
                   rows))
    print()
    print("Target checks:")
    print(f"  [{'MET' if naive_peak / peak >= 10 else 'MISSED'}] at least 10x less peak memory at "
          f"chunk_size={args.chunk_size}: {naive_peak / peak:.1f}x")
    same = worst <= 1e-4
    print(f"  [{'MET' if same else 'MISSED'}] same results: top-K, sampled log-probs and log-sum-exp agree to "
          f"max abs diff {worst:.1e} over all chunk sizes (float32); {id_mismatch} of {B * T * K} top-K ids at "
          f"chunk_size={args.chunk_size} differ from (a), all swaps of tokens whose log-probs tie within that diff")
    print(f"# total runtime {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
