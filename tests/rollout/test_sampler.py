"""The student sampler: shapes, masks, finish reasons, log-probs, the sampled distribution, seeds, errors."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from opdkit.config import RolloutConfig
from opdkit.errors import InputError
from opdkit.hf import ModelLoadError
from opdkit.rollout import HFSampler
from opdkit.types import FINISH_LENGTH, FINISH_STOP

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 * 31? Think first."}],
    [{"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module")
def samplers(tiny_model_dirs):
    return {arch: HFSampler.from_pretrained(path, RolloutConfig()) for arch, path in tiny_model_dirs.items()}


def _with(sampler: HFSampler, **settings) -> HFSampler:
    return HFSampler(sampler.model, sampler.tokenizer, replace(sampler.settings, **settings))


def _real_prompt(batch, b):
    P = batch.prompt_len
    return batch.input_ids_B_L[b, :P][batch.attention_mask_B_L[b, :P].bool()]


def _check_structure(batch, sampler: HFSampler, max_new_tokens: int, n_prompts: int, n: int):
    B, T = batch.sampled_ids_B_T.shape
    P = batch.prompt_len
    assert B == n_prompts * n
    assert batch.prompt_index == tuple(i for i in range(n_prompts) for _ in range(n))
    assert 1 <= T <= max_new_tokens
    assert batch.input_ids_B_L.shape == (B, P + T) == batch.attention_mask_B_L.shape
    for t in (batch.response_mask_B_T, batch.old_logprobs_B_T, batch.sampling_logprobs_B_T):
        assert t.shape == (B, T)
    assert torch.equal(batch.input_ids_B_L[:, P:], batch.sampled_ids_B_T)
    assert torch.equal(batch.attention_mask_B_L[:, P:], batch.response_mask_B_T)
    stop_set = set(sampler.stop_ids)
    for b in range(B):
        m = batch.response_mask_B_T[b]
        n_resp = int(m.sum())
        assert n_resp >= 1
        assert torch.all(m[:n_resp] == 1) and torch.all(m[n_resp:] == 0)  # a prefix of ones
        assert torch.all(batch.sampled_ids_B_T[b, n_resp:] == sampler.pad_id)
        assert torch.all(batch.old_logprobs_B_T[b, n_resp:] == 0)
        assert torch.all(batch.sampling_logprobs_B_T[b, n_resp:] == 0)
        assert torch.all(batch.old_logprobs_B_T[b, :n_resp] < 0)
        assert torch.all(torch.isfinite(batch.sampling_logprobs_B_T[b, :n_resp]))
        # the prompt is left padded: a suffix of ones
        pm = batch.attention_mask_B_L[b, :P]
        n_prompt = int(pm.sum())
        assert torch.all(pm[P - n_prompt :] == 1) and torch.all(pm[: P - n_prompt] == 0)
        resp = batch.sampled_ids_B_T[b, :n_resp].tolist()
        if sampler.pad_id not in sampler.eos_ids:
            assert sampler.pad_id not in resp
        if batch.finish_reason[b] == FINISH_STOP:
            assert resp[-1] in stop_set or sampler.settings.stop
        else:
            assert batch.finish_reason[b] == FINISH_LENGTH
            assert n_resp == max_new_tokens
        assert not any(t in stop_set for t in resp[:-1])  # nothing stops before the end


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shapes_masks_finish_reasons_mixed_lengths(samplers, arch):
    base = samplers[arch]
    # many stop ids so that some responses stop and some run to the length limit
    sampler = _with(base, max_new_tokens=10, top_p=0.95, stop_ids=list(range(40, 70)))
    batch = sampler.sample(CHAT_PROMPTS, n_samples=4, seed=1)
    _check_structure(batch, sampler, 10, len(CHAT_PROMPTS), 4)
    assert set(batch.finish_reason) == {FINISH_STOP, FINISH_LENGTH}
    lens = {int(batch.attention_mask_B_L[b, : batch.prompt_len].sum()) for b in range(batch.batch_size)}
    assert len(lens) == 3  # mixed prompt lengths, left padded
    # each row's prompt is exactly its chat-rendered prompt
    encoded = sampler.encode_prompts(CHAT_PROMPTS)
    for b in range(batch.batch_size):
        assert _real_prompt(batch, b).tolist() == encoded[batch.prompt_index[b]]


def test_raw_string_prompts(samplers):
    sampler = _with(samplers["llama"], max_new_tokens=5)
    batch = sampler.sample(["What is", "The answer is 12 and"], n_samples=2, seed=0, chat=False, task_ids=["a", "b"])
    _check_structure(batch, sampler, 5, 2, 2)
    assert batch.task_ids == ("a", "a", "b", "b")
    assert len(sampler.decode(batch)) == 4


def _reference_logprobs(model, batch, temperature, top_k, top_p, blocked):
    """Dense float64 teacher-forced recomputation, one unpadded sequence at a time."""
    m64 = copy.deepcopy(model).double()
    old, samp, in_nucleus = [], [], []
    for b in range(batch.batch_size):
        prompt = _real_prompt(batch, b)
        n_resp = int(batch.response_mask_B_T[b].sum())
        resp = batch.sampled_ids_B_T[b, :n_resp]
        ids = torch.cat([prompt, resp])[None]
        with torch.no_grad():
            logits = m64(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # predicts resp
        z = logits / temperature
        old.append(torch.log_softmax(z, -1).gather(-1, resp[:, None])[:, 0])
        z = z.clone()
        z[:, blocked] = -math.inf
        if top_k:
            kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
            z = torch.where(z < kth, torch.full_like(z, -math.inf), z)
        if top_p < 1:
            probs = torch.softmax(z, -1)
            sp, order = torch.sort(probs, dim=-1, descending=True)
            mass_before = torch.cumsum(sp, -1) - sp  # probability of strictly more likely tokens
            keep_sorted = mass_before < top_p
            keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
            z = torch.where(keep, z, torch.full_like(z, -math.inf))
        lp = torch.log_softmax(z, -1)
        samp.append(lp.gather(-1, resp[:, None])[:, 0])
        in_nucleus.append(torch.isfinite(samp[-1]).all())
    return old, samp, all(in_nucleus)


@pytest.mark.parametrize(
    ("arch", "temperature", "top_k", "top_p"),
    [("qwen2", 0.7, 0, 0.9), ("llama", 1.0, 40, 0.8), ("qwen2", 1.3, 25, 1.0)],
)
def test_logprobs_match_float64_recomputation(samplers, arch, temperature, top_k, top_p):
    base = samplers[arch]
    sampler = _with(base, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=[50, 51])
    batch = sampler.sample(CHAT_PROMPTS, n_samples=3, seed=7)
    blocked = [] if sampler.pad_id in sampler.eos_ids else [sampler.pad_id]
    old, samp, in_nucleus = _reference_logprobs(sampler.model, batch, temperature, top_k, top_p, blocked)
    assert in_nucleus
    for b in range(batch.batch_size):
        n = len(old[b])
        torch.testing.assert_close(batch.old_logprobs_B_T[b, :n].double(), old[b], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.sampling_logprobs_B_T[b, :n].double(), samp[b], atol=1e-5, rtol=0)
    # truncation (and blocking pad) only renormalises over fewer tokens: log-probs can only go up
    m = batch.response_mask_B_T.bool()
    assert torch.all(batch.sampling_logprobs_B_T[m] >= batch.old_logprobs_B_T[m] - 1e-6)


def test_model_generation_config_defaults_are_ignored(samplers):
    """A checkpoint's generation_config.json (Qwen2.5: top_k 20, repetition penalty 1.05, ...) must not leak in."""
    base = samplers["qwen2"]
    model = copy.deepcopy(base.model)
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.top_k = 2
    model.generation_config.temperature = 0.1
    model.generation_config.suppress_tokens = list(range(60, 200))
    sampler = HFSampler(model, base.tokenizer, replace(base.settings, max_new_tokens=8, temperature=1.0, top_p=1.0))
    batch = sampler.sample(CHAT_PROMPTS, n_samples=2, seed=3)
    old, samp, _ = _reference_logprobs(model, batch, 1.0, 0, 1.0, [sampler.pad_id])
    for b in range(batch.batch_size):
        n = len(old[b])
        torch.testing.assert_close(batch.old_logprobs_B_T[b, :n].double(), old[b], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.sampling_logprobs_B_T[b, :n].double(), samp[b], atol=1e-5, rtol=0)
    assert model.generation_config.top_k == 2  # restored after sampling


# ----------------------------------------------------------------------------------- known distribution
def _fixed_logits_model(tokenizer, logits):
    """A real Llama whose lm_head is replaced by a zero-weight Linear with bias: the same logits everywhere."""
    from opdkit.tiny import build_tiny_model

    model = build_tiny_model(tokenizer, arch="llama", seed=0)
    head = torch.nn.Linear(model.config.hidden_size, len(logits), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(logits)
    model.lm_head = head
    return model.eval()


def _known_logits(tokenizer, pad_logit=4.0):
    V = len(tokenizer)
    g = torch.Generator().manual_seed(0)
    z = torch.full((V,), -12.0)
    favoured = torch.randperm(V - 10, generator=g)[:12] + 10  # avoid the special tokens
    z[favoured] = torch.linspace(0.0, 3.0, 12)
    z[tokenizer.pad_token_id] = pad_logit  # the most likely token: must never be sampled
    return z, favoured


def _chi2_critical(dof: int, z: float = 3.29) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.29: p ~ 0.0005)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 0.9), (0.7, 0, 0.8), (1.5, 6, 0.95)])
def test_sampled_frequencies_match_truncated_distribution(tiny_tokenizer, temperature, top_k, top_p):
    z, _ = _known_logits(tiny_tokenizer)
    model = _fixed_logits_model(tiny_tokenizer, z)
    settings = RolloutConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1, n_samples=3000)
    sampler = HFSampler(model, tiny_tokenizer, settings)
    batch = sampler.sample(["x"], chat=False, seed=11)

    # independent reference: pad removed, tempered, top-k, then the smallest prefix with mass >= top_p
    zz = z.double() / temperature
    zz[tiny_tokenizer.pad_token_id] = -math.inf
    probs = torch.softmax(zz, -1)
    order = torch.argsort(probs, descending=True)
    if top_k:
        order = order[:top_k]
    p_sorted = probs[order] / probs[order].sum()
    n_keep = int(torch.searchsorted(torch.cumsum(p_sorted, 0), torch.tensor(top_p, dtype=torch.float64))) + 1
    n_keep = min(n_keep, len(order))
    nucleus = order[:n_keep]
    target = probs[nucleus] / probs[nucleus].sum()

    ids = batch.sampled_ids_B_T[:, 0]
    assert tiny_tokenizer.pad_token_id not in ids.tolist()
    assert set(ids.tolist()) <= set(nucleus.tolist())  # never outside the nucleus
    counts = torch.tensor([(ids == t).sum().item() for t in nucleus.tolist()], dtype=torch.float64)
    expected = target * len(ids)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(max(n_keep - 1, 1)), (chi2, counts, expected)
    # recorded log-probs are exactly the known distributions
    full = torch.log_softmax(z.double() / temperature, -1)
    torch.testing.assert_close(batch.old_logprobs_B_T[:, 0].double(), full[ids], atol=1e-5, rtol=0)
    lookup = dict(zip(nucleus.tolist(), target.log().tolist(), strict=True))
    ref = torch.tensor([lookup[t] for t in ids.tolist()], dtype=torch.float64)
    torch.testing.assert_close(batch.sampling_logprobs_B_T[:, 0].double(), ref, atol=1e-5, rtol=0)


def test_pad_never_emitted_even_when_most_likely(tiny_tokenizer):
    z, _ = _known_logits(tiny_tokenizer, pad_logit=20.0)  # pad holds ~all the mass
    sampler = HFSampler(_fixed_logits_model(tiny_tokenizer, z), tiny_tokenizer, RolloutConfig(max_new_tokens=6))
    batch = sampler.sample(["a", "bb cc"], chat=False, n_samples=20, seed=0)
    assert sampler.pad_id not in batch.sampled_ids_B_T[batch.response_mask_B_T.bool()].tolist()
    assert torch.all(batch.response_mask_B_T == 1)


def test_pad_equal_to_eos_ends_the_sequence():
    from opdkit.tiny import train_tokenizer
    from tests.tiny_models import corpus

    tok = train_tokenizer(corpus(100), vocab_size=300, pad_token="<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id
    z = torch.full((len(tok),), -5.0)
    z[tok.eos_token_id] = 2.0  # EOS (= pad) is likely
    sampler = HFSampler(_fixed_logits_model(tok, z), tok, RolloutConfig(max_new_tokens=20, top_p=1.0))
    batch = sampler.sample(["a"], chat=False, n_samples=16, seed=0)
    _check_structure(batch, sampler, 20, 1, 16)
    assert set(batch.finish_reason) == {FINISH_STOP}
    for b in range(batch.batch_size):
        n = int(batch.response_mask_B_T[b].sum())
        assert batch.sampled_ids_B_T[b, n - 1] == tok.eos_token_id


# ----------------------------------------------------------------------------------- seeds, stops, length
def test_same_seed_same_rollout_different_seed_different(samplers):
    sampler = _with(samplers["qwen2"], max_new_tokens=8)
    state = torch.random.get_rng_state()
    a = sampler.sample(CHAT_PROMPTS, n_samples=2, seed=5)
    b = sampler.sample(CHAT_PROMPTS, n_samples=2, seed=5)
    c = sampler.sample(CHAT_PROMPTS, n_samples=2, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for name in ("input_ids_B_L", "attention_mask_B_L", "response_mask_B_T", "sampled_ids_B_T"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.old_logprobs_B_T, b.old_logprobs_B_T)
    assert torch.equal(a.sampling_logprobs_B_T, b.sampling_logprobs_B_T)
    assert a.finish_reason == b.finish_reason
    assert not torch.equal(a.sampled_ids_B_T, c.sampled_ids_B_T)
    # default seeds: successive calls differ, a fresh sampler replays them
    fresh1, fresh2 = _with(sampler), _with(sampler)
    x1, x2 = fresh1.sample(CHAT_PROMPTS, n_samples=2), fresh1.sample(CHAT_PROMPTS, n_samples=2)
    assert not torch.equal(x1.sampled_ids_B_T, x2.sampled_ids_B_T)
    assert torch.equal(fresh2.sample(CHAT_PROMPTS, n_samples=2).sampled_ids_B_T, x1.sampled_ids_B_T)


def test_stop_id_ends_sequence(tiny_tokenizer):
    z, favoured = _known_logits(tiny_tokenizer)
    stop_id = int(favoured[-1])  # the most likely non-pad token
    sampler = HFSampler(
        _fixed_logits_model(tiny_tokenizer, z), tiny_tokenizer, RolloutConfig(max_new_tokens=30, stop_ids=[stop_id])
    )
    batch = sampler.sample(["q"], chat=False, n_samples=16, seed=0)
    _check_structure(batch, sampler, 30, 1, 16)
    assert set(batch.finish_reason) == {FINISH_STOP}
    for b in range(batch.batch_size):
        n = int(batch.response_mask_B_T[b].sum())
        assert batch.sampled_ids_B_T[b, n - 1] == stop_id
        assert stop_id not in batch.sampled_ids_B_T[b, : n - 1].tolist()


def test_stop_string_ends_sequence(tiny_tokenizer):
    z, favoured = _known_logits(tiny_tokenizer)
    # a multi-character ordinary token, made likely; its text is the stop string
    candidates = [
        i
        for i in range(10, len(tiny_tokenizer))
        if len(tiny_tokenizer.decode([i]).strip()) >= 3 and tiny_tokenizer.decode([i]).strip().isalpha()
    ]
    tok_id = candidates[0]
    word = tiny_tokenizer.decode([tok_id]).strip()
    z = z.clone()
    z[tok_id] = 3.0
    sampler = HFSampler(
        _fixed_logits_model(tiny_tokenizer, z), tiny_tokenizer, RolloutConfig(max_new_tokens=30, stop=[word])
    )
    batch = sampler.sample(["q"], chat=False, n_samples=12, seed=0)
    _check_structure(batch, sampler, 30, 1, 12)
    texts = sampler.decode(batch)
    for b, text in enumerate(texts):
        if batch.finish_reason[b] == FINISH_STOP:
            assert word in text
            n = int(batch.response_mask_B_T[b].sum())
            assert word not in tiny_tokenizer.decode(batch.sampled_ids_B_T[b, : n - 1].tolist())
        else:
            assert word not in text
    assert batch.finish_reason.count(FINISH_STOP) >= 8


def test_max_new_tokens_gives_length(samplers):
    sampler = _with(samplers["llama"], max_new_tokens=3, stop_ids=[])
    batch = sampler.sample(CHAT_PROMPTS, n_samples=1, seed=0)
    assert batch.response_len == 3
    for b in range(batch.batch_size):
        if batch.finish_reason[b] == FINISH_LENGTH:
            assert int(batch.response_mask_B_T[b].sum()) == 3
    assert FINISH_LENGTH in batch.finish_reason


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("top_k", -1),
        ("n_samples", 0),
    ],
)
def test_bad_settings_name_the_field(samplers, field, value):
    base = samplers["qwen2"]
    with pytest.raises(InputError, match=field):
        HFSampler(base.model, base.tokenizer, replace(base.settings, **{field: value}))


def test_bad_prompts(samplers):
    sampler = samplers["qwen2"]
    with pytest.raises(InputError, match="prompts"):
        sampler.sample([])
    with pytest.raises(InputError, match="chat=False"):
        sampler.sample(["a raw string"])
    with pytest.raises(InputError, match="prompts"):
        sampler.sample([[{"content": "no role"}]])
    with pytest.raises(InputError, match="n_samples"):
        sampler.sample(CHAT_PROMPTS, n_samples=0)


def test_missing_chat_template_names_the_tokenizer(tiny_model_dirs, tmp_path):
    import shutil

    path = tmp_path / "no_template"
    shutil.copytree(tiny_model_dirs["llama"], path)
    cfg = path / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    sampler = HFSampler.from_pretrained(path, RolloutConfig(max_new_tokens=2))
    with pytest.raises(InputError, match="no_template"):
        sampler.sample(CHAT_PROMPTS)
    assert sampler.sample(["raw"], chat=False, n_samples=1).batch_size == 1


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        HFSampler.from_pretrained(tmp_path / "nope", RolloutConfig())


def test_remote_code_not_run_unless_asked(tiny_model_dirs, tmp_path):
    import shutil

    path = tmp_path / "remote"
    shutil.copytree(tiny_model_dirs["qwen2"], path)
    marker = tmp_path / "ran.txt"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    try:
        HFSampler.from_pretrained(path, RolloutConfig())
    except ModelLoadError:
        pass
    assert not marker.exists()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_row_samples_the_same_response_in_any_batch(samplers, arch):
    """Per-row seeds: a response depends on its own seed only, not on the other rows, their order or the
    padding (what makes a 2-process run sample what a 1-process run samples)."""
    sampler = _with(samplers[arch], max_new_tokens=9, temperature=0.8, top_k=60, top_p=0.85)
    seeds = [11, 12, 21, 22, 31, 32]
    full = sampler.sample(CHAT_PROMPTS, n_samples=2, seeds=seeds)
    # the last prompt alone (no left padding), then the rows in reverse order
    alone = sampler.sample(CHAT_PROMPTS[2:], n_samples=2, seeds=seeds[4:])
    rev = sampler.sample(CHAT_PROMPTS[::-1], n_samples=2, seeds=[31, 32, 21, 22, 11, 12])

    def responses(batch):
        return [batch.sampled_ids_B_T[b][batch.response_mask_B_T[b].bool()].tolist() for b in range(batch.batch_size)]

    r_full, r_alone, r_rev = responses(full), responses(alone), responses(rev)
    assert r_alone == r_full[4:]
    assert r_rev == [r_full[4], r_full[5], r_full[2], r_full[3], r_full[0], r_full[1]]
    assert r_full[0] != r_full[1]  # two samples of one prompt differ
    m = full.response_mask_B_T.bool()
    torch.testing.assert_close(alone.old_logprobs_B_T[alone.response_mask_B_T.bool()], full.old_logprobs_B_T[4:][m[4:]],
                               atol=1e-5, rtol=0)
