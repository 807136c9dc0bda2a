"""Benchmark: ``opdkit.rollout.HFSampler.sample`` vs calling the model's ``generate`` directly.

Both arms sample the same prompts with the same settings (temperature, top-p, top-k, pad suppressed,
the same EOS ids) on a tiny-but-not-trivial model built offline (a byte-level BPE trained to ~2000
tokens, a random-weight Qwen2 with hidden 256 and 4 layers). They sample the same distribution but not
the same tokens: the sampler draws each response with its own seeded uniform per step (so that a
response does not depend on its batch), ``generate`` with ``torch.multinomial`` on the global RNG; the
script prints the mean response length of each arm, since tokens/s is counted over generated tokens. The
sampler additionally renders the chat template, left-pads the prompts, makes its own draw per token,
records the untruncated and truncated log-prob of every sampled token and assembles a ``RolloutBatch``;
the direct arm gets pre-tokenised inputs and returns only the sequences. A third, informational arm is
``generate(output_scores=True, output_logits=True, return_dict_in_generate=True)``, the usual way to get
the same log-probs (it keeps two ``B x T x V`` float32 tensors). Arms are interleaved, ``--repeats``
rounds after a warm-up; reported: median tokens/s per arm and the median of per-round ratios.

    .venv/bin/python benchmarks/rollout_bench.py                     # CPU, batch 16, 64 new tokens
    .venv/bin/python benchmarks/rollout_bench.py --device cuda --batch 64 --new-tokens 256

Tokens = generated response tokens (up to and including the stop token), counted per arm.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from opdkit.config import RolloutConfig
from opdkit.rollout import HFSampler
from opdkit.tiny import build_tiny_model, train_tokenizer


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Varied pseudo-text (random words over syllables, numbers): enough for a ~2000-token BPE."""
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "ng", "st", "er", "an"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        text = " ".join(rng.choice(lexicon) for _ in range(rng.randint(5, 25)))
        out.append(f"What is {a} + {b}? {text}. The answer is \\boxed{{{a + b}}}.")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="sequences per generate call (prompts x n_samples)")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.batch % args.n_samples:
        ap.error("--batch must be a multiple of --n-samples")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tok = train_tokenizer(corpus(), vocab_size=args.vocab)
    model = build_tiny_model(
        tok,
        arch="qwen2",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=4 * args.hidden,
    ).to(device)
    settings = RolloutConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.new_tokens,
        n_samples=args.n_samples,
    )
    sampler = HFSampler(model, tok, settings)
    n_prompts = args.batch // args.n_samples
    qs = corpus(n_prompts, seed=1)
    prompts = [[{"role": "user", "content": q[: 20 + 15 * i]}] for i, q in enumerate(qs)]  # mixed lengths

    # the direct arm's inputs: the same left-padded prompt ids
    ref = sampler.sample(prompts, seed=0)
    P = ref.prompt_len
    prompt_ids, prompt_mask = ref.input_ids_B_L[:, :P].to(device), ref.attention_mask_B_L[:, :P].to(device)
    gen_kwargs = dict(
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.new_tokens,
        suppress_tokens=None if sampler.pad_id in sampler.eos_ids else [sampler.pad_id],
        eos_token_id=list(sampler.stop_ids),
        pad_token_id=sampler.pad_id,
    )
    stop_ids = torch.tensor(sampler.stop_ids, device=device)

    def count(seqs: torch.Tensor) -> int:
        resp = seqs[:, P:]
        T = resp.shape[1]
        steps = torch.arange(T, device=resp.device)
        first = torch.where(torch.isin(resp, stop_ids), steps, T).min(dim=1).values
        return int(torch.clamp(first + 1, max=T).sum())

    def arm_sampler(seed: int):
        batch = sampler.sample(prompts, seed=seed)
        return int(batch.response_mask_B_T.sum()), batch.sampled_ids_B_T

    def arm_generate(seed: int):
        torch.manual_seed(seed)
        seqs = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **gen_kwargs)
        return count(seqs), seqs[:, P:]

    def arm_generate_scores(seed: int):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **gen_kwargs,
        )
        return count(out.sequences), out.sequences[:, P:]

    arms = {
        "HFSampler.sample": arm_sampler,
        "model.generate": arm_generate,
        "generate+scores+logits": arm_generate_scores,
    }
    for fn in arms.values():  # warm-up
        fn(123)

    tps: dict[str, list[float]] = {name: [] for name in arms}
    lengths: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.repeats):
        for name, fn in arms.items():
            sync(device)
            t0 = time.perf_counter()
            n_tok, _ = fn(1000 + r)
            sync(device)
            tps[name].append(n_tok / (time.perf_counter() - t0))
            lengths[name].append(n_tok / args.batch)
    ratios = [s / g for s, g in zip(tps["HFSampler.sample"], tps["model.generate"], strict=True)]
    ratios_scores = [s / g for s, g in zip(tps["generate+scores+logits"], tps["model.generate"], strict=True)]

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\nrollout_bench: torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"model: qwen2 hidden {args.hidden}, {args.layers} layers, vocab {len(tok)}, {n_params / 1e6:.1f}M params; "
        f"batch {args.batch} ({n_prompts} prompts x {args.n_samples}), {args.new_tokens} new tokens, "
        f"T={args.temperature} top_p={args.top_p} top_k={args.top_k}; {args.repeats} interleaved rounds"
    )
    print(f"\n{'arm':<26}{'median tok/s':>14}{'min':>10}{'max':>10}{'ratio vs generate':>20}")
    for name in arms:
        v = tps[name]
        ratio = {"HFSampler.sample": statistics.median(ratios), "model.generate": 1.0}.get(
            name, statistics.median(ratios_scores)
        )
        print(f"{name:<26}{statistics.median(v):>14.0f}{min(v):>10.0f}{max(v):>10.0f}{ratio:>20.3f}")
    print(f"\nper-round ratios HFSampler/generate: {' '.join(f'{x:.3f}' for x in ratios)}")
    print("mean response length (tokens): " + ", ".join(f"{n} {statistics.mean(v):.1f}" for n, v in lengths.items()))


if __name__ == "__main__":
    main()
