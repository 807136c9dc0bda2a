"""The teacher seam: what the trainer asks of a teacher, and the factory that builds one from the config.

A teacher scores a student's rollout and returns a :class:`~opdkit.types.TeacherSignal` (K ids and K
full-vocabulary log-probs per response token, the sampled token's log-prob, the log-normaliser). It also
exposes its tokenizer and its number of output rows, so the pre-flight check can run against a teacher
whose weights are elsewhere. ``teacher.path`` builds a :class:`~opdkit.teacher.local.LocalTeacher`;
``teacher.url`` a :class:`~opdkit.teacher.remote.RemoteTeacher` (``opdkit serve-teacher``) or an
:class:`~opdkit.teacher.openai.OpenAITeacher` (a vLLM OpenAI-compatible server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from opdkit.config import Config
from opdkit.errors import OpdkitError
from opdkit.types import RolloutBatch, TeacherSignal

__all__ = ["Teacher", "build_teacher"]


@runtime_checkable
class Teacher(Protocol):
    tokenizer: object  # the teacher's tokenizer (None if it has none)
    vocab_size: int  # output rows of the teacher

    def score(
        self,
        batch: RolloutBatch,
        *,
        student_support_ids_B_T_K=None,
        messages: Sequence[Sequence[dict]] | None = None,
    ) -> TeacherSignal: ...


def build_teacher(cfg: Config, request, *, student_vocab_size: int, drop_ids: Sequence[int] = (), device=None,
                  model=None, tokenizer=None, student_tokenizer=None) -> Teacher:
    """The teacher of ``cfg.teacher`` answering ``request`` (an ``opdkit.objectives.TeacherRequest``).

    ``model`` / ``tokenizer``: an already loaded local teacher (else loaded from ``teacher.path``).
    ``student_tokenizer``: for a vLLM teacher without ``teacher.tokenizer_path`` (checked against the server).
    """
    from opdkit.hf import load_causal_lm, load_tokenizer
    from opdkit.teacher.local import LocalTeacher

    t = cfg.teacher
    if t.url is not None:
        from opdkit.teacher.connect import connect_teacher

        return connect_teacher(cfg, request, student_vocab_size=student_vocab_size, drop_ids=drop_ids,
                               student_tokenizer=student_tokenizer)
    if t.path is None:
        raise OpdkitError("teacher.path must be set to train")
    if tokenizer is None:
        tokenizer = load_tokenizer(t.path, trust_remote_code=t.trust_remote_code)
    if model is None:
        from opdkit.train.precision import teacher_load_dtype

        dtype = teacher_load_dtype(t.dtype, cfg.run.precision, device)
        model = load_causal_lm(t.path, dtype=dtype, trust_remote_code=t.trust_remote_code, device=device)
    model = model.eval().requires_grad_(False)
    rows = min(student_vocab_size, int(model.get_output_embeddings().weight.shape[0]))
    return LocalTeacher(
        model,
        tokenizer,
        top_k=max(1, min(request.k, rows)) if request.support != "full" else 1,
        chunk_size=t.chunk_size,
        temperature=cfg.rollout.temperature,
        support=request.support,
        student_vocab_size=rows,
        drop_ids=drop_ids,
    )
