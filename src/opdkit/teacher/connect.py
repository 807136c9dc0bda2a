"""``teacher.url``: connect to a remote teacher — an ``opdkit serve-teacher`` server or a vLLM OpenAI server.

``teacher.api=auto`` asks the server: an opdkit server's ``/health`` answers JSON with an ``opdkit`` field;
anything else that serves ``/v1/models`` is taken for an OpenAI-compatible (vLLM) server.
"""

from __future__ import annotations

from collections.abc import Sequence

from opdkit.config import Config
from opdkit.errors import OpdkitError

__all__ = ["connect_teacher", "detect_api", "pick_url"]


def pick_url(urls: str, rank: int) -> str:
    """``teacher.url`` may list several servers of one teacher, comma-separated: process ``rank`` of a
    multi-process run talks to the ``rank mod n``-th (one teacher GPU serves several trainer processes)."""
    parts = [u.strip() for u in urls.split(",")]
    if not all(parts):
        raise OpdkitError(f"teacher.url: an empty entry in {urls!r} (expected URL[,URL...])")
    from urllib.parse import urlsplit

    for u in parts:
        if not u.startswith(("http://", "https://")):
            raise OpdkitError(f"teacher.url: expected http://HOST:PORT or https://..., got {u!r}")
        if urlsplit(u).path not in ("", "/") or urlsplit(u).query:
            raise OpdkitError(f"teacher.url: {u!r} has a path; give the server's root address (http://HOST:PORT)")
    return parts[rank % len(parts)]


def detect_api(url: str, *, token: str | None, timeout_s: float, retries: int) -> str:
    """``"opdkit"`` or ``"openai"``, from what the server at ``url`` answers."""
    from opdkit.teacher.remote import TeacherServerError, http_client, request_with_retries

    with http_client(url, token=token, timeout_s=timeout_s) as client:
        try:
            r = request_with_retries(client, "GET", "/health", retries=retries, backoff_s=0.5, what="teacher server")
            j = r.json()
        except TeacherServerError as exc:
            if exc.status in (None, 401):  # no server, or the wrong token: say that, not "not a server"
                raise
            j = None
        except ValueError:  # an answer that is not JSON
            j = None
        if isinstance(j, dict) and "opdkit" in j:
            return "opdkit"
        try:
            request_with_retries(client, "GET", "/v1/models", retries=0, backoff_s=0.5, what="teacher server")
        except TeacherServerError:
            raise TeacherServerError(
                f"teacher.url: {url} is neither an opdkit teacher server (GET /health) nor an OpenAI-compatible "
                "vLLM server (GET /v1/models); give the server's root address (http://HOST:PORT)"
            ) from None
        return "openai"


def connect_teacher(cfg: Config, request, *, student_vocab_size: int, drop_ids: Sequence[int] = (),
                    student_tokenizer=None):
    """The remote teacher of ``cfg.teacher`` (``url`` set) answering ``request``."""
    import os

    from opdkit.teacher.remote import RemoteTeacher
    from opdkit.teacher.server import read_token_file

    t = cfg.teacher
    url = pick_url(t.url, int(os.environ.get("RANK", "0")))
    token = read_token_file(t.token_file, key="teacher.token_file") if t.token_file else None
    api = t.api if t.api != "auto" else detect_api(url, token=token, timeout_s=t.timeout_s, retries=t.retries)
    k = max(1, min(request.k, student_vocab_size)) if request.support != "full" else 1
    if api == "opdkit":
        for key in ("served_model", "tokenizer_path"):
            if getattr(t, key) is not None:
                raise OpdkitError(f"teacher.{key}: {url} is an opdkit teacher server, where it has no effect (it "
                                  "acts with a vLLM server); remove it")
        teacher = RemoteTeacher(url, support=request.support, top_k=k, temperature=cfg.rollout.temperature,
                                student_vocab_size=student_vocab_size, drop_ids=drop_ids, token=token,
                                timeout_s=t.timeout_s, retries=t.retries)
        teacher.check_sequence_length(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                                      keys="data.max_prompt_tokens + rollout.max_new_tokens")
        return teacher
    from opdkit.teacher.openai import OpenAITeacher

    teacher = OpenAITeacher.from_config(cfg, request, url=url, top_k=k, student_vocab_size=student_vocab_size,
                                        drop_ids=drop_ids, token=token, student_tokenizer=student_tokenizer)
    teacher.check_sequence_length(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                                  keys="data.max_prompt_tokens + rollout.max_new_tokens")
    return teacher
