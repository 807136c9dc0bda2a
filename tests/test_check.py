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
from opdkit.hf import load_tokenizer
from opdkit.special_tokens import DRY_RUN_CONVERSATION, render_template
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
    student's rendering of the dry-run conversation (solved exactly: the hidden states do not depend on it)."""
    text = render_template(tok, DRY_RUN_CONVERSATION)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [T, H], after the final norm
        row = torch.linalg.lstsq(h.double(), torch.full((h.shape[0], 1), target, dtype=torch.double)).solution
        model.lm_head.weight[tok.convert_tokens_to_ids(token)] = row[:, 0].float()
    return ids


def test_teacher_finds_a_response_format_token_improbable(root, student_dir):
    from opdkit.hf import load_causal_lm, load_tokenizer

    # the student's tokenizer as loaded from its directory (the loaded class may segment text differently
    # from the in-memory one, e.g. Qwen2Tokenizer splits digits)
    s_tok = load_tokenizer(student_dir)
    t_tok = _tok()
    model = build_tiny_model(t_tok, seed=3)
    ids = _make_token_improbable(model, s_tok, "<|im_end|>")
    t_dir = save_model_dir(model, t_tok, root / "improbable")

    # setup check: after reloading, the teacher gives <|im_end|> a tiny log-prob wherever it occurs: at the
    # end of the user's turn (prompt) and at the end of the answer (response)
    reloaded = load_causal_lm(t_dir)
    with torch.no_grad():
        logp = torch.log_softmax(reloaded(input_ids=ids).logits[0], -1)
    im_end = s_tok.convert_tokens_to_ids("<|im_end|>")
    positions = [k for k in range(1, ids.shape[1]) if ids[0, k] == im_end]
    assert len(positions) == 2 and all(logp[k - 1, im_end] < -30 for k in positions)

    report = run_check(student_dir, t_dir)
    assert report.ok  # improbable template tokens are soft
    flagged = report.improbable_tokens
    assert [t.position for t in flagged] == positions[1:]  # only the response's, not the prompt's
    assert all(t.token == "<|im_end|>" and t.judged and t.logprob < DEFAULT_MIN_LOGPROB for t in flagged)
    assert report.recommended_special_tokens == ["<|im_end|>"]
    assert any("improbable" in w for w in report.warnings)
    text = report.format()
    assert "teacher finds improbable" in text and "['<|im_end|>']" in text


def test_only_the_response_format_is_judged(tiny_model_dirs, root):
    report = run_check(tiny_model_dirs["qwen2"], tiny_model_dirs["llama"])
    judged = "".join(t.token for t in report.dry_run if t.judged)
    template = "".join(t.token for t in report.dry_run if t.is_template)
    assert "".join(t.token for t in report.dry_run) == render_template(
        load_tokenizer(tiny_model_dirs["qwen2"]), DRY_RUN_CONVERSATION)
    assert template == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    # the turn's end only: '<think>' is split into '<think' and '>' here, pieces that are ordinary text
    assert judged == "<|im_end|>\n"
    # a tokenizer that has the reasoning tags as tokens: they are judged too
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
    tok = _tok(special_tokens=specials)
    student = save_model_dir(build_tiny_model(tok, seed=0), tok, root / "tags_student")
    teacher = save_model_dir(build_tiny_model(tok, seed=1), tok, root / "tags_teacher")
    judged = [t.token for t in run_check(student, teacher).dry_run if t.judged]
    assert judged == ["<think>", "</think>", "<|im_end|>", "\n"]


def test_a_system_prompt_the_teacher_finds_improbable_is_not_recommended(root, student_dir):
    """Real chat pairs differ in their default system prompts (Qwen2.5's 'You are Qwen, created by ...'); its
    words are improbable to a teacher only because they open a sequence, and they never enter the loss."""
    from opdkit.hf import load_tokenizer

    system = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by Alibaba "
              "Cloud.<|im_end|>\n{% endif %}")
    s_tok = _tok(chat_template=system + CHATML_TEMPLATE)
    s_dir = save_model_dir(build_tiny_model(s_tok, seed=0), s_tok, root / "student_sys")
    t_tok = _tok(chat_template=system.replace("You are Qwen, created by Alibaba Cloud.", "Be helpful.")
                 + CHATML_TEMPLATE)
    model = build_tiny_model(t_tok, seed=4)
    loaded = load_tokenizer(s_dir)
    word = next(p for p in loaded.convert_ids_to_tokens(loaded.encode(" created", add_special_tokens=False)))
    _make_token_improbable(model, loaded, word)
    t_dir = save_model_dir(model, t_tok, root / "teacher_sys")
    report = run_check(s_dir, t_dir)
    low = [t for t in report.dry_run if t.token.strip() == word.replace("Ġ", "").strip() and t.logprob is not None
           and t.logprob < DEFAULT_MIN_LOGPROB]
    assert low and not any(t.judged for t in low)  # the teacher does find it improbable, in the prompt
    assert report.recommended_special_tokens == [] and not report.improbable_tokens


def test_an_identical_pair_is_noted(tiny_model_dirs, tmp_path):
    import shutil

    report = run_check(tiny_model_dirs["qwen2"], tiny_model_dirs["qwen2"])
    assert report.ok and "the same directory" in report.warnings[0]
    copy = shutil.copytree(tiny_model_dirs["qwen2"], tmp_path / "copy")
    assert "identical weights" in run_check(tiny_model_dirs["qwen2"], copy).warnings[0]
    assert not any("itself" in w for w in run_check(tiny_model_dirs["qwen2"], tiny_model_dirs["llama"]).warnings)


def test_differing_vocabularies_skip_the_dry_run(root, student_dir):
    t_dir = save_model_dir(build_tiny_model(_tok(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                 "<extra>")), seed=1),
                           _tok(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra>")),
                           root / "extra_teacher")
    report = run_check(student_dir, t_dir)
    assert not report.ok and report.dry_run == []
    assert any("dry-run rollout was skipped: the vocabularies differ" in n for n in report.notes)


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

    with pytest.raises(ModelLoadError, match="^student: tokenizer .*no such directory"):
        run_check(tmp_path / "nope", tiny_model_dirs["llama"])
    with pytest.raises(ModelLoadError, match="^teacher: tokenizer .*no such directory"):
        run_check(tiny_model_dirs["llama"], tmp_path / "nope")
