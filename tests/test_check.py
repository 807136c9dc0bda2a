"""The pre-flight check: planted mismatches between tiny student/teacher pairs built offline."""

import json
import math

import pytest
import torch

from opdkit.check import (
    DEFAULT_MIN_LOGPROB,
    IncompatibleModelsError,
    check_pair,
    require_compatible,
    run_check,
)
from opdkit.errors import OpdkitError
from opdkit.special_tokens import render_template
from opdkit.tiny import CHATML_TEMPLATE, build_tiny_model, save_model_dir, train_tokenizer
from tests.tiny_models import corpus

# what BPE reaches on the test corpus when asked for 400 (fewer merges exist with digit-by-digit splits)
VOCAB = len(train_tokenizer(corpus(), vocab_size=400))


def _tok(**kw):
    return train_tokenizer(corpus(), vocab_size=VOCAB, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("check_pairs")


@pytest.fixture(scope="module")
def student_dir(root):
    tok = _tok()
    return save_model_dir(build_tiny_model(tok, seed=0), tok, root / "student")


def _teacher(root, name, tok, **model_kw):
    return save_model_dir(build_tiny_model(tok, seed=1, **model_kw), tok, root / name)


def test_compatible_pair_has_no_hard_errors(tiny_model_dirs):
    # same tokenizer, different architectures and random weights
    report = run_check(tiny_model_dirs["qwen2"], tiny_model_dirs["llama"])
    assert report.ok and report.hard_errors == []
    assert report.special_ids["student"] == report.special_ids["teacher"]
    assert report.templates["student"] == report.templates["teacher"]
    assert report.vocab["student"] == report.vocab["teacher"] == {"tokenizer_len": VOCAB, "rows": VOCAB}
    assert not any("EOS" in w or "template" in w for w in report.warnings)
    # a random teacher is near-uniform: log-probs are about -log(V) (above log(1e-3) for V of a few hundred)
    scored = [t.logprob for t in report.dry_run if t.logprob is not None]
    assert scored and all(abs(lp + math.log(VOCAB)) < 1.5 for lp in scored)
    require_compatible(report)  # does not raise
    assert "RESULT: compatible" in report.format()


def test_eos_mismatch_is_soft_and_recommends_masking(root, student_dir):
    t_tok = _tok(eos_token="<|endoftext|>")
    report = run_check(student_dir, _teacher(root, "eos", t_tok))
    assert report.ok
    assert any(w.startswith("EOS differs") and "<|im_end|>" in w and "<|endoftext|>" in w for w in report.warnings)
    assert report.recommended_special_tokens[0] == "<|im_end|>"
    text = report.format()
    assert "<- differs" in text and "'<|im_end|>'" in text
    require_compatible(report)


def test_extra_real_teacher_tokens_are_hard(root, student_dir):
    t_tok = _tok()
    t_tok.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=True)
    assert len(t_tok) == VOCAB + 2
    report = run_check(student_dir, _teacher(root, "extra", t_tok))
    assert not report.ok
    assert any("cannot represent" in e and "<tool_call>" in e for e in report.hard_errors)
    assert any("only the teacher has" in w for w in report.warnings)
    with pytest.raises(IncompatibleModelsError, match="cannot represent") as exc:
        require_compatible(report)
    assert isinstance(exc.value, OpdkitError)
    assert "<tool_call>" in str(exc.value) and "student '" in str(exc.value)
    assert "RESULT: INCOMPATIBLE" in report.format()


def test_padded_teacher_rows_are_only_a_warning(root, student_dir):
    t_tok = _tok()
    report = run_check(student_dir, _teacher(root, "padded", t_tok, vocab_size=len(t_tok) + 64))
    assert report.ok, report.hard_errors
    assert report.vocab["teacher"] == {"tokenizer_len": VOCAB, "rows": VOCAB + 64}
    assert any("only padding" in w for w in report.warnings)
    require_compatible(report)


def test_different_ids_for_the_same_strings_are_hard(root, student_dir):
    t_tok = _tok(special_tokens=("<|im_start|>", "<|endoftext|>", "<|im_end|>"))
    report = check_pair(_tok(), t_tok, student_rows=VOCAB, teacher_rows=VOCAB)
    assert any("map to different ids" in e and "<|im_start|>" in e for e in report.hard_errors)
    with pytest.raises(IncompatibleModelsError, match="different ids"):
        require_compatible(report)


def test_student_tokens_beyond_teacher_rows_are_hard():
    s_tok = _tok()
    s_tok.add_tokens(["<extra>"], special_tokens=True)
    report = check_pair(s_tok, _tok(), student_rows=len(s_tok), teacher_rows=VOCAB)
    assert any("beyond the teacher's" in e and "<extra>" in e for e in report.hard_errors)


def test_template_difference_is_soft_and_shows_both():
    t_tok = _tok(chat_template=CHATML_TEMPLATE.replace("'\n' + message['content']", "':\n' + message['content']"))
    report = check_pair(_tok(), t_tok, student_rows=VOCAB, teacher_rows=VOCAB)
    assert report.ok
    assert any("render the sample conversation differently" in w for w in report.warnings)
    text = report.format()
    assert "DIFFER" in text and "| <|im_start|>user:" in text and "| <|im_start|>user" in text


def _make_token_improbable(model, tok, token: str, target: float = -60.0):
    """Set the teacher's output row of ``token`` so that its logit is ``target`` after every position of the
    student's rendering of the sample conversation (solved exactly: the hidden states do not depend on it)."""
    text = render_template(tok)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [T, H], after the final norm
        row = torch.linalg.lstsq(h.double(), torch.full((h.shape[0], 1), target, dtype=torch.double)).solution
        model.lm_head.weight[tok.convert_tokens_to_ids(token)] = row[:, 0].float()
    return ids


def test_teacher_finds_template_token_improbable(root, student_dir):
    from opdkit.hf import load_causal_lm, load_tokenizer

    # the student's tokenizer as loaded from its directory (the loaded class may segment text differently
    # from the in-memory one, e.g. Qwen2Tokenizer splits digits)
    s_tok = load_tokenizer(student_dir)
    t_tok = _tok()
    model = build_tiny_model(t_tok, seed=3)
    _make_token_improbable(model, s_tok, "<|im_start|>")
    t_dir = save_model_dir(model, t_tok, root / "improbable")

    # setup check: after reloading, the teacher really gives <|im_start|> a tiny log-prob
    reloaded = load_causal_lm(t_dir)
    ids = torch.tensor([s_tok.encode(render_template(s_tok), add_special_tokens=False)])
    with torch.no_grad():
        logp = torch.log_softmax(reloaded(input_ids=ids).logits[0], -1)
    im_start = s_tok.convert_tokens_to_ids("<|im_start|>")
    positions = [k for k in range(1, ids.shape[1]) if ids[0, k] == im_start]
    assert positions and all(logp[k - 1, im_start] < -30 for k in positions)

    report = run_check(student_dir, t_dir)
    assert report.ok  # improbable template tokens are soft
    flagged = report.improbable_tokens
    assert [t.position for t in flagged] == positions
    assert all(t.token == "<|im_start|>" and t.is_template and t.logprob < DEFAULT_MIN_LOGPROB for t in flagged)
    assert report.recommended_special_tokens == ["<|im_start|>"]
    assert any("improbable" in w for w in report.warnings)
    text = report.format()
    assert "teacher finds improbable" in text and "['<|im_start|>']" in text


def test_content_tokens_are_not_template_tokens(tiny_model_dirs):
    report = run_check(tiny_model_dirs["qwen2"], tiny_model_dirs["qwen2"])
    template = "".join(t.token for t in report.dry_run if t.is_template)
    content = "".join(t.token for t in report.dry_run if not t.is_template)
    assert content == "What is 12 + 30?12 + 30 = 42. The answer is 42."
    assert template == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"


def test_segmentation_difference_is_soft(tiny_model_dirs):
    # transformers loads the qwen2 directory's tokenizer as Qwen2Tokenizer, which splits digits; the llama
    # directory's (same files) does not: same vocabulary, different segmentation
    from opdkit.hf import load_tokenizer

    a, b = load_tokenizer(tiny_model_dirs["qwen2"]), load_tokenizer(tiny_model_dirs["llama"])
    report = check_pair(a, b, student_rows=VOCAB, teacher_rows=VOCAB)
    assert report.ok
    if a.encode("12 + 30") != b.encode("12 + 30"):
        assert any("segment the same text differently" in w for w in report.warnings)
    same = check_pair(a, a, student_rows=VOCAB, teacher_rows=VOCAB)
    assert not any("segment" in w for w in same.warnings)


def test_report_to_dict_is_json_serialisable(tiny_model_dirs):
    report = run_check(tiny_model_dirs["qwen2"], tiny_model_dirs["llama"])
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is True and d["hard_errors"] == [] and isinstance(d["dry_run"], list)
    assert set(d) >= {"warnings", "recommended_special_tokens", "vocab", "special_ids", "templates"}


def test_missing_directory_is_a_clear_error(tmp_path, tiny_model_dirs):
    from opdkit.hf import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such directory"):
        run_check(tmp_path / "nope", tiny_model_dirs["llama"])
