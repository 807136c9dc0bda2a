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

from opdkit.errors import InputError, OpdkitError
from opdkit.types import RolloutBatch, TeacherSignal

__all__ = ["RemoteTeacher", "TeacherServerError", "http_client"]

_RETRY_STATUS = {429, 502, 503, 504}


class TeacherServerError(OpdkitError):
    """The teacher server is unreachable, refused the request, or is not the teacher the run started with."""


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
                         token_key: str = "teacher.token_file", **kw):
    """``client.request`` with retries on transport errors and 429/502/503/504; raises ``TeacherServerError``
    naming the server and the last failure."""
    import httpx

    url = f"{client.base_url}{path}"
    last = ""
    start = time.monotonic()
    for attempt in range(retries + 1):
        if attempt:
            # full jitter keeps many clients (processes of one run) from retrying in lockstep
            time.sleep(min(30.0, backoff_s * 2 ** (attempt - 1)) * (0.5 + 0.5 * random.random()))
        try:
            r = client.request(method, path, **kw)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            continue
        if r.status_code in _RETRY_STATUS:
            last = f"HTTP {r.status_code}: {_message(r)}"
            continue
        if r.status_code == 401:
            raise TeacherServerError(f"{token_key}: the {what} at {url} refused the request (401: {_message(r)})")
        if r.status_code >= 400:
            raise TeacherServerError(f"the {what} at {url} answered {r.status_code}: {_message(r)}")
        return r
    raise TeacherServerError(
        f"teacher.url: the {what} at {url} did not answer after {retries + 1} tries over "
        f"{time.monotonic() - start:.0f} s (last: {last}); is it running? (teacher.retries, teacher.timeout_s)"
    )


def _message(r) -> str:
    try:
        j = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    if isinstance(j, dict):
        for k in ("error", "detail", "message"):
            if k in j:
                v = j[k]
                return (v.get("message") if isinstance(v, dict) and "message" in v else str(v))[:500]
    return str(j)[:300]


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
                                     "'opdkit' field); for a vLLM server set teacher.api=openai")
        self.vocab_size = int(self.info["vocab_size"])
        if student_vocab_size is not None and student_vocab_size > self.vocab_size:
            student_vocab_size = self.vocab_size
        self.params = ScoreParams(support=support, top_k=int(top_k), temperature=float(temperature),
                                  student_vocab_size=student_vocab_size, drop_ids=tuple(int(i) for i in drop_ids))
        self.tokenizer = self._fetch_tokenizer()
        self._expect = {"tokenizer_sha256": self.info["tokenizer_sha256"], "vocab_size": str(self.vocab_size)}

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

    def score(self, batch: RolloutBatch, *, student_support_ids_B_T_K=None,
              messages: Sequence[Sequence[dict]] | None = None) -> TeacherSignal:
        """As ``LocalTeacher.score``, over HTTP; the signal comes back on the batch's device."""
        from opdkit.teacher.wire import decode_signal, encode_request

        if not isinstance(batch, RolloutBatch):
            raise InputError(f"batch: expected a RolloutBatch, got {type(batch).__name__}")
        if (student_support_ids_B_T_K is not None) != (self.support == "student_topk"):
            raise InputError("student_support_ids_B_T_K: required with support='student_topk' and only there")
        body = encode_request(batch, self.params, student_support_ids_B_T_K=student_support_ids_B_T_K,
                              messages=messages)
        r = request_with_retries(self._client, "POST", "/v1/score", content=body, retries=self.retries,
                                 backoff_s=self.backoff_s, what="teacher server",
                                 headers={"content-type": "application/octet-stream"})
        try:
            return decode_signal(r.content, batch.response_mask_B_T, device=batch.input_ids_B_L.device,
                                 expect=self._expect)
        except InputError as exc:
            raise TeacherServerError(f"teacher.url: {exc}") from None

    __call__ = score

    def close(self) -> None:
        self._client.close()
