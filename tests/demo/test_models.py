"""The demo models: SFT label masking, sampling and evaluation (the library's sampler), and the verified cache
(tiny settings, seconds)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from opdkit.data.chat import render_chat
from opdkit.demo.models import (
    DemoSettings,
    ModelSpec,
    cache_key,
    evaluate_accuracy,
    generate_responses,
    load_demo_model,
    load_demo_tokenizer,
    prepare_demo_models,
    verify_cache_entry,
)
from opdkit.demo.sft import IGNORE, build_examples, collate, encode_prompts, lr_at, response_loss, sft_train
from opdkit.demo.task import TaskSpec, chat_messages, chatml_text, make_problems
from opdkit.errors import InputError

TINY = ModelSpec(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    sft_steps=3,
    batch_size=4,
    warmup=1,
    train_problems=64,
)
TINY_SETTINGS = DemoSettings(
    task=TaskSpec(max_operand=20),
    vocab_size=320,
    tokenizer_texts=300,
    teacher=TINY,
    student=dataclasses.replace(TINY, sft_steps=2, init_seed=1, stop_at_accuracy=0.5, check_every=1, check_problems=4),
    eval_problems=6,
    max_new_tokens=8,
    eval_batch_size=4,
)


@pytest.fixture(scope="module")
def tok():
    from opdkit.demo.task import corpus_for_tokenizer
    from opdkit.tiny import train_tokenizer

    return train_tokenizer(corpus_for_tokenizer(300, seed=0), 320)


@pytest.fixture(scope="module")
def tiny_model(tok):
    from opdkit.tiny import build_tiny_model

    return build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_sft_labels_mask_the_prompt(tok):
    problems = make_problems(5, seed=0)
    examples = build_examples(tok, problems)
    for p, e in zip(problems, examples):
        assert len(e.input_ids) == len(e.labels)
        # the whole sequence is the chat prompt, the solution, and EOS
        assert tok.decode(list(e.input_ids)) == chatml_text(p).removesuffix("\n")
        n_prompt = sum(1 for x in e.labels if x == IGNORE)
        assert all(x == IGNORE for x in e.labels[:n_prompt])  # masked positions form the prompt prefix
        prompt = tok.decode(list(e.input_ids[:n_prompt]))
        assert prompt == chatml_text(p, with_solution=False)
        assert list(e.input_ids[:n_prompt]) == render_chat(tok, chat_messages(p))  # the sampler's prompt ids
        assert list(e.labels[n_prompt:]) == list(e.input_ids[n_prompt:])
        assert tok.decode(list(e.labels[n_prompt:-1])) == p.solution
        assert e.labels[-1] == tok.eos_token_id
    ids, mask, labels = collate(examples, pad_id=tok.pad_token_id)
    lengths = [len(e.input_ids) for e in examples]
    assert ids.shape == (5, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (labels[mask == 0] == IGNORE).all() and (ids[mask == 0] == tok.pad_token_id).all()


def test_response_loss_ignores_the_prompt(tok, tiny_model):
    """Changing the prompt labels' targets changes nothing; the loss equals a hand-computed response CE."""
    examples = build_examples(tok, make_problems(3, seed=1))
    ids, mask, labels = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        loss = response_loss(tiny_model, ids, mask, labels)
        logp = torch.log_softmax(tiny_model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
    target = labels[:, 1:]
    keep = target != IGNORE
    ref = -logp[keep].gather(-1, target[keep][:, None]).mean()
    assert torch.allclose(loss, ref, atol=1e-5)
    n_response = sum(sum(1 for x in e.labels if x != IGNORE) for e in examples)
    assert int(keep.sum()) == n_response


def test_lr_schedule():
    kw = {"lr": 1.0, "steps": 100, "warmup": 10, "min_lr_ratio": 0.1}
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0) and lr_at(100, **kw) == pytest.approx(0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 100))


def test_sft_reduces_the_loss(tok):
    from opdkit.tiny import build_tiny_model

    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    losses = sft_train(
        model,
        build_examples(tok, make_problems(32, seed=0)),
        pad_id=tok.pad_token_id,
        steps=30,
        batch_size=8,
        lr=1e-2,
        warmup=3,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        seed=0,
        log=None,
    )
    assert len(losses) == 30 and sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert not model.training


def test_sft_stop_check_ends_training_early(tok):
    from opdkit.tiny import build_tiny_model

    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    calls: list[tuple[int, bool]] = []

    def stop(step: int) -> bool:
        calls.append((step, model.training))
        return step >= 4

    examples = build_examples(tok, make_problems(16, seed=0))
    kw = {"pad_id": tok.pad_token_id, "batch_size": 4, "lr": 1e-3, "warmup": 1, "min_lr_ratio": 1.0}
    losses = sft_train(model, examples, steps=10, weight_decay=0.0, seed=0, stop_check=stop, check_every=2, **kw)
    assert len(losses) == 4 and calls == [(2, False), (4, False)]  # checked in eval mode


def test_evaluate_accuracy_is_in_range_and_deterministic(tok, tiny_model):
    problems = make_problems(6, seed=0, split="eval")
    kw = {"max_new_tokens": 6, "batch_size": 4}
    a = generate_responses(tiny_model, tok, problems, seed=3, **kw)
    assert a == generate_responses(tiny_model, tok, problems, seed=3, **kw)
    assert a != generate_responses(tiny_model, tok, problems, seed=4, **kw)
    assert len(a.texts) == 6 and all(1 <= n <= 6 for n in a.num_tokens)
    assert all(f == (n < 6 or f) for f, n in zip(a.finished, a.num_tokens))
    acc = evaluate_accuracy(tiny_model, tok, problems, seed=3, **kw)
    assert 0.0 <= acc <= 1.0 and acc == evaluate_accuracy(tiny_model, tok, problems, seed=3, **kw)
    state = torch.random.get_rng_state()
    evaluate_accuracy(tiny_model, tok, problems, **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    tiny_model.train()
    try:
        assert generate_responses(tiny_model, tok, problems, seed=3, **kw) == a
        assert tiny_model.training  # left in the caller's mode
    finally:
        tiny_model.eval()
    assert evaluate_accuracy(tiny_model, tok, [], **kw) == 0.0
    with pytest.raises(InputError):
        evaluate_accuracy(tiny_model, tok, problems, max_new_tokens=4, top_p=0.0)


def test_a_problems_response_does_not_depend_on_the_batch(tok, tiny_model):
    """Per-problem seeds: a problem's sampled response is the same in a batch of any size, with longer
    prompts around it (left padding) or alone."""
    problems = make_problems(8, seed=2, split="eval")
    assert len({len(ids) for ids in encode_prompts(tok, problems)}) > 1  # the full batch is left-padded
    kw = {"max_new_tokens": 6, "seed": 5}
    whole = generate_responses(tiny_model, tok, problems, batch_size=8, **kw)
    assert len(set(whole.texts)) > 1
    assert generate_responses(tiny_model, tok, problems, batch_size=3, **kw) == whole
    assert generate_responses(tiny_model, tok, problems, batch_size=1, **kw) == whole


def test_demo_accuracy_is_the_trainers_evaluator(tok, tiny_model):
    """One evaluator: evaluate_accuracy (the demo's before/after numbers and early-stop checks) is the mean
    correctness of the samples that opdkit.eval's SamplingEvaluator draws and grades, and those samples do
    not depend on the batch size."""
    from opdkit.demo.sampling import demo_evaluator, evaluate_accuracy

    problems = make_problems(5, seed=4, split="eval")
    kw = {"max_new_tokens": 6, "seed": 7}
    ev = demo_evaluator(problems, batch_size=2, **kw)
    samples = [s for batch in ev.run(tiny_model, tok, ev.all_items()) for s in batch]
    assert [s.problem for s in samples] == list(range(5))
    assert len({s.response for s in samples}) > 1
    again = demo_evaluator(problems, batch_size=5, **kw)
    assert [s.response for b in again.run(tiny_model, tok, again.all_items()) for s in b] == [
        s.response for s in samples]
    assert evaluate_accuracy(tiny_model, tok, problems, batch_size=3, **kw) == pytest.approx(
        sum(s.correct for s in samples) / 5)
    assert ev.evaluate(tiny_model, tok)["eval_response_length"] == pytest.approx(sum(s.tokens for s in samples) / 5)


def test_settings_change_the_cache_key(monkeypatch):
    from opdkit.demo import cache

    assert cache_key(TINY_SETTINGS) == cache_key(DemoSettings(**TINY_SETTINGS.__dict__))
    key = cache_key(TINY_SETTINGS)
    monkeypatch.setattr(cache, "CACHE_FORMAT", cache.CACHE_FORMAT + 1)  # a bumped format builds a new entry
    assert cache_key(TINY_SETTINGS) != key
    monkeypatch.undo()
    assert cache_key(TINY_SETTINGS) != cache_key(TINY_SETTINGS, seed=1)
    assert cache_key(TINY_SETTINGS) != cache_key(DemoSettings(**{**TINY_SETTINGS.__dict__, "eval_problems": 7}))
    with pytest.raises(InputError):
        DemoSettings(vocab_size=100)


def test_cache_builds_reloads_and_rebuilds_when_corrupt(tmp_path):
    logs: list[str] = []
    first = prepare_demo_models(tmp_path, settings=TINY_SETTINGS, log=logs.append)
    assert first.built and first.root.name == f"demo-{cache_key(TINY_SETTINGS)}"
    assert 0.0 <= first.teacher_accuracy <= 1.0 and 0.0 <= first.student_accuracy <= 1.0
    assert first.info["teacher_sft_steps_done"] == 3 and first.info["student_sft_steps_done"] in (1, 2)
    assert any("held-out accuracy" in m for m in logs)  # the student's early-stopping check ran
    assert first.info["vocab_size"] == len(load_demo_tokenizer(first.tokenizer_dir))
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]  # no temporary directory left behind
    manifest = json.loads((first.root / "manifest.json").read_text())
    assert "teacher/model.safetensors" in manifest["files"]
    assert not [p for p in first.root.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    weights = first.teacher_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    again = prepare_demo_models(tmp_path, settings=TINY_SETTINGS, log=logs.append)
    assert not again.built and weights.stat().st_mtime_ns == mtime
    assert again.teacher_accuracy == first.teacher_accuracy and again.info == first.info
    model = load_demo_model(again.student_dir)
    assert model.config.hidden_size == 32 and not model.training

    # a truncated weight file is detected and the entry rebuilt, never used
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert verify_cache_entry(first.root) is None
    rebuilt = prepare_demo_models(tmp_path, settings=TINY_SETTINGS, log=logs.append)
    assert rebuilt.built and verify_cache_entry(rebuilt.root) is not None
    assert any("corrupt" in m for m in logs)

    # a missing manifest (an interrupted copy) and an extra pickle file are rejected too
    os.remove(rebuilt.root / "manifest.json")
    assert prepare_demo_models(tmp_path, settings=TINY_SETTINGS, log=None).built
    (rebuilt.root / "student" / "pytorch_model.bin").write_bytes(b"not allowed")
    assert verify_cache_entry(rebuilt.root) is None
    assert prepare_demo_models(tmp_path, settings=TINY_SETTINGS, log=None).built
    assert prepare_demo_models(tmp_path, settings=TINY_SETTINGS, log=None, force=True).built


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    from opdkit.demo.models import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "opdkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().parts[-2:] == (".cache", "opdkit")


def test_the_build_gives_the_same_models_whatever_the_thread_count(tmp_path):
    """The demo's models are built with fixed numerics (one thread, deterministic algorithms): the same bits
    whether the caller runs torch on one thread or two. Without it, the thread count changes the models
    (checked below on the same fine-tuning, so this test can fail)."""
    import hashlib

    import torch

    from opdkit.demo.build import build_entry

    wide = dataclasses.replace(TINY, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=256)
    settings = dataclasses.replace(TINY_SETTINGS, teacher=wide,
                                   student=dataclasses.replace(wide, sft_steps=2, init_seed=1))

    def digest(root):
        return {p.name: hashlib.sha256((root / p.name / "model.safetensors").read_bytes()).hexdigest()
                for p in (root / "teacher", root / "student")}

    before = torch.get_num_threads()
    try:
        digests = []
        for i, threads in enumerate((1, 2)):
            torch.set_num_threads(threads)
            build_entry(tmp_path / str(i), settings, 0, lambda _m: None)
            digests.append(digest(tmp_path / str(i)))
            assert torch.get_num_threads() == threads  # the caller's setting comes back
        assert digests[0] == digests[1]
        # the control: the same fine-tuning without fixed numerics differs between 1 and 2 threads
        from opdkit.demo.sft import build_examples, sft_train
        from opdkit.demo.task import corpus_for_tokenizer
        from opdkit.tiny import build_tiny_model, train_tokenizer

        tok = train_tokenizer(corpus_for_tokenizer(300, seed=0), 320)
        examples = build_examples(tok, make_problems(64, seed=0))
        weights = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = build_tiny_model(tok, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=256, seed=0)
            sft_train(m, examples, pad_id=tok.pad_token_id, steps=3, batch_size=16, lr=3e-3, warmup=1,
                      min_lr_ratio=0.05, weight_decay=0.01, seed=0)
            weights.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
        assert not torch.equal(weights[0], weights[1])
    finally:
        torch.set_num_threads(before)
