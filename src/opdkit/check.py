"""Pre-flight check of a student/teacher pair (``opdkit check --student DIR --teacher DIR``).

Hard errors (training refuses to start, :func:`require_compatible`):

- the same string maps to different ids in the two tokenizers (the vocabularies differ on the shared range);
- the teacher has real tokens the student does not (ids the student cannot represent or reads as another
  token);
- the student has real tokens at ids beyond the teacher's output rows (the teacher cannot score them);
- a tokenizer has more tokens than its model has embedding rows.

Soft warnings (training runs; the report says what to mask):

- padded embedding rows beyond the tokenizer that differ in number (Qwen's 151936 vs 152064);
- student-only tokens that fall in the teacher's padded rows;
- EOS / BOS ids differ (EOS: mask the student's EOS, as with ``<|endoftext|>`` vs ``<|im_end|>``);
- chat templates render a sample conversation differently (both renderings are shown);
- special tokens present on one side only;
- the tokenizers segment the same text differently (e.g. one tokenizer class splits digits);
- on a dry-run rollout rendered with the *student's* template, the teacher gives a token of the student's
  *response* format (the assistant turn's template tokens, EOS, reasoning tags such as ``<think>``) a
  log-prob below ``min_logprob`` (default ``log(1e-3)``): recommended for masking. Prompt text (a system
  prompt, the user turn) is never judged: it is improbable at the start of a sequence for any model and it
  never enters the loss. With differing vocabularies the dry run is skipped.

Note: a randomly initialised teacher is near-uniform (log-prob ~ ``-log V``), which is above ``log(1e-3)``
for vocabularies under 1000 tokens and below it for real ones; the threshold is absolute on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opdkit.errors import OpdkitError
from opdkit.modeling import vocab_rows
from opdkit.special_tokens import (
    DRY_RUN_CONVERSATION,
    REASONING_TAGS,
    SAMPLE_CONVERSATION,
    render_template,
    special_id_set,
)

__all__ = [
    "IncompatibleModelsError",
    "TokenScore",
    "CheckReport",
    "vocab_rows",
    "check_pair",
    "run_check",
    "require_compatible",
    "DEFAULT_MIN_LOGPROB",
]

DEFAULT_MIN_LOGPROB = math.log(1e-3)
_MAX_EXAMPLES = 5


class IncompatibleModelsError(OpdkitError, ValueError):
    """The student and teacher cannot be distilled together (a hard mismatch of vocabularies)."""


@dataclass
class TokenScore:
    """The teacher's log-prob of one token of the dry-run rollout (rendered with the student's template)."""

    position: int
    token_id: int
    token: str
    logprob: float | None  # None at position 0 (nothing predicts it) or when the teacher cannot score the id
    is_template: bool
    flagged: bool = False
    judged: bool = False  # part of the student's response format (its template tokens, EOS, reasoning tags)


@dataclass
class CheckReport:
    student: str
    teacher: str
    hard_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recommended_special_tokens: list[str] = field(default_factory=list)
    vocab: dict = field(default_factory=dict)
    special_ids: dict = field(default_factory=dict)
    templates: dict = field(default_factory=dict)
    min_logprob: float = DEFAULT_MIN_LOGPROB
    dry_run: list[TokenScore] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No hard errors (training may start)."""
        return not self.hard_errors

    @property
    def improbable_tokens(self) -> list[TokenScore]:
        return [t for t in self.dry_run if t.flagged]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def format(self) -> str:
        lines = [f"opdkit pre-flight check\n  student: {self.student}\n  teacher: {self.teacher}", ""]
        v = self.vocab
        if v:
            lines.append("Vocabulary")
            lines.append(f"  {'':24}{'student':>12}{'teacher':>12}")
            for key, label in (("tokenizer_len", "tokens (tokenizer)"), ("rows", "embedding rows (model)")):
                s, t = v.get("student", {}).get(key), v.get("teacher", {}).get(key)
                lines.append(f"  {label:24}{_fmt(s):>12}{_fmt(t):>12}")
            lines.append("")
        if self.special_ids:
            lines.append("Special token ids")
            lines.append(f"  {'':24}{'student':>24}{'teacher':>24}")
            for name in ("bos", "eos", "pad"):
                s = self.special_ids.get("student", {}).get(name)
                t = self.special_ids.get("teacher", {}).get(name)
                mark = "" if s == t else "   <- differs"
                lines.append(f"  {name:24}{_fmt_tok(s):>24}{_fmt_tok(t):>24}{mark}")
            lines.append("")
        if self.templates:
            same = self.templates.get("student") == self.templates.get("teacher")
            lines.append("Chat templates on a sample conversation: " + ("identical" if same else "DIFFER"))
            if not same:
                for side in ("student", "teacher"):
                    lines.append(f"  {side}:")
                    r = self.templates.get(side)
                    lines.extend("    | " + ln for ln in (r.split("\n") if r is not None else ["(no chat template)"]))
            lines.append("")
        if self.dry_run:
            lines.append(
                "Dry-run rollout (student template, teacher-forced through the teacher): the tokens of the "
                "student's response format (its template tokens, EOS, reasoning tags), flagged if log-prob < "
                f"{self.min_logprob:.2f} (p < {math.exp(self.min_logprob):.2g}); prompt text is never judged"
            )
            for t in self.dry_run:
                if not t.judged:
                    continue
                lp = "     n/a" if t.logprob is None else f"{t.logprob:8.2f}"
                flag = "   <- teacher finds improbable" if t.flagged else ""
                lines.append(f"  pos {t.position:4d}  id {t.token_id:>7}  {t.token!r:24} {lp}{flag}")
            lines.append("")
        for title, items in (("HARD ERRORS", self.hard_errors), ("Warnings", self.warnings), ("Notes", self.notes)):
            if items:
                lines.append(f"{title} ({len(items)})")
                lines.extend(f"  - {m}" for m in items)
                lines.append("")
        if self.recommended_special_tokens:
            lines.append("Recommended special-token mask list (objective.special_tokens):")
            lines.append("  " + repr(self.recommended_special_tokens))
        else:
            lines.append("Recommended special-token mask list: none beyond the default (student EOS/template tokens)"
                     if self.dry_run or not self.hard_errors else
                     "Recommended special-token mask list: none (the pair is incompatible; the dry run was skipped)")
        lines.append("")
        if self.hard_errors:
            lines.append("RESULT: INCOMPATIBLE - training will refuse to start with this pair.")
        elif self.warnings:
            lines.append("RESULT: compatible, with warnings.")
        else:
            lines.append("RESULT: compatible.")
        return "\n".join(lines)


def _fmt(x) -> str:
    return "?" if x is None else str(x)


def _fmt_tok(x) -> str:
    if not x:
        return "-"
    return f"{x[1]!r} ({x[0]})"


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_EXAMPLES else "")


def _tok_info(tok, name: str):
    tid = getattr(tok, f"{name}_token_id", None)
    return None if tid is None else (int(tid), str(getattr(tok, f"{name}_token")))


def _check_vocab(report: CheckReport, s_tok, t_tok, s_rows, t_rows) -> None:
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    s_len, t_len = len(s_tok), len(t_tok)
    report.vocab = {
        "student": {"tokenizer_len": s_len, "rows": s_rows},
        "teacher": {"tokenizer_len": t_len, "rows": t_rows},
    }
    s_max = max(s_vocab.values(), default=-1) + 1
    t_max = max(t_vocab.values(), default=-1) + 1
    for side, n, rows in (("student", s_max, s_rows), ("teacher", t_max, t_rows)):
        if rows is not None and n > rows:
            report.hard_errors.append(
                f"the {side} tokenizer has ids up to {n - 1} but the {side} model has only {rows} embedding rows"
            )
    diff_ids = sorted((t_vocab[s], s) for s in s_vocab.keys() & t_vocab.keys() if s_vocab[s] != t_vocab[s])
    if diff_ids:
        ex = [f"{s!r}: student {s_vocab[s]}, teacher {t_vocab[s]}" for _, s in diff_ids]
        report.hard_errors.append(
            f"the vocabularies differ: {len(diff_ids)} token(s) map to different ids ({_examples(ex)})"
        )
    teacher_only = sorted((i, s) for s, i in t_vocab.items() if s not in s_vocab)
    if teacher_only:
        beyond = [f"{s!r} (id {i})" for i, s in teacher_only if s_rows is not None and i >= s_rows]
        within = [f"{s!r} (id {i})" for i, s in teacher_only if s_rows is None or i < s_rows]
        if beyond:
            report.hard_errors.append(
                f"the teacher has {len(beyond)} real token(s) with ids the student cannot represent "
                f"(student has {s_rows} embedding rows): {_examples(beyond)}"
            )
        if within:
            report.hard_errors.append(
                f"the teacher has {len(within)} real token(s) the student tokenizer lacks (their ids are "
                f"other or untrained tokens for the student): {_examples(within)}"
            )
    student_only = sorted((i, s) for s, i in s_vocab.items() if s not in t_vocab)
    if student_only:
        beyond = [f"{s!r} (id {i})" for i, s in student_only if t_rows is not None and i >= t_rows]
        within = [f"{s!r} (id {i})" for i, s in student_only if t_rows is None or i < t_rows]
        if beyond:
            report.hard_errors.append(
                f"the student has {len(beyond)} token(s) with ids beyond the teacher's {t_rows} output rows "
                f"(the teacher cannot score them): {_examples(beyond)}"
            )
        if within:
            report.warnings.append(
                f"the student has {len(within)} token(s) the teacher tokenizer lacks; the teacher scores them "
                f"with untrained rows (consider masking them): {_examples(within)}"
            )
    if s_rows is not None and t_rows is not None and s_rows != t_rows and not report.hard_errors:
        report.warnings.append(
            f"embedding rows differ (student {s_rows}, teacher {t_rows}) but the extra rows are only padding "
            f"beyond the tokenizers ({s_len} / {t_len} tokens): logits are compared on the shared "
            f"{min(s_rows, t_rows)} ids"
        )
    for side, n, rows in (("student", s_len, s_rows), ("teacher", t_len, t_rows)):
        if rows is not None and rows > n:
            report.notes.append(f"the {side} model has {rows - n} padded embedding row(s) beyond its {n} tokens")


def _check_special(report: CheckReport, s_tok, t_tok) -> bool:
    """Fills BOS/EOS/pad info; returns whether the EOS differs."""
    report.special_ids = {
        side: {name: _tok_info(tok, name) for name in ("bos", "eos", "pad")}
        for side, tok in (("student", s_tok), ("teacher", t_tok))
    }
    s, t = report.special_ids["student"], report.special_ids["teacher"]
    eos_differs = s["eos"] != t["eos"]
    if eos_differs:
        report.warnings.append(
            f"EOS differs: student {_fmt_tok(s['eos'])}, teacher {_fmt_tok(t['eos'])}; the teacher will score "
            "the student's EOS as an ordinary token, so mask it (it is in the recommended list)"
        )
    if s["bos"] != t["bos"]:
        report.warnings.append(f"BOS differs: student {_fmt_tok(s['bos'])}, teacher {_fmt_tok(t['bos'])}")
    if s["pad"] != t["pad"]:
        report.notes.append(
            f"pad differs: student {_fmt_tok(s['pad'])}, teacher {_fmt_tok(t['pad'])} (harmless: pads are masked)"
        )
    s_special = {s_tok.convert_ids_to_tokens(i) for i in special_id_set(s_tok)}
    t_special = {t_tok.convert_ids_to_tokens(i) for i in special_id_set(t_tok)}
    for side, only in (("student", sorted(s_special - t_special)), ("teacher", sorted(t_special - s_special))):
        if only:
            report.warnings.append(f"special tokens only the {side} has: {_examples([repr(x) for x in only])}")
    return eos_differs


def _check_templates(report: CheckReport, s_tok, t_tok, conversation) -> None:
    s_r, t_r = render_template(s_tok, conversation), render_template(t_tok, conversation)
    report.templates = {"student": s_r, "teacher": t_r}
    if s_r is None:
        report.warnings.append("the student tokenizer has no chat template (the dry-run rollout is skipped)")
    if t_r is None:
        report.notes.append("the teacher tokenizer has no chat template (the teacher scores the student's rendering)")
    if s_r is not None and t_r is not None and s_r != t_r:
        report.warnings.append(
            "the chat templates render the sample conversation differently (both shown above); the teacher "
            "scores text in the student's format, so template tokens may be improbable to it"
        )


def _check_segmentation(report: CheckReport, s_tok, t_tok) -> None:
    """Same text, different segmentation (e.g. one tokenizer class splits digits): a soft warning."""
    text = report.templates.get("student") or "\n".join(str(m.get("content", "")) for m in SAMPLE_CONVERSATION)
    s_pieces = s_tok.convert_ids_to_tokens(s_tok.encode(text, add_special_tokens=False))
    t_pieces = t_tok.convert_ids_to_tokens(t_tok.encode(text, add_special_tokens=False))
    if s_pieces != t_pieces:
        k = next((i for i, (a, b) in enumerate(zip(s_pieces, t_pieces)) if a != b), min(len(s_pieces), len(t_pieces)))
        report.warnings.append(
            f"the tokenizers segment the same text differently (student {len(s_pieces)} tokens, teacher "
            f"{len(t_pieces)}; first difference at token {k}: student {s_pieces[k : k + 4]!r}, teacher "
            f"{t_pieces[k : k + 4]!r}); the teacher scores the student's segmentation, which it may find improbable"
        )


def _content_spans(text: str, conversation) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in conversation:
        c = str(m.get("content", ""))
        if not c:
            continue
        i = text.find(c, start)
        if i < 0:
            i = text.find(c)
        if i >= 0:
            spans.append((i, i + len(c)))
            start = i + len(c)
    return spans


def _response_candidates(text: str, prompt_text: str | None, ids, offsets, spans, specials) -> list[tuple]:
    """Per token: ``(is_template, judged)``. Only tokens of the assistant's *response* are judged: its
    template tokens (the turn's end, EOS) and reasoning tags that are single tokens; never prompt text (a
    system prompt's words are improbable at the start of a sequence, and they never enter the loss)."""
    start = len(prompt_text) if prompt_text is not None and text.startswith(prompt_text) else None
    # a tag is judged only where it is one token: its pieces ('</think' and '>') are ordinary text elsewhere
    tags = [(a, b) for a, b in (offsets or []) if text[a:b] in REASONING_TAGS]
    out = []
    for k, tid in enumerate(ids):
        a, b = offsets[k] if offsets is not None else (None, None)
        template = tid in specials or (a is not None and not any(a < e and s < b for s, e in spans))
        in_response = start is not None and a is not None and a >= start
        is_tag = a is not None and any(a < e and s < b for s, e in tags)
        out.append((template, bool(in_response and (template or is_tag))))
    return out


def _dry_run(report: CheckReport, s_tok, teacher_model, t_rows, min_logprob, device) -> list[str]:
    """Teacher-forced pass over the student's rendering of :data:`DRY_RUN_CONVERSATION` (its EOS appended
    when the template does not end the answer with it); returns the strings recommended for masking."""
    import torch

    conversation = list(DRY_RUN_CONVERSATION)
    text = render_template(s_tok, conversation)
    if text is None:
        return []
    prompt_text = render_template(s_tok, conversation[:-1], add_generation_prompt=True)
    eos = getattr(s_tok, "eos_token", None)
    if eos and eos not in text[len(prompt_text or "") :]:
        text = text + eos
    enc = s_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    marks = _response_candidates(text, prompt_text, ids, offsets, _content_spans(text, conversation),
                                 special_id_set(s_tok))
    rows = t_rows if t_rows is not None else vocab_rows(teacher_model)
    safe = [i if rows is None or i < rows else 0 for i in ids]
    if device is None:
        device = next(teacher_model.parameters()).device
    with torch.no_grad():
        logits = teacher_model(input_ids=torch.tensor([safe], device=device)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    recommended: list[str] = []
    whitespace: list[str] = []
    for k, tid in enumerate(ids):
        lp = None
        if k > 0 and (rows is None or tid < rows):
            lp = float(logp[k - 1, tid])
        template, judged = marks[k]
        flagged = bool(judged and lp is not None and lp < min_logprob)
        piece = s_tok.decode([tid])
        report.dry_run.append(TokenScore(k, int(tid), piece, lp, template, flagged, judged))
        if flagged:
            if not piece.strip():
                if piece not in whitespace:
                    whitespace.append(piece)
            elif piece not in recommended:
                recommended.append(piece)
    flagged = report.improbable_tokens
    if flagged:
        report.warnings.append(
            f"the teacher finds {len(flagged)} token(s) of the student's response format improbable "
            f"(log-prob < {min_logprob:.2f}): "
            + _examples([f"{t.token!r} at {t.position} ({t.logprob:.2f})" for t in flagged])
            + "; mask them (recommended list below)"
        )
    if whitespace:
        report.notes.append(
            f"whitespace tokens {whitespace!r} of the student's response format are also improbable to the "
            "teacher; they are not recommended for masking because they occur in ordinary text too"
        )
    return recommended


def check_pair(
    student_tokenizer,
    teacher_tokenizer,
    *,
    student_rows: int | None,
    teacher_model=None,
    teacher_rows: int | None = None,
    student: str = "student",
    teacher: str = "teacher",
    conversation: Sequence[dict] | None = None,
    min_logprob: float = DEFAULT_MIN_LOGPROB,
    device=None,
) -> CheckReport:
    """The pre-flight check on already-loaded tokenizers (and the teacher model, for the dry run).

    ``student_rows`` / ``teacher_rows``: embedding rows of each model (``vocab_rows``); ``teacher_rows``
    defaults to the teacher model's. Without a teacher model the dry-run rollout is skipped.
    """
    conversation = list(conversation if conversation is not None else SAMPLE_CONVERSATION)
    if teacher_rows is None and teacher_model is not None:
        teacher_rows = vocab_rows(teacher_model)
    report = CheckReport(student=str(student), teacher=str(teacher), min_logprob=float(min_logprob))
    _check_vocab(report, student_tokenizer, teacher_tokenizer, student_rows, teacher_rows)
    eos_differs = _check_special(report, student_tokenizer, teacher_tokenizer)
    _check_templates(report, student_tokenizer, teacher_tokenizer, conversation)
    _check_segmentation(report, student_tokenizer, teacher_tokenizer)
    rec: list[str] = []
    if eos_differs and student_tokenizer.eos_token:
        rec.append(str(student_tokenizer.eos_token))
    if teacher_model is not None and report.hard_errors:
        report.notes.append("the dry-run rollout was skipped: the vocabularies differ, so the teacher cannot score "
                            "the student's token ids")
    elif teacher_model is not None:
        for s in _dry_run(report, student_tokenizer, teacher_model, teacher_rows, min_logprob, device):
            if s not in rec:
                rec.append(s)
    else:
        report.notes.append("no teacher model given: the dry-run rollout was skipped")
    report.recommended_special_tokens = rec
    return report


def _student_rows(student_dir: str | Path, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    from opdkit.hf import ModelLoadError

    try:
        cfg = AutoConfig.from_pretrained(Path(student_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if not (Path(student_dir) / "config.json").is_file():
            raise ModelLoadError(f"model '{student_dir}': no config.json, so this is not a Hugging Face model "
                                 "directory") from None
        raise ModelLoadError(
            f"model '{student_dir}': config.json could not be loaded ({type(exc).__name__}: {exc})"
        ) from None
    return vocab_rows(cfg)


def run_check(
    student_dir: str | Path,
    teacher_dir: str | Path,
    *,
    trust_remote_code: bool = False,
    device=None,
    dtype: str = "float32",
    min_logprob: float = DEFAULT_MIN_LOGPROB,
    conversation: Sequence[dict] | None = None,
    chat_template: str = "model",
    token_file: str | None = None,
) -> CheckReport:
    """Load both tokenizers, the student's config and the teacher model, and run :func:`check_pair`.

    ``teacher_dir`` may be the URL of an ``opdkit serve-teacher`` server (``token_file``: its bearer token):
    its tokenizer and vocabulary are checked; the dry run, which needs the teacher's weights, is skipped.

    ``chat_template``: the student's template, as ``model.chat_template`` (``model``, ``none`` or a file)."""
    from opdkit.hf import ModelLoadError, load_causal_lm, load_tokenizer

    def named(side, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{side}: {exc}") from None

    s_tok = named("student", load_tokenizer, student_dir, trust_remote_code=trust_remote_code)
    if chat_template != "model":
        from opdkit.data.chat import apply_chat_template_setting

        apply_chat_template_setting(s_tok, chat_template, key="--chat-template")
    s_rows = named("student", _student_rows, student_dir, trust_remote_code)
    teacher_rows = None
    if str(teacher_dir).startswith(("http://", "https://")):  # an opdkit teacher server: its tokenizer and rows
        from opdkit.teacher.connect import pick_url
        from opdkit.teacher.remote import RemoteTeacher
        from opdkit.teacher.server import read_token_file

        token = read_token_file(token_file, key="--token-file") if token_file else None
        remote = RemoteTeacher(pick_url(str(teacher_dir), 0), top_k=1, token=token, retries=2)
        t_tok, teacher_rows, teacher_model = remote.tokenizer, remote.vocab_size, None
    else:
        t_tok = named("teacher", load_tokenizer, teacher_dir, trust_remote_code=trust_remote_code)
        teacher_model = named("teacher", load_causal_lm, teacher_dir, dtype=dtype,
                              trust_remote_code=trust_remote_code, device=device)
    report = check_pair(
        s_tok,
        t_tok,
        student_rows=s_rows,
        teacher_model=teacher_model,
        teacher_rows=teacher_rows,
        student=str(student_dir),
        teacher=str(teacher_dir),
        conversation=conversation,
        min_logprob=min_logprob,
        device=device,
    )
    same = None if teacher_model is None else _same_model(student_dir, teacher_dir)
    if same:
        report.warnings.insert(0, f"the student and the teacher are {same}: distilling a model into itself changes "
                                  "nothing (every divergence is 0)")
    return report


def _same_model(a: str | Path, b: str | Path) -> str | None:
    """``"the same directory"`` / ``"identical weights"`` when the two model directories are one model."""
    from opdkit.hf import model_dir_digest

    pa, pb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    if pa == pb:
        return "the same directory"
    if list(pa.glob("*.safetensors")) and model_dir_digest(pa) == model_dir_digest(pb):
        return "identical weights (same files)"
    return None


def require_compatible(report: CheckReport) -> None:
    """Raise :class:`IncompatibleModelsError` naming what differs if the report has hard errors."""
    if report.hard_errors:
        details = "\n".join(f"  - {m}" for m in report.hard_errors)
        raise IncompatibleModelsError(
            f"student '{report.student}' and teacher '{report.teacher}' cannot be distilled together:\n{details}\n"
            "(run `opdkit check --student ... --teacher ...` for the full report)"
        )
