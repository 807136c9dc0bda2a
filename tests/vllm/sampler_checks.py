"""Checks of the vLLM rollout engine, run with the vLLM environment's Python by tests/vllm/test_vllm_sampler.py.

    .venv-vllm/bin/python -m tests.vllm.sampler_checks OUT_DIR

Each check asserts; the script prints one line per passed check and exits non-zero at the first failure.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

PAD: int | None = None


def reference_logprobs(model, ids: list[int], *, temperature: float, top_k: int, top_p: float,
                       blocked: int | None = None) -> torch.Tensor:
    """float64 log-probs ``[V]`` of the truncated, tempered next-token distribution after ``ids`` (HF's and
    vLLM's rule: temperature, then top-k (ties kept), then drop the ascending-cumsum <= 1 - p tail), with
    the ``blocked`` (pad) id never sampled."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double() / temperature
    if blocked is not None:
        logits[blocked] = float("-inf")
    if top_k:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    order = probs.argsort()
    cum = probs[order].cumsum(0)
    drop = cum <= 1 - top_p
    drop[-1] = False
    logits[order[drop]] = float("-inf")
    return logits.log_softmax(-1)


def main(out: Path) -> None:
    from opdkit.config import RolloutConfig, load_config
    from opdkit.rollout.vllm_sampler import VLLMSampler
    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer
    from tests.tiny_models import corpus
    from tests.vllm.env import build_vllm_tiny

    torch.manual_seed(0)
    tok = train_tokenizer(corpus(), vocab_size=400)
    sdir = build_vllm_tiny(tok, out / "student", seed=0, sharpen=4.0)
    from opdkit.hf import load_causal_lm

    model = load_causal_lm(sdir).double()
    global PAD
    PAD = tok.pad_token_id if tok.pad_token_id not in (tok.eos_token_id,) else None
    print(f"pad {tok.pad_token_id} eos {tok.eos_token_id}")
    settings = RolloutConfig(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=10, n_samples=2, stop_ids=[7])
    s = VLLMSampler(str(sdir), tok, settings, model=None, max_model_len=256, kv_cache_gb=0.25)
    prompts = [[{"role": "user", "content": f"What is {i} + {2 * i}?"}] for i in range(4)]

    # 1. a row's response depends on its seed only
    a = s.sample(prompts, seeds=list(range(100, 108)))
    b = s.sample(prompts[::-1], seeds=[106, 107, 104, 105, 102, 103, 100, 101])
    c = s.sample(prompts[2:3], n_samples=1, seeds=[105])
    def resp(batch, r):
        return batch.sampled_ids_B_T[r, : int(batch.response_mask_B_T[r].sum())].tolist()
    for r in range(8):
        assert resp(a, r) == resp(b, [6, 7, 4, 5, 2, 3, 0, 1][r]), f"row {r} changed with the batch order"
    assert resp(a, 5) == resp(c, 0)
    assert len({tuple(resp(a, r)) for r in range(8)}) > 4  # different seeds: different responses
    print("ok seeds: a row's response depends on its seed only")

    # 2-3. recorded log-probs are the truncated tempered distribution's; tokens only from the kept set
    worst, n = 0.0, 0
    for r in range(8):
        ids = a.input_ids_B_L[r][a.attention_mask_B_L[r].bool()].tolist()
        P = int(a.attention_mask_B_L[r, : a.prompt_len].sum())
        for t in range(len(ids) - P):
            ref = reference_logprobs(model, ids[: P + t], temperature=0.8, top_k=50, top_p=0.9, blocked=PAD)
            y = ids[P + t]
            assert math.isfinite(float(ref[y])), f"row {r} step {t}: token {y} is outside the top-k/top-p set"
            worst = max(worst, abs(float(ref[y]) - float(a.sampling_logprobs_B_T[r, t])))
            n += 1
    assert worst < 1e-4, worst
    assert torch.isnan(a.old_logprobs_B_T[a.response_mask_B_T.bool()]).all()
    print(f"ok log-probs: {n} recorded log-probs within {worst:.1e} of a float64 reference; all tokens kept")

    # multi-turn episodes through sample_tokens: the student's tokens of every turn, and only they, are in the
    # mask, each recorded log-prob that of the truncated distribution given the whole conversation before it
    from opdkit.envs.base import EnvSpec, PromptTemplate
    from opdkit.envs.episodes import EpisodeSettings, run_episodes
    from opdkit.envs.pool import EnvPool

    specs = [EnvSpec("scripted", {"first": f"Room {i}. A key.", "goal": ["take key"]}) for i in range(3)]
    with EnvPool(processes=0) as pool:
        ep, results = run_episodes(s, pool, specs, [1, 2, 3], template=PromptTemplate(system="Play."),
                                   settings=EpisodeSettings(max_turns=3, max_turn_tokens=6, max_tokens=256))
    worst, n = 0.0, 0
    for r, res in enumerate(results):
        assert len(ep.turn_bounds[r]) == res.turns >= 2
        ids = ep.input_ids_B_L[r][ep.attention_mask_B_L[r].bool()].tolist()
        P = int(ep.attention_mask_B_L[r, : ep.prompt_len].sum())
        inside = {t for a_, e_ in ep.turn_bounds[r] for t in range(a_, e_)}
        assert inside == set(torch.nonzero(ep.response_mask_B_T[r]).flatten().tolist())
        for t in sorted(inside):
            ref = reference_logprobs(model, ids[: P + t], temperature=0.8, top_k=50, top_p=0.9, blocked=PAD)
            worst = max(worst, abs(float(ref[ids[P + t]]) - float(ep.sampling_logprobs_B_T[r, t])))
            n += 1
    assert worst < 1e-4, worst
    print(f"ok episodes: {n} tokens of {sum(r.turns for r in results)} turns within {worst:.1e} of a float64 "
          "reference given the whole conversation")

    # distribution: 3000 one-token draws at one position against the reference (chi-square)
    one = VLLMSampler(str(sdir), tok, RolloutConfig(temperature=1.3, top_p=0.95, max_new_tokens=1, n_samples=1),
                      max_model_len=64, kv_cache_gb=0.25)
    draws = one.sample(prompts[:1] * 3000, seeds=list(range(3000))).sampled_ids_B_T[:, 0]
    ids0 = one.encode_prompts(prompts[:1])[0]
    ref = reference_logprobs(model, ids0, temperature=1.3, top_k=0, top_p=0.95, blocked=PAD).exp()
    keep = ref > 0
    counts = torch.bincount(draws, minlength=ref.numel()).double()
    assert counts[~keep].sum() == 0
    exp = 3000 * ref[keep]
    big = exp >= 5
    obs = torch.cat([counts[keep][big], counts[keep][~big].sum().view(1)])
    e = torch.cat([exp[big], exp[~big].sum().view(1)])
    if e[-1] < 5:
        obs, e = obs[:-1], e[:-1]
    chi2 = float(((obs - e) ** 2 / e).sum())
    dof = obs.numel() - 1
    from math import erf, sqrt

    z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / sqrt(2 / (9 * dof))  # Wilson-Hilferty
    p = 0.5 * (1 - erf(z / sqrt(2)))
    assert p > 1e-3, (chi2, dof, p)
    print(f"ok distribution: chi-square {chi2:.1f} on {dof} dof, p = {p:.3f} ({int(keep.sum())} kept tokens)")

    # 4. weight sync: the engine follows the trainer's weights
    m32 = load_causal_lm(sdir)
    s2 = VLLMSampler(str(sdir), tok, settings, model=m32, max_model_len=256, kv_cache_gb=0.25)
    s2.sample(prompts[:1], n_samples=1, seeds=[1])
    assert s2.syncs == 1
    with torch.no_grad():
        for prm in m32.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    d = s2.sample(prompts[:2], n_samples=1, seeds=[5, 6])
    assert s2.syncs == 2
    new = m32.double()
    worst = 0.0
    for r in range(2):
        ids = d.input_ids_B_L[r][d.attention_mask_B_L[r].bool()].tolist()
        P = int(d.attention_mask_B_L[r, : d.prompt_len].sum())
        for t in range(len(ids) - P):
            ref = reference_logprobs(new, ids[: P + t], temperature=0.8, top_k=50, top_p=0.9, blocked=PAD)
            worst = max(worst, abs(float(ref[ids[P + t]]) - float(d.sampling_logprobs_B_T[r, t])))
    assert worst < 1e-4, f"after a sync the engine's log-probs differ from the new weights' by {worst}"
    print(f"ok weight sync: after an update the engine's log-probs are the new weights' (within {worst:.1e})")

    # 5. stop id 7 and EOS end responses (the stop token kept); max_new_tokens -> length
    for r in range(8):
        row = resp(a, r)
        ends = [i for i, x in enumerate(row) if x in (7, *s.eos_ids)]
        if a.finish_reason[r] == "stop":
            assert ends == [len(row) - 1], (row, a.finish_reason[r])
        else:
            assert not ends and len(row) == 10
    print("ok stops: stop ids and EOS end a response (kept), else max_new_tokens")

    # refusals: a prompt past the engine's context; a model vLLM's CPU attention cannot run (head size 16)
    from opdkit.errors import InputError, OpdkitError

    short = VLLMSampler(str(sdir), tok, settings, max_model_len=24, kv_cache_gb=0.25)
    try:
        short.sample([[{"role": "user", "content": "a long question " * 10}]], n_samples=1, seeds=[0])
        raise AssertionError("a prompt longer than the context was sampled")
    except InputError as exc:
        assert "the vLLM engine holds at most 24" in str(exc), exc
    h16 = save_model_dir(build_tiny_model(tok, arch="qwen2", seed=9), tok, out / "h16")  # hidden 64, 4 heads
    try:
        VLLMSampler(str(h16), tok, settings, max_model_len=64, kv_cache_gb=0.25)
        raise AssertionError("a head size of 16 was accepted")
    except OpdkitError as exc:
        assert "rollout.engine=vllm: vLLM could not load or run" in str(exc) and "head_dim=16" in str(exc), exc
    print("ok refusals: a prompt past the context, a head size vLLM cannot run")

    # 6. a training run with rollout.engine=vllm
    from opdkit.train import Trainer
    from opdkit.train.metrics import read_metrics

    teacher = save_model_dir(build_tiny_model(tok, arch="llama", seed=3), tok, out / "teacher")
    cfg = load_config(None, {"model.path": str(sdir), "teacher.path": str(teacher), "rollout.engine": "vllm",
                             "rollout.vllm_kv_cache_gb": 0.25, "rollout.max_new_tokens": 8, "rollout.n_samples": 2,
                             "optim.prompts_per_step": 2, "optim.total_steps": 3, "optim.lr": 1e-2,
                             "objective.top_k": 8, "run.save_every": 0, "run.tensorboard": False,
                             "run.device": "cpu", "run.precision": "fp32"})
    lines: list[str] = []
    tr = Trainer(cfg, out / "run", prompts=prompts, progress=False, log=lines.append)
    before = {k: v.clone() for k, v in tr.c.lm.state_dict().items()}
    tr.run()
    rows = read_metrics(out / "run")
    assert len(rows) == 3 and all(math.isfinite(x["loss"]) for x in rows), rows
    assert any(not torch.equal(before[k], v) for k, v in tr.c.lm.state_dict().items())
    assert tr.c.sampler.syncs == 3, tr.c.sampler.syncs  # before each step's rollout (the first: the start weights)
    assert "π_old recomputed by a student pass" in " ".join(lines), lines[:3]
    print(f"ok training: 3 steps with rollout.engine=vllm, losses {[round(x['loss'], 4) for x in rows]}, "
          f"{tr.c.sampler.syncs} weight syncs")
    (out / "checks.json").write_text(json.dumps({"ok": True}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
