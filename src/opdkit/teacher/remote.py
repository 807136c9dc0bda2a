"""A teacher on another process or machine, behind ``opdkit serve-teacher`` (``teacher.url``).

``RemoteTeacher`` is a drop-in for ``LocalTeacher``: the same ``score(batch, ...) -> TeacherSignal``, the
same ``tokenizer`` and ``vocab_size`` (the server's own tokenizer files, fetched once, so the pre-flight
check compares the student with the tokenizer the server really uses). The answer carries the server's
tokenizer digest: a server restarted with another teacher is refused, not silently used.

Failures. Connection errors, time-outs and 502/503/504/429 answers are retried with exponential back-off
(``backoff_s``, doubled each try, at most 30 s apart) ``retries`` times, so a step rides through a server
restart; 4xx answers are not retried (the request itself is wrong) and their message is shown; a 401 names
``teacher.token_file``.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from opdkit.errors import InputError, OpdkitError
from opdkit.types import RolloutBatch, TeacherSignal

__all__ = ["RemoteTeacher", "TeacherServerError", "http_client"]

_RETRY_STATUS = {429, 502, 503, 504}


class TeacherServerError(OpdkitError):
    """The teacher server is unreachable, refused the request, or is not the teacher the run started with.
    ``status``: the HTTP status of a refusal (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def http_client(url: str, *, token: str | None, timeout_s: float):
    try:
        import httpx
    except ImportError as exc:  # pragma: no cover - httpx is a dependency
        raise OpdkitError("teacher.url needs httpx: pip install httpx") from exc
    headers = {"user-agent": "opdkit"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=url.rstrip("/"), headers=headers,
                        timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))


def request_with_retries(client, method: str, path: str, *, retries: int, backoff_s: float, what: str,
                         token_key: str = "teacher.token_file", stats: dict | None = None, **kw):
    """``client.request`` with retries on connection failures and 429/502/503/504; raises
    ``TeacherServerError`` naming the server and the last failure. A read time-out is not retried: the
    server is still working on the request, and sending it again would only queue the same work twice.
    ``stats["attempts"]`` receives the number of tries."""
    import sys

    import httpx

    url = f"{client.base_url}{path}"
    last = ""
    start = time.monotonic()
    for attempt in range(retries + 1):
        if attempt:
            if attempt == 1:
                print(f"opdkit: the {what} at {url} failed ({last}); retrying up to {retries} times with "
                      "back-off (teacher.retries)", file=sys.stderr, flush=True)
            # full jitter keeps many clients (processes of one run) from retrying in lockstep
            time.sleep(min(30.0, backoff_s * 2 ** (attempt - 1)) * (0.5 + 0.5 * random.random()))
        if stats is not None:
            stats["attempts"] = attempt + 1
        try:
            r = client.request(method, path, **kw)
        except (httpx.ReadTimeout, httpx.WriteTimeout):
            timeout = client.timeout.read
            raise TeacherServerError(
                f"teacher.timeout_s: the {what} at {url} did not answer within {timeout:g} s; a large batch on a "
                "slow or busy teacher needs a larger teacher.timeout_s"
            ) from None
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            continue
        if r.status_code in _RETRY_STATUS:
            last = f"HTTP {r.status_code}: {_message(r)}"
            continue
        if r.status_code == 401:
            raise TeacherServerError(f"{token_key}: the {what} at {url} refused the request (401: {_message(r)})",
                                     status=401)
        if r.status_code >= 400:
            raise TeacherServerError(f"the {what} at {url} answered {r.status_code}: {_message(r)}",
                                     status=r.status_code)
        return r
    raise TeacherServerError(
        f"teacher.url: the {what} at {url} did not answer after {retries + 1} tries over "
        f"{time.monotonic() - start:.0f} s (last: {last}); is it running? (teacher.retries, teacher.timeout_s)"
    )


def _message(r) -> str:
    try:
        j = r.json()
    except ValueError:
        if "html" in r.headers.get("content-type", ""):
            return f"{r.reason_phrase} (an HTML page: is this the server's root address?)"
        return r.text[:300] or r.reason_phrase
    if isinstance(j, dict):
        for k in ("error", "detail", "message"):
            if k in j:
                v = j[k]
                return (v.get("message") if isinstance(v, dict) and "message" in v else str(v))[:500]
    return str(j)[:300]


def _rows(batch: RolloutBatch, rows: slice) -> RolloutBatch:
    """Sequences ``rows`` of ``batch`` (the fields a teacher reads)."""
    from dataclasses import replace

    return replace(batch, input_ids_B_L=batch.input_ids_B_L[rows], attention_mask_B_L=batch.attention_mask_B_L[rows],
                   response_mask_B_T=batch.response_mask_B_T[rows], sampled_ids_B_T=batch.sampled_ids_B_T[rows],
                   old_logprobs_B_T=batch.old_logprobs_B_T[rows],
                   sampling_logprobs_B_T=batch.sampling_logprobs_B_T[rows],
                   finish_reason=batch.finish_reason[rows], prompt_index=batch.prompt_index[rows],
                   task_ids=batch.task_ids[rows] if batch.task_ids else (),
                   turn_bounds=batch.turn_bounds[rows] if batch.turn_bounds else (),
                   entropy_B_T=None, logsumexp_B_T=None)


class RemoteTeacher:
    """Scores rollouts on an ``opdkit serve-teacher`` server.

    Args:
        url: the server's address, e.g. ``http://127.0.0.1:8000``.
        support, top_k, temperature, student_vocab_size, drop_ids: as ``LocalTeacher`` (sent with every request).
        token: the bearer token, if the server requires one.
        timeout_s: one request's time limit (the answer to a large batch can take a while on a busy server).
        retries, backoff_s: see the module docstring.
    """

    def __init__(self, url: str, *, support: str = "teacher_topk", top_k: int = 32, temperature: float = 1.0,
                 student_vocab_size: int | None = None, drop_ids: Sequence[int] = (), token: str | None = None,
                 timeout_s: float = 300.0, retries: int = 8, backoff_s: float = 0.5) -> None:
        from opdkit.teacher.local import SUPPORT_SOURCES
        from opdkit.teacher.wire import ScoreParams

        if support not in SUPPORT_SOURCES:
            raise InputError(f"support: expected one of {', '.join(SUPPORT_SOURCES)}, got {support!r}")
        self.url = url.rstrip("/")
        self.support = support
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self._client = http_client(self.url, token=token, timeout_s=timeout_s)
        try:
            self.info = self._get("/health").json()
        except ValueError:  # not JSON
            self.info = None
        if not isinstance(self.info, dict) or "opdkit" not in self.info:
            raise TeacherServerError(f"teacher.url: {self.url} is not an opdkit teacher server (its /health has no "
                                     "'opdkit' field); for a vLLM server set teacher.api=openai in a run "
                                     "(opdkit check takes opdkit servers only)")
        self.vocab_size = int(self.info["vocab_size"])
        if student_vocab_size is not None and student_vocab_size > self.vocab_size:
            student_vocab_size = self.vocab_size
        self.params = ScoreParams(support=support, top_k=int(top_k), temperature=float(temperature),
                                  student_vocab_size=student_vocab_size, drop_ids=tuple(int(i) for i in drop_ids))
        self.limits = self.info.get("limits") or {}
        if support not in ("full", "student_topk") and top_k > self.limits.get("max_top_k", top_k):
            raise TeacherServerError(f"objective.top_k={top_k}: the teacher server at {self.url} takes at most "
                                     f"K = {self.limits['max_top_k']} (restart it with --max-top-k {top_k})")
        self.tokenizer = self._fetch_tokenizer()
        self._expect = {"tokenizer_sha256": self.info["tokenizer_sha256"], "vocab_size": str(self.vocab_size),
                        "model_sha256": str(self.info.get("model_sha256"))}

    def _get(self, path: str):
        return request_with_retries(self._client, "GET", path, retries=self.retries, backoff_s=self.backoff_s,
                                    what="teacher server")

    def _fetch_tokenizer(self):
        import tempfile

        from opdkit.hf import load_tokenizer
        from opdkit.teacher.server import files_digest

        j = self._get("/v1/tokenizer").json()
        try:
            files = {name: base64.b64decode(data) for name, data in j["files"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TeacherServerError(f"teacher.url: {self.url}/v1/tokenizer sent a malformed answer ({exc})") from None
        if not files:
            return None
        if files_digest(files) != self.info["tokenizer_sha256"]:
            raise TeacherServerError(f"teacher.url: the tokenizer files from {self.url} do not match its digest")
        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                if Path(name).name != name:
                    raise TeacherServerError(f"teacher.url: {self.url} sent a tokenizer file named {name!r}")
                (Path(d) / name).write_bytes(data)
            return load_tokenizer(d, trust_remote_code=False)  # data files only: no code is run

    @property
    def model_sha256(self) -> str | None:
        return self.info.get("model_sha256")

    def check_sequence_length(self, max_len: int, *, keys: str) -> None:
        """Refuse at start-up a run whose sequences (``max_len`` tokens, from ``keys``) the server would refuse."""
        limit = self.limits.get("max_seq_len")
        if limit is not None and max_len > limit:
            raise TeacherServerError(f"{keys} = {max_len} tokens per sequence: the teacher server at {self.url} "
                                     f"scores at most {limit} (its --max-seq-len, or its model's context)")

    def _same_teacher(self) -> None:
        """After an outage or a refusal: is the server still the teacher this client started with?"""
        try:
            now = self._client.get("/health").json()
        except Exception:  # noqa: BLE001 - unreachable again: the caller's error stands
            return
        for k in ("model_sha256", "tokenizer_sha256", "vocab_size"):
            if isinstance(now, dict) and str(now.get(k)) != str(self.info.get(k)):
                raise TeacherServerError(
                    f"teacher.url: the server at {self.url} now serves another teacher than at the start ({k} "
                    f"{self.info.get(k)!r} -> {now.get(k)!r}); restart it with the run's teacher"
                )

    def score(self, batch: RolloutBatch, *, student_support_ids_B_T_K=None,
              messages: Sequence[Sequence[dict]] | None = None) -> TeacherSignal:
        """As ``LocalTeacher.score``, over HTTP (in several requests if the batch has more sequences than the
        server takes); the signal comes back on the batch's device."""
        if not isinstance(batch, RolloutBatch):
            raise InputError(f"batch: expected a RolloutBatch, got {type(batch).__name__}")
        if (student_support_ids_B_T_K is not None) != (self.support == "student_topk"):
            raise InputError("student_support_ids_B_T_K: required with support='student_topk' and only there")
        B = batch.batch_size
        step = max(1, int(self.limits.get("max_sequences", B)))
        parts = []
        for a in range(0, B, step):  # a batch larger than the server takes goes in several requests
            rows = slice(a, min(B, a + step))
            part = batch if step >= B else _rows(batch, rows)
            sup = None if student_support_ids_B_T_K is None else student_support_ids_B_T_K[rows]
            msgs = None if messages is None else list(messages)[rows]
            parts.append(self._score_part(part, sup, msgs))
        if len(parts) == 1:
            return parts[0]
        return TeacherSignal(*(torch.cat([getattr(p, f) for p in parts]) for f in
                               ("support_ids_B_T_K", "teacher_logprobs_B_T_K", "sampled_logprobs_B_T",
                                "logsumexp_B_T")))

    def _score_part(self, batch: RolloutBatch, sup, messages) -> TeacherSignal:
        from opdkit.teacher.wire import decode_signal, encode_request

        body = encode_request(batch, self.params, student_support_ids_B_T_K=sup, messages=messages)
        stats: dict = {}
        try:
            r = request_with_retries(self._client, "POST", "/v1/score", content=body, retries=self.retries,
                                     backoff_s=self.backoff_s, what="teacher server", stats=stats,
                                     headers={"content-type": "application/octet-stream"})
        except TeacherServerError:
            self._same_teacher()  # a refusal may come from a server that now runs another teacher
            raise
        if stats.get("attempts", 1) > 1:
            self._same_teacher()
        try:
            return decode_signal(r.content, batch.response_mask_B_T, device=batch.input_ids_B_L.device,
                                 expect=self._expect)
        except InputError as exc:
            raise TeacherServerError(f"teacher.url: {exc}") from None

    __call__ = score

    def close(self) -> None:
        self._client.close()
