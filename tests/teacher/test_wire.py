"""The teacher server's wire format: round trips, sizes, malformed bodies."""

from __future__ import annotations

import pytest
import torch

from opdkit.errors import InputError
from opdkit.teacher import LocalTeacher
from opdkit.teacher.wire import (
    ScoreParams,
    decode_request,
    decode_signal,
    encode_request,
    encode_signal,
    signal_bytes_per_token,
)
from tests.teacher.test_local_teacher import make_batch


def test_request_round_trip():
    batch = make_batch(300)
    sup = torch.randint(0, 300, (*batch.sampled_ids_B_T.shape, 4))
    p = ScoreParams(support="student_topk", top_k=4, temperature=0.7, student_vocab_size=290, drop_ids=(1, 2))
    msgs = [[{"role": "user", "content": "hi"}]] * batch.batch_size
    req = decode_request(encode_request(batch, p, student_support_ids_B_T_K=sup, messages=msgs))
    assert req.params == p and req.messages == msgs
    assert torch.equal(req.student_support_ids_B_T_K, sup)
    for f in ("input_ids_B_L", "attention_mask_B_L", "sampled_ids_B_T"):
        assert torch.equal(getattr(req.batch, f), getattr(batch, f).long()), f
    assert torch.equal(req.batch.response_mask_B_T, batch.response_mask_B_T.bool())
    assert req.batch.prompt_len == batch.prompt_len


@pytest.mark.parametrize("support", ["teacher_topk", "full"])
def test_signal_round_trip_sends_only_scored_positions(tiny_model_dirs, support):
    teacher = LocalTeacher.from_pretrained(tiny_model_dirs["qwen2"], top_k=6, support=support)
    batch = make_batch(teacher.vocab_size)
    sig = teacher.score(batch)
    body = encode_signal(sig, batch.response_mask_B_T, full=support == "full")
    back = decode_signal(body, batch.response_mask_B_T)
    for f in ("support_ids_B_T_K", "teacher_logprobs_B_T_K", "sampled_logprobs_B_T", "logsumexp_B_T"):
        assert torch.equal(getattr(back, f), getattr(sig, f)), f
    n = int(batch.response_mask_B_T.sum())
    K = sig.teacher_logprobs_B_T_K.shape[-1]
    payload = n * signal_bytes_per_token(K, full=support == "full")
    assert payload < len(body) < payload + 1024  # header only on top of the scored positions


def test_bytes_per_token_against_bf16_logits():
    # K = 32: 32 int32 ids + 32 float32 log-probs + 2 floats; bf16 logits of Qwen2.5's vocabulary: 2 x 151936
    assert signal_bytes_per_token(32) == 264
    assert signal_bytes_per_token(32) * 1000 <= 2 * 151936


def test_decode_refuses_malformed_bodies():
    batch = make_batch(100)
    for body, words in [(b"", "expected a safetensors body"), (b"\xff" * 16, "header length"),
                        (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "wire format")]:
        with pytest.raises(InputError, match=words):
            decode_request(body)
    good = encode_request(batch, ScoreParams())
    with pytest.raises(InputError):
        decode_request(good[:-5])
    sig_body = encode_signal(_fake_signal(batch), batch.response_mask_B_T,
                             full=False, extra_metadata={"tokenizer_sha256": "abc"})
    with pytest.raises(InputError, match="tokenizer_sha256 is 'abc', expected 'xyz'"):
        decode_signal(sig_body, batch.response_mask_B_T, expect={"tokenizer_sha256": "xyz"})
    with pytest.raises(InputError, match="shape"):
        decode_signal(sig_body, batch.response_mask_B_T[:, :2])


def _fake_signal(batch, K=3):
    from opdkit.types import TeacherSignal

    B, T = batch.sampled_ids_B_T.shape
    return TeacherSignal(torch.zeros(B, T, K, dtype=torch.long), torch.zeros(B, T, K), torch.zeros(B, T),
                         torch.zeros(B, T))
