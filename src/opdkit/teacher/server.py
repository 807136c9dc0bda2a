"""``opdkit serve-teacher``: a teacher model behind HTTP, answering with compact ``TeacherSignal`` bytes.

Endpoints (FastAPI on uvicorn; the OpenAPI schema at ``/openapi.json``, the docs at ``/docs``):

- ``GET /health``: ``{"status": "ok", "opdkit": version, "wire": "1", "model", "vocab_size" (LM-head rows),
  "tokenizer_vocab_size", "tokenizer_sha256", "model_sha256", "dtype", "context_length", "limits"}``.
- ``GET /v1/tokenizer``: the teacher tokenizer's files (base64), so a client runs the pre-flight check
  against the tokenizer the server really uses; ``sha256`` over them equals ``tokenizer_sha256``.
- ``POST /v1/score``: a rollout batch as safetensors bytes (``opdkit.teacher.wire``) -> the signal at the
  scored positions, as safetensors bytes. 400 malformed or invalid, 401 without the bearer token, 413 over
  a limit; the server goes on serving after every one of them.

Batching. Requests wait in one queue; a worker takes every queued request (up to ``batch_sequences``
sequences), merges those with the same scoring parameters into one padded batch (prompts left-padded,
responses right-padded: the teacher's explicit position ids make padding invisible to the model), and
runs the model in one thread while the event loop keeps accepting requests. A request that arrives while
the model is busy is merged into the next batch; an idle server answers at once (no added latency).

Security: loopback by default; ``--token-file`` requires ``Authorization: Bearer <token>`` on every
endpoint except the schema and docs; the body is parsed as safetensors (no pickle) and bounded before it
is read.
"""

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opdkit.errors import InputError, OpdkitError
from opdkit.teacher.wire import ScoreRequest, decode_request, encode_signal

__all__ = ["ServerLimits", "TeacherService", "make_app", "serve_teacher", "tokenizer_files"]


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask (a larger one gets 413), and how much one model call merges."""

    max_request_bytes: int = 64 << 20  # request body
    max_sequences: int = 256  # sequences in one request
    max_seq_len: int = 32768  # prompt + response columns (also capped by the model's context)
    max_top_k: int = 1024  # support size of a top-K request
    max_response_bytes: int = 1 << 30  # answer size (bounds the full-vocabulary support)
    batch_sequences: int = 64  # sequences merged from concurrent requests into one model call
    max_queued_bytes: int = 1 << 30  # request bodies waiting for the model; beyond, 503 (clients retry)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes (what a client needs to rebuild it exactly)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


class TeacherService:
    """The model side of the server (no HTTP): validation against the limits, merging, scoring, encoding."""

    def __init__(self, model, tokenizer, *, name: str, chunk_size: int = 256, limits: ServerLimits = ServerLimits(),
                 model_sha256: str | None = None) -> None:
        from opdkit import __version__
        from opdkit.modeling import context_length, output_head, verify_output_head

        model = model.eval().requires_grad_(False)
        verify_output_head(model)
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        self.rows = int(output_head(model).rows)
        ctx = context_length(model)
        self.limits = limits
        self.max_seq_len = min(limits.max_seq_len, ctx) if ctx else limits.max_seq_len
        self.files = tokenizer_files(tokenizer) if tokenizer is not None else {}
        self.tokenizer_sha256 = files_digest(self.files)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.info = {
            "status": "ok",
            "opdkit": __version__,
            "wire": "1",
            "model": name,
            "vocab_size": self.rows,
            "tokenizer_vocab_size": len(tokenizer) if tokenizer is not None else None,
            "tokenizer_sha256": self.tokenizer_sha256,
            "model_sha256": model_sha256,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(output_head(model).weight.device),
            "context_length": ctx,
            "limits": {**asdict(limits), "max_seq_len": self.max_seq_len},
        }
        self._teachers: dict[tuple, object] = {}
        self._lock = threading.Lock()
        # requests answered, model calls made, requests that shared a call with another
        self.stats = {"requests": 0, "model_calls": 0, "merged_requests": 0, "largest_call_sequences": 0}

    # -------------------------------------------------------------------------------------- validation
    def check(self, req: ScoreRequest) -> None:
        """Raise ``InputError`` (400) for a request the teacher cannot score, ``_TooLarge`` (413) over a limit."""
        b = req.batch
        B, L = b.input_ids_B_L.shape
        lim = self.limits
        if B > lim.max_sequences:
            raise TooLarge(f"{B} sequences in one request; this server takes at most {lim.max_sequences} "
                           "(its --max-sequences)")
        if L > self.max_seq_len:
            raise TooLarge(f"sequences of {L} columns; this server takes at most {self.max_seq_len} (its "
                           "--max-seq-len, or the model's context)")
        p = req.params
        if p.support != "full" and p.support != "student_topk" and p.top_k > lim.max_top_k:
            raise TooLarge(f"top_k = {p.top_k}; this server takes at most {lim.max_top_k} (its --max-top-k)")
        if req.student_support_ids_B_T_K is not None and req.student_support_ids_B_T_K.dim() == 3:
            if req.student_support_ids_B_T_K.shape[-1] > lim.max_top_k:
                raise TooLarge(f"student support of {req.student_support_ids_B_T_K.shape[-1]} ids; "
                               f"this server takes at most {lim.max_top_k} (its --max-top-k)")
        if p.student_vocab_size is not None and p.student_vocab_size > self.rows:
            raise InputError(f"params.student_vocab_size: {p.student_vocab_size} is more than the teacher's "
                             f"{self.rows} output rows")
        k = {"full": p.student_vocab_size or self.rows,
             "teacher_topk_plus_sampled": p.top_k + 1}.get(p.support, p.top_k)
        if req.student_support_ids_B_T_K is not None and req.student_support_ids_B_T_K.dim() == 3:
            k = req.student_support_ids_B_T_K.shape[-1]
        n = int((b.response_mask_B_T != 0).sum()) if b.response_mask_B_T.dim() == 2 else 0
        size = n * k * (4 if p.support == "full" else 8)
        if size > lim.max_response_bytes:
            raise TooLarge(f"the answer would be {size / 2**20:.0f} MiB ({n} scored tokens x {k} slots); this "
                           f"server sends at most {lim.max_response_bytes / 2**20:.0f} MiB (its --max-response-mb)")

    def _teacher(self, req: ScoreRequest):
        from opdkit.teacher.local import LocalTeacher

        p = req.params
        key = p.key()
        with self._lock:
            t = self._teachers.get(key)
            if t is None:
                t = LocalTeacher(self.model, self.tokenizer, top_k=p.top_k, chunk_size=self.chunk_size,
                                 temperature=p.temperature, support=p.support,
                                 student_vocab_size=p.student_vocab_size, drop_ids=p.drop_ids, verify=False)
                if len(self._teachers) > 64:  # parameters come from clients: keep the cache bounded
                    self._teachers.clear()
                self._teachers[key] = t
        return t

    # ----------------------------------------------------------------------------------------- scoring
    def score_one(self, req: ScoreRequest) -> bytes:
        self.stats["model_calls"] += 1
        sig = self._teacher(req).score(req.batch, student_support_ids_B_T_K=req.student_support_ids_B_T_K,
                                       messages=req.messages)
        return self._encode(sig, req)

    def _encode(self, sig, req: ScoreRequest) -> bytes:
        return encode_signal(sig, req.batch.response_mask_B_T, full=req.params.support == "full",
                             extra_metadata={"tokenizer_sha256": self.tokenizer_sha256,
                                             "model_sha256": str(self.info["model_sha256"]),
                                             "vocab_size": str(self.rows)})

    def score_many(self, reqs: list[ScoreRequest]) -> list[bytes | Exception]:
        """Score queued requests, merging those that can share one model call; one answer (or the error
        that request caused) per request, in order."""
        self.stats["requests"] += len(reqs)
        out: list[bytes | Exception | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            k = (r.params.key(), r.messages is not None,
                 None if r.student_support_ids_B_T_K is None else r.student_support_ids_B_T_K.shape[-1])
            groups.setdefault(k if r.messages is None else ("alone", i), []).append(i)
        for idx in groups.values():
            if len(idx) > 1:
                try:
                    for i, ans in zip(idx, self._score_merged([reqs[i] for i in idx])):
                        out[i] = ans
                    continue
                except Exception:  # noqa: BLE001 - one of them is bad: score each alone, so the error
                    pass  # reaches only its sender
            for i in idx:
                try:
                    out[i] = self.score_one(reqs[i])
                except Exception as exc:  # noqa: BLE001 - the error goes back to that request's sender
                    out[i] = exc
        return out

    def _score_merged(self, reqs: list[ScoreRequest]) -> list[bytes]:
        from dataclasses import replace

        for r in reqs:
            self._teacher(r)._check_batch(r.batch)
        P = max(r.batch.prompt_len for r in reqs)
        T = max(r.batch.sampled_ids_B_T.shape[1] for r in reqs)
        ids, att, resp, samp, sup = [], [], [], [], []
        for r in reqs:
            b = r.batch
            p, t = b.prompt_len, b.sampled_ids_B_T.shape[1]
            B = b.batch_size
            left = torch.zeros((B, P - p), dtype=torch.long)
            right = torch.zeros((B, T - t), dtype=torch.long)
            ids.append(torch.cat([left, b.input_ids_B_L, right], 1))
            att.append(torch.cat([left, b.attention_mask_B_L.long(), right], 1))
            resp.append(torch.cat([b.response_mask_B_T.long(), right], 1))
            samp.append(torch.cat([b.sampled_ids_B_T, right], 1))
            if r.student_support_ids_B_T_K is not None:
                s = r.student_support_ids_B_T_K
                sup.append(torch.cat([s, s.new_zeros((B, T - t, s.shape[-1]))], 1))
        merged = replace(reqs[0].batch, input_ids_B_L=torch.cat(ids), attention_mask_B_L=torch.cat(att),
                         prompt_len=P, response_mask_B_T=torch.cat(resp).bool(), sampled_ids_B_T=torch.cat(samp))
        sig = self._teacher(reqs[0]).score(merged, student_support_ids_B_T_K=torch.cat(sup) if sup else None)
        self.stats["model_calls"] += 1
        self.stats["largest_call_sequences"] = max(self.stats["largest_call_sequences"], merged.batch_size)
        self.stats["merged_requests"] += len(reqs)
        answers, row = [], 0
        for r in reqs:
            B, t = r.batch.batch_size, r.batch.sampled_ids_B_T.shape[1]
            rows = slice(row, row + B)
            part = type(sig)(sig.support_ids_B_T_K[rows, :t], sig.teacher_logprobs_B_T_K[rows, :t],
                             sig.sampled_logprobs_B_T[rows, :t], sig.logsumexp_B_T[rows, :t])
            answers.append(self._encode(part, r))
            row += B
        return answers


class TooLarge(InputError):
    """A request over one of the server's limits (HTTP 413)."""


def make_app(service: TeacherService, *, token: str | None = None, log=None):
    """The FastAPI application serving ``service`` (``token``: the bearer token every request must carry;
    ``log``: where a line per refused or failed request goes, default stderr)."""
    import sys
    import traceback
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response

    from opdkit import __version__

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="opdkit-teacher")
    state: dict = {"queued_bytes": 0}
    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    async def worker(queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        held = None  # a request that did not fit into the previous model call
        while True:
            jobs = [held if held is not None else await queue.get()]
            held = None
            n = jobs[0][0].batch.batch_size
            while not queue.empty():  # merge what waits, up to batch_sequences sequences in all
                nxt = queue.get_nowait()
                if n + nxt[0].batch.batch_size > service.limits.batch_sequences:
                    held = nxt
                    break
                jobs.append(nxt)
                n += nxt[0].batch.batch_size
            try:
                answers = await loop.run_in_executor(executor, service.score_many, [j[0] for j in jobs])
            except Exception as exc:  # noqa: BLE001 - never let the worker die
                answers = [exc] * len(jobs)
            for (_, fut), ans in zip(jobs, answers):
                if not fut.done():
                    fut.set_exception(ans) if isinstance(ans, Exception) else fut.set_result(ans)

    @asynccontextmanager
    async def lifespan(app):
        state["queue"] = asyncio.Queue()
        state["worker"] = asyncio.create_task(worker(state["queue"]))
        yield
        state["worker"].cancel()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="opdkit teacher server", version=__version__, lifespan=lifespan,
                  description="Scores student rollouts with a teacher model; answers with the teacher's top-K "
                  "ids and log-probs per response token (opdkit.teacher.wire).")

    # (no `from __future__ import annotations` in this module: FastAPI reads these annotations at runtime)
    def authorize(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        client = f"{request.client.host}:{request.client.port}" if request.client else "?"
        log(f"opdkit serve-teacher: {request.method} {request.url.path} from {client}: {exc.status_code} {exc.detail}")
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/health", dependencies=[Depends(authorize)])
    async def health():
        return {**service.info, "stats": dict(service.stats)}

    @app.get("/v1/tokenizer", dependencies=[Depends(authorize)])
    async def tokenizer():
        return {"files": {k: base64.b64encode(v).decode() for k, v in service.files.items()},
                "sha256": service.tokenizer_sha256}

    body_doc = {"requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary", "description": "safetensors (opdkit.teacher.wire)"}}}}}

    @app.post("/v1/score", dependencies=[Depends(authorize)], openapi_extra=body_doc,
              responses={200: {"content": {"application/octet-stream": {}}}})
    async def score(request: Request):
        limit = service.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {int(declared)} bytes; this server takes at most {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
            chunks.append(chunk)
        try:
            req = decode_request(b"".join(chunks))
            service.check(req)
        except TooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None
        if state["queued_bytes"] + size > service.limits.max_queued_bytes:
            raise HTTPException(503, f"busy: {state['queued_bytes']} bytes of requests are waiting for the model",
                                headers={"Retry-After": "1"})
        fut = asyncio.get_running_loop().create_future()
        state["queued_bytes"] += size
        try:
            await state["queue"].put((req, fut))
            answer = await fut
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a failure of the model: say so, keep serving
            log("".join(traceback.format_exception(exc)).rstrip())
            raise HTTPException(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        finally:
            state["queued_bytes"] -= size
        return Response(answer, media_type="application/octet-stream")

    return app


def read_token_file(path: str | Path, *, key: str) -> str:
    """The bearer token in ``path``: one word of printable ASCII (what an HTTP header can carry)."""
    p = Path(path).expanduser()
    try:
        tok = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise OpdkitError(f"{key}: cannot read '{p}' ({getattr(exc, 'strerror', None) or exc})") from None
    if not tok or not all(33 <= ord(c) <= 126 for c in tok):
        raise OpdkitError(f"{key}: '{p}' must hold one token of printable ASCII characters (no spaces), got "
                          f"{'an empty file' if not tok else 'other characters'}")
    return tok


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_teacher(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, token_file: str | None = None,
                  dtype: str = "float32", device: str | None = None, chunk_size: int = 256,
                  trust_remote_code: bool = False, limits: ServerLimits = ServerLimits(), name: str | None = None,
                  log=None) -> int:
    """Load the teacher and serve it until interrupted (``port`` 0: any free port, printed)."""
    import socket

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise OpdkitError(f"opdkit serve-teacher needs FastAPI and uvicorn ({exc.name} is missing): "
                          "pip install 'opdkit[serve]'") from None

    from opdkit.hf import ModelLoadError, load_causal_lm, load_tokenizer, model_dir_digest

    if log is None:
        import sys

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    token = read_token_file(token_file, key="--token-file") if token_file else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart rebinds at once
    try:  # before the model loads: a port in use is said at once, not after minutes of loading a 7B teacher
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise OpdkitError(f"--host/--port: cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})"
                          ) from None
    if not _is_loopback(host) and token is None:
        log(f"warning: serving on {host} without --token-file: anyone who can reach this port can use the teacher")
    try:
        tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        model = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    except ModelLoadError as exc:
        sock.close()
        raise ModelLoadError(f"--model: {exc}") from None
    service = TeacherService(model, tok, name=name or Path(model_dir).name, chunk_size=chunk_size, limits=limits,
                             model_sha256=model_dir_digest(model_dir))
    app = make_app(service, token=token, log=log)
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    auth = " (bearer token required)" if token else ""
    log(f"opdkit serve-teacher: {service.info['model']} ({service.rows} rows, {service.info['dtype']}, "
        f"{service.info['device']}) listening on http://{shown}:{bound}{auth}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
