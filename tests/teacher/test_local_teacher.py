"""LocalTeacher: chunked teacher-forced scoring against a dense float64 reference (qwen2 and llama)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from opdkit.errors import InputError
from opdkit.teacher import LocalTeacher, position_ids_from_mask
from opdkit.types import RolloutBatch

ARCHS = ("qwen2", "llama")
K = 5


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model64(tiny_model_dirs, arch):
    from opdkit.hf import load_causal_lm

    return load_causal_lm(tiny_model_dirs[arch]).double()


def make_batch(vocab: int, prompt_lens=(3, 6, 1, 5), resp_lens=(7, 2, 5, 0), *, P=None, T=None, seed=0, pad=0):
    """Left-padded prompts of mixed lengths + right-padded responses, from random ids."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    P = P or max(prompt_lens)
    T = T or max(max(resp_lens), 1)
    ids = torch.full((B, P + T), pad, dtype=torch.long)
    att = torch.zeros((B, P + T), dtype=torch.long)
    rmask = torch.zeros((B, T), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        ids[b, P - p : P] = torch.randint(3, vocab, (p,), generator=g)
        ids[b, P : P + r] = torch.randint(3, vocab, (r,), generator=g)
        att[b, P - p : P + r] = 1
        rmask[b, :r] = 1
    return RolloutBatch(
        input_ids_B_L=ids,
        attention_mask_B_L=att,
        prompt_len=P,
        response_mask_B_T=rmask,
        sampled_ids_B_T=ids[:, P:].clone(),
        old_logprobs_B_T=torch.zeros(B, T),
        sampling_logprobs_B_T=torch.zeros(B, T),
        finish_reason=("stop",) * B,
        prompt_index=tuple(range(B)),
    )


def dense_reference(model, batch: RolloutBatch, temperature: float = 1.0):
    """Full logits from a plain forward, float64 log-softmax at response positions: [B, T, V]."""
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids_B_L,
            attention_mask=batch.attention_mask_B_L,
            position_ids=position_ids_from_mask(batch.attention_mask_B_L),
        )
    P, T = batch.prompt_len, batch.response_len
    logits = out.logits[:, P - 1 : P + T - 1].double() / temperature
    return torch.log_softmax(logits, -1), torch.logsumexp(logits, -1)


def check_masked(sig, batch):
    m = batch.response_mask_B_T == 0
    assert torch.isneginf(sig.teacher_logprobs_B_T_K[m]).all()
    assert (sig.sampled_logprobs_B_T[m] == 0).all()
    assert (sig.logsumexp_B_T[m] == 0).all()


# ------------------------------------------------------------------------------------------------
# Correctness against the dense reference
# ------------------------------------------------------------------------------------------------
def test_teacher_topk_matches_dense_reference(model64):
    V = model64.config.vocab_size
    batch = make_batch(V)
    logp, lse = dense_reference(model64, batch)
    sig = LocalTeacher(model64, top_k=K, chunk_size=3).score(batch)
    m = batch.response_mask_B_T.bool()
    ref_vals, ref_ids = logp.topk(K, dim=-1)
    assert sig.support_ids_B_T_K.shape == (4, 7, K)
    assert sig.teacher_logprobs_B_T_K.dtype == torch.float64
    assert torch.equal(sig.support_ids_B_T_K[m], ref_ids[m])
    torch.testing.assert_close(sig.teacher_logprobs_B_T_K[m], ref_vals[m], rtol=1e-12, atol=1e-12)
    ref_sampled = logp.gather(-1, batch.sampled_ids_B_T.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(sig.sampled_logprobs_B_T[m], ref_sampled[m], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sig.logsumexp_B_T[m], lse[m], rtol=1e-12, atol=1e-12)
    check_masked(sig, batch)
    assert (sig.sampled_logprobs_B_T[m] <= 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 7, "T", 1000])
def test_results_identical_for_every_chunk_size(model64, chunk):
    batch = make_batch(model64.config.vocab_size, seed=1)
    chunk = batch.response_len if chunk == "T" else chunk
    base = LocalTeacher(model64, top_k=K, chunk_size=2).score(batch)
    sig = LocalTeacher(model64, top_k=K, chunk_size=chunk).score(batch)
    assert torch.equal(sig.support_ids_B_T_K, base.support_ids_B_T_K)
    torch.testing.assert_close(sig.teacher_logprobs_B_T_K, base.teacher_logprobs_B_T_K, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sig.sampled_logprobs_B_T, base.sampled_logprobs_B_T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sig.logsumexp_B_T, base.logsumexp_B_T, rtol=1e-13, atol=1e-13)


def test_left_padded_scores_like_unpadded(model64):
    V = model64.config.vocab_size
    batch = make_batch(V, prompt_lens=(2, 6), resp_lens=(4, 3), seed=2)
    sig = LocalTeacher(model64, top_k=K, chunk_size=4).score(batch)
    P = batch.prompt_len
    for b in range(2):
        keep = batch.attention_mask_B_L[b].bool()
        n_prompt = int(batch.attention_mask_B_L[b, :P].sum())
        r = int(batch.response_mask_B_T[b].sum())
        ids = batch.input_ids_B_L[b][keep].unsqueeze(0)
        single = RolloutBatch(
            input_ids_B_L=ids,
            attention_mask_B_L=torch.ones_like(ids),
            prompt_len=n_prompt,
            response_mask_B_T=torch.ones(1, r, dtype=torch.long),
            sampled_ids_B_T=ids[:, n_prompt:],
            old_logprobs_B_T=torch.zeros(1, r),
            sampling_logprobs_B_T=torch.zeros(1, r),
            finish_reason=("stop",),
            prompt_index=(0,),
        )
        alone = LocalTeacher(model64, top_k=K).score(single)
        assert torch.equal(sig.support_ids_B_T_K[b, :r], alone.support_ids_B_T_K[0])
        torch.testing.assert_close(sig.teacher_logprobs_B_T_K[b, :r], alone.teacher_logprobs_B_T_K[0])
        torch.testing.assert_close(sig.sampled_logprobs_B_T[b, :r], alone.sampled_logprobs_B_T[0])
        # and a plain unpadded forward agrees too
        with torch.no_grad():
            ref = torch.log_softmax(model64(ids).logits[0, n_prompt - 1 : -1].double(), -1)
        torch.testing.assert_close(sig.teacher_logprobs_B_T_K[b, :r], ref.topk(K, -1).values)


def test_student_topk_returns_teacher_logprobs_at_given_ids(model64):
    V = model64.config.vocab_size
    batch = make_batch(V, seed=3)
    logp, _ = dense_reference(model64, batch)
    g = torch.Generator().manual_seed(0)
    sup = torch.randint(0, V, (4, batch.response_len, 6), generator=g)
    sig = LocalTeacher(model64, support="student_topk", chunk_size=5).score(batch, student_support_ids_B_T_K=sup)
    m = batch.response_mask_B_T.bool()
    assert sig.support_ids_B_T_K.shape == sup.shape
    assert torch.equal(sig.support_ids_B_T_K[m], sup[m])
    torch.testing.assert_close(sig.teacher_logprobs_B_T_K[m], logp.gather(-1, sup)[m], rtol=1e-12, atol=1e-12)
    check_masked(sig, batch)


def test_plus_sampled_slot_only_when_absent(model64):
    V = model64.config.vocab_size
    batch = make_batch(V, seed=4)
    logp, _ = dense_reference(model64, batch)
    # make some sampled tokens the teacher's argmax so that they are already in the top-K
    P, m = batch.prompt_len, batch.response_mask_B_T.bool()
    top1 = logp.argmax(-1)
    ids = batch.input_ids_B_L.clone()
    # (changing a token changes later logits; only position 0 of each response is overwritten and checked)
    ids[:, P] = torch.where(m[:, 0], top1[:, 0], ids[:, P])
    batch = replace(batch, input_ids_B_L=ids, sampled_ids_B_T=ids[:, P:].clone())
    logp, _ = dense_reference(model64, batch)
    sig = LocalTeacher(model64, top_k=K, support="teacher_topk_plus_sampled", chunk_size=3).score(batch)
    assert sig.support_ids_B_T_K.shape[-1] == K + 1
    topk_ids = logp.topk(K, -1).indices
    present = (topk_ids == batch.sampled_ids_B_T.unsqueeze(-1)).any(-1)
    assert present[m].any() and (~present[m]).any()
    extra_lp = sig.teacher_logprobs_B_T_K[..., K]
    assert torch.equal(sig.support_ids_B_T_K[..., :K][m], topk_ids[m])
    assert torch.equal(sig.support_ids_B_T_K[..., K][m], batch.sampled_ids_B_T[m])
    assert torch.isneginf(extra_lp[m & present]).all()
    ref_sampled = logp.gather(-1, batch.sampled_ids_B_T.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(extra_lp[m & ~present], ref_sampled[m & ~present], rtol=1e-12, atol=1e-12)
    check_masked(sig, batch)


def test_temperature(model64):
    batch = make_batch(model64.config.vocab_size, seed=5)
    tau = 0.7
    logp, lse = dense_reference(model64, batch, temperature=tau)
    sig = LocalTeacher(model64, top_k=K, temperature=tau, chunk_size=4).score(batch)
    m = batch.response_mask_B_T.bool()
    ref_vals, ref_ids = logp.topk(K, -1)
    assert torch.equal(sig.support_ids_B_T_K[m], ref_ids[m])
    torch.testing.assert_close(sig.teacher_logprobs_B_T_K[m], ref_vals[m], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sig.logsumexp_B_T[m], lse[m], rtol=1e-12, atol=1e-12)
    plain = LocalTeacher(model64, top_k=K).score(batch)
    assert not torch.allclose(sig.teacher_logprobs_B_T_K[m], plain.teacher_logprobs_B_T_K[m])


def test_student_vocab_size_restricts_support_only(model64):
    V = model64.config.vocab_size
    batch = make_batch(V, seed=6)
    logp, lse = dense_reference(model64, batch)
    sv = V // 3
    sig = LocalTeacher(model64, top_k=K, student_vocab_size=sv).score(batch)
    m = batch.response_mask_B_T.bool()
    assert (sig.support_ids_B_T_K[m] < sv).all()
    ref_vals, ref_ids = logp[..., :sv].topk(K, -1)  # normalised over the full vocabulary
    assert torch.equal(sig.support_ids_B_T_K[m], ref_ids[m])
    torch.testing.assert_close(sig.teacher_logprobs_B_T_K[m], ref_vals[m], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sig.logsumexp_B_T[m], lse[m], rtol=1e-12, atol=1e-12)


def test_drop_ids(model64):
    V = model64.config.vocab_size
    batch = make_batch(V, seed=7)
    base = LocalTeacher(model64, top_k=K).score(batch)
    m = batch.response_mask_B_T.bool()
    drop = sorted({int(base.support_ids_B_T_K[m][0, 0]), int(base.support_ids_B_T_K[m][1, 2])})
    sig = LocalTeacher(model64, top_k=K, drop_ids=drop).score(batch)
    assert torch.equal(sig.support_ids_B_T_K, base.support_ids_B_T_K)
    hit = torch.isin(sig.support_ids_B_T_K, torch.tensor(drop)) & m.unsqueeze(-1)
    assert hit.any()
    assert torch.isneginf(sig.teacher_logprobs_B_T_K[hit]).all()
    keep = ~hit & m.unsqueeze(-1)
    assert torch.equal(sig.teacher_logprobs_B_T_K[keep], base.teacher_logprobs_B_T_K[keep])
    assert torch.equal(sig.sampled_logprobs_B_T, base.sampled_logprobs_B_T)


def test_bf16_close_to_float32(tiny_model_dirs, arch):
    t32 = LocalTeacher.from_pretrained(tiny_model_dirs[arch], dtype="float32", top_k=K, chunk_size=4)
    t16 = LocalTeacher.from_pretrained(tiny_model_dirs[arch], dtype="bfloat16", top_k=K, chunk_size=4)
    assert t16.tokenizer is not None
    batch = make_batch(t32.vocab_size, seed=8)
    s32, s16 = t32.score(batch), t16.score(batch)
    m = batch.response_mask_B_T.bool()
    assert s32.teacher_logprobs_B_T_K.dtype == torch.float32 and s16.teacher_logprobs_B_T_K.dtype == torch.float32
    assert torch.isfinite(s16.teacher_logprobs_B_T_K[m]).all() and torch.isfinite(s16.logsumexp_B_T[m]).all()
    torch.testing.assert_close(s16.sampled_logprobs_B_T, s32.sampled_logprobs_B_T, atol=0.05, rtol=0.02)
    torch.testing.assert_close(s16.logsumexp_B_T, s32.logsumexp_B_T, atol=0.05, rtol=0.02)
    # the teacher's log-probs at the float32 top-K ids are close
    at16 = LocalTeacher(t16.model, support="student_topk")
    s16_at = at16.score(batch, student_support_ids_B_T_K=s32.support_ids_B_T_K)
    torch.testing.assert_close(s16_at.teacher_logprobs_B_T_K[m], s32.teacher_logprobs_B_T_K[m], atol=0.05, rtol=0.02)


def test_float32_close_to_float64_reference(tiny_model_dirs, arch, model64):
    t32 = LocalTeacher.from_pretrained(tiny_model_dirs[arch], top_k=K, chunk_size=3)
    batch = make_batch(t32.vocab_size, seed=9)
    logp, _ = dense_reference(model64, batch)
    sig = t32.score(batch)
    m = batch.response_mask_B_T.bool()
    torch.testing.assert_close(sig.teacher_logprobs_B_T_K[m].double(), logp.topk(K, -1).values[m], atol=1e-5, rtol=1e-5)


def test_own_chat_template_scores_same_response(tiny_tokenizer, model64):
    tok = tiny_tokenizer
    msgs = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "What is 12 * 9?"}]]
    # the student's prompt: a different rendering (raw text, no template)
    student_prompts = [tok(m[0]["content"], add_special_tokens=False)["input_ids"] for m in msgs]
    responses = [tok(r, add_special_tokens=False)["input_ids"] for r in ("The answer is 7.", " 108")]

    def build(prompts):
        P, T = max(map(len, prompts)), max(map(len, responses))
        ids = torch.zeros(2, P + T, dtype=torch.long)
        att = torch.zeros_like(ids)
        rm = torch.zeros(2, T, dtype=torch.long)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ids[b, P - len(p) : P] = torch.tensor(p)
            ids[b, P : P + len(r)] = torch.tensor(r)
            att[b, P - len(p) : P + len(r)] = 1
            rm[b, : len(r)] = 1
        zeros = torch.zeros(2, T)
        return RolloutBatch(ids, att, P, rm, ids[:, P:].clone(), zeros, zeros, ("stop",) * 2, (0, 1))

    teacher_prompts = [
        tok(text, add_special_tokens=False)["input_ids"]
        for text in (tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs)
    ]
    teacher = LocalTeacher(model64, tok, top_k=K)
    own = teacher.score(build(student_prompts), messages=msgs)
    direct = teacher.score(build(teacher_prompts))
    assert torch.equal(own.support_ids_B_T_K, direct.support_ids_B_T_K)
    torch.testing.assert_close(own.teacher_logprobs_B_T_K, direct.teacher_logprobs_B_T_K)
    torch.testing.assert_close(own.sampled_logprobs_B_T, direct.sampled_logprobs_B_T)
    plain = teacher.score(build(student_prompts))
    assert not torch.allclose(plain.sampled_logprobs_B_T, own.sampled_logprobs_B_T)
    with pytest.raises(InputError, match="messages"):
        teacher.score(build(student_prompts), messages=msgs[:1])
    with pytest.raises(InputError, match="tokenizer"):
        LocalTeacher(model64, top_k=K).score(build(student_prompts), messages=msgs)


def test_all_masked_batch(model64):
    batch = make_batch(model64.config.vocab_size, resp_lens=(0, 0, 0, 0), T=3)
    sig = LocalTeacher(model64, top_k=K).score(batch)
    assert sig.teacher_logprobs_B_T_K.shape == (4, 3, K)
    check_masked(sig, batch)


def test_result_usable_in_autograd(model64):
    """Results are plain tensors (no inference-mode tensors), usable as constants in a student loss."""
    batch = make_batch(model64.config.vocab_size, seed=10)
    sig = LocalTeacher(model64, top_k=K).score(batch)
    x = torch.zeros_like(sig.sampled_logprobs_B_T, requires_grad=True)
    (x.exp() * sig.sampled_logprobs_B_T).sum().backward()
    assert x.grad is not None and not sig.sampled_logprobs_B_T.requires_grad


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, name",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"support": "nope"}, "support"),
        ({"student_vocab_size": 10**9}, "student_vocab_size"),
        ({"top_k": 10**9}, "top_k"),
        ({"drop_ids": [-1]}, "drop_ids"),
    ],
)
def test_bad_constructor_args(model64, kw, name):
    with pytest.raises(InputError, match=name):
        LocalTeacher(model64, **kw)


def test_bad_model():
    with pytest.raises(InputError, match="model"):
        LocalTeacher(torch.nn.Linear(2, 2))


def test_bad_batches(model64):
    V = model64.config.vocab_size
    t = LocalTeacher(model64, top_k=K)
    batch = make_batch(V)
    B, T, P = batch.batch_size, batch.response_len, batch.prompt_len
    cases = [
        (replace(batch, attention_mask_B_L=batch.attention_mask_B_L[:, 1:]), "attention_mask_B_L"),
        (replace(batch, response_mask_B_T=batch.response_mask_B_T[:, 1:]), "response_mask_B_T"),
        (replace(batch, sampled_ids_B_T=batch.sampled_ids_B_T[:1]), "sampled_ids_B_T"),
        (replace(batch, sampled_ids_B_T=batch.sampled_ids_B_T.float()), "sampled_ids_B_T"),
        (replace(batch, input_ids_B_L=batch.input_ids_B_L.float()), "input_ids_B_L"),
        (replace(batch, prompt_len=0), "prompt_len"),
        (replace(batch, sampled_ids_B_T=batch.sampled_ids_B_T + V), "sampled_ids_B_T"),
    ]
    for bad, name in cases:
        with pytest.raises(InputError, match=name):
            t.score(bad)
    with pytest.raises(InputError, match="batch"):
        t.score("not a batch")
    with pytest.raises(InputError, match="student_support_ids_B_T_K"):
        t.score(batch, student_support_ids_B_T_K=torch.zeros(B, T, 2, dtype=torch.long))
    st = LocalTeacher(model64, support="student_topk")
    with pytest.raises(InputError, match="student_support_ids_B_T_K"):
        st.score(batch)
    with pytest.raises(InputError, match="student_support_ids_B_T_K"):
        st.score(batch, student_support_ids_B_T_K=torch.zeros(B, T + 1, 2, dtype=torch.long))
    with pytest.raises(InputError, match="student_support_ids_B_T_K"):
        st.score(batch, student_support_ids_B_T_K=torch.full((B, T, 2), V, dtype=torch.long))
    assert P >= 1 and math.isfinite(t.temperature)


def test_from_config(tiny_model_dirs, arch):
    from opdkit.config import ObjectiveConfig, TeacherConfig

    t = LocalTeacher.from_config(
        TeacherConfig(path=str(tiny_model_dirs[arch]), chunk_size=7), ObjectiveConfig(support="student_topk", top_k=4)
    )
    assert (t.chunk_size, t.support, t.top_k) == (7, "student_topk", 4)
    with pytest.raises(InputError, match="teacher.path"):
        LocalTeacher.from_config(TeacherConfig(url="http://x"))
