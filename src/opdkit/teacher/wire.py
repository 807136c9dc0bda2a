"""The teacher server's wire format: a rollout batch in, a ``TeacherSignal`` out, as safetensors bytes.

Pure functions (no HTTP here): ``encode_request`` / ``decode_request`` on the client and server sides of a
``POST /v1/score``, ``encode_signal`` / ``decode_signal`` for its answer.

Why safetensors: a flat, typed, little-endian container with a JSON header, readable without pickle (a
malformed body can only fail to parse), and already a dependency. Its string metadata carries the scoring
parameters as one JSON object.

Size. Only *scored* positions travel back (``response_mask_B_T`` set, row-major order; the client scatters
them into ``[B, T, K]`` with its own mask): K int32 ids + K float32 log-probs + the sampled token's log-prob
and the log-normaliser = ``8K + 8`` bytes per response token (264 at K = 32), against ``2V`` bytes of bf16
logits (303,872 at V = 151,936): 1/1151 (1/1146 with the safetensors header of an 8 x 64-token
answer). The full-vocabulary support sends ``4V + 8`` bytes per token and no ids (they are ``0..V-1``).

Request tensors (integers as int32, masks as uint8): ``input_ids [B, L]``, ``attention_mask [B, L]``,
``response_mask [B, T]``, ``sampled_ids [B, T]``, optionally ``student_support_ids [B, T, K]``.
Request metadata ``params`` (JSON): ``prompt_len``, ``support``, ``top_k``, ``temperature``,
``student_vocab_size``, ``drop_ids``, optionally ``messages`` (one chat per sequence, for the teacher's own
chat template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from opdkit.errors import InputError
from opdkit.types import RolloutBatch, TeacherSignal

__all__ = [
    "WIRE_VERSION",
    "ScoreParams",
    "ScoreRequest",
    "decode_request",
    "decode_signal",
    "encode_request",
    "encode_signal",
    "signal_bytes_per_token",
]

WIRE_VERSION = "1"
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ScoreParams:
    """How the teacher scores: the arguments of ``LocalTeacher`` that the trainer decides."""

    support: str = "teacher_topk"
    top_k: int = 32
    temperature: float = 1.0
    student_vocab_size: int | None = None
    drop_ids: tuple[int, ...] = ()

    def key(self) -> tuple:
        return (self.support, self.top_k, self.temperature, self.student_vocab_size, self.drop_ids)


@dataclass
class ScoreRequest:
    """A decoded ``POST /v1/score`` body."""

    batch: RolloutBatch
    params: ScoreParams
    student_support_ids_B_T_K: torch.Tensor | None = None
    messages: list | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _load(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes; any malformation becomes an ``InputError`` naming ``what``."""
    from safetensors.torch import load

    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise InputError(f"{what}: expected a safetensors body, got {len(data) if data else 0} bytes")
    header_len = int.from_bytes(bytes(data[:8]), "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise InputError(f"{what}: not a safetensors body (header length {header_len}, body {len(data)} bytes)")
    try:
        meta = json.loads(bytes(data[8 : 8 + header_len])).get("__metadata__") or {}
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError / ValueError on a bad body
        raise InputError(f"{what}: not a valid safetensors body ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{what}: the safetensors metadata must map names to strings")
    return tensors, meta


def _int32(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.numel() and (int(x.max()) > _INT32_MAX or int(x.min()) < -_INT32_MAX - 1):
        raise InputError(f"{name}: values outside int32")
    return x.to(torch.int32)


# ---------------------------------------------------------------------------------------------- request
def encode_request(
    batch: RolloutBatch,
    params: ScoreParams,
    *,
    student_support_ids_B_T_K: torch.Tensor | None = None,
    messages=None,
) -> bytes:
    """The body of ``POST /v1/score`` for ``batch`` (tensors moved to the CPU)."""
    tensors = {
        "input_ids": _int32(batch.input_ids_B_L.detach().cpu(), "batch.input_ids_B_L"),
        "attention_mask": (batch.attention_mask_B_L.detach().cpu() != 0).to(torch.uint8),
        "response_mask": (batch.response_mask_B_T.detach().cpu() != 0).to(torch.uint8),
        "sampled_ids": _int32(batch.sampled_ids_B_T.detach().cpu(), "batch.sampled_ids_B_T"),
    }
    if student_support_ids_B_T_K is not None:
        tensors["student_support_ids"] = _int32(student_support_ids_B_T_K.detach().cpu(), "student_support_ids_B_T_K")
    p = {
        "prompt_len": int(batch.prompt_len),
        "support": params.support,
        "top_k": int(params.top_k),
        "temperature": float(params.temperature),
        "student_vocab_size": params.student_vocab_size,
        "drop_ids": [int(i) for i in params.drop_ids],
    }
    if messages is not None:
        p["messages"] = [list(m) for m in messages]
    return _save(tensors, {"opdkit.wire": WIRE_VERSION, "params": json.dumps(p)})


def _field(p: dict, name: str, kind, *, optional: bool = False):
    if name not in p:
        if optional:
            return None
        raise InputError(f"params.{name}: missing")
    v = p[name]
    if v is None and optional:
        return None
    ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        ok, v = True, float(v)
    if not ok:
        raise InputError(f"params.{name}: expected {kind.__name__}, got {type(v).__name__} {v!r}")
    return v


def decode_request(body: bytes) -> ScoreRequest:
    """Parse a ``POST /v1/score`` body; every malformation is an ``InputError`` naming the field."""
    tensors, meta = _load(body, "request body")
    if meta.get("opdkit.wire") != WIRE_VERSION:
        raise InputError(f"request body: wire format {meta.get('opdkit.wire')!r}, this server speaks {WIRE_VERSION!r}")
    try:
        p = json.loads(meta.get("params", ""))
    except json.JSONDecodeError as exc:
        raise InputError(f"params: not JSON ({exc})") from None
    if not isinstance(p, dict):
        raise InputError("params: expected a JSON object")
    unknown = sorted(set(p) - {"prompt_len", "support", "top_k", "temperature", "student_vocab_size", "drop_ids",
                               "messages"})
    if unknown:
        raise InputError(f"params: unknown field(s) {', '.join(unknown)}")
    drop = _field(p, "drop_ids", list, optional=True) or []
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= _INT32_MAX for i in drop):
        raise InputError("params.drop_ids: expected a list of token ids in [0, 2**31)")
    params = ScoreParams(
        support=_field(p, "support", str),
        top_k=_field(p, "top_k", int),
        temperature=_field(p, "temperature", float),
        student_vocab_size=_field(p, "student_vocab_size", int, optional=True),
        drop_ids=tuple(drop),
    )
    messages = _field(p, "messages", list, optional=True)
    if messages is not None and not all(
        isinstance(conv, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in conv)
        for conv in messages
    ):
        raise InputError("params.messages: expected one list of {'role': str, 'content': str} messages per sequence")
    for name in ("top_k", "student_vocab_size", "prompt_len"):
        v = p.get(name)
        if isinstance(v, int) and not 0 <= v <= _INT32_MAX:
            raise InputError(f"params.{name}: {v} is out of range")
    expected = {"input_ids", "attention_mask", "response_mask", "sampled_ids"}
    missing = sorted(expected - set(tensors))
    if missing:
        raise InputError(f"request body: missing tensor(s) {', '.join(missing)}")
    extra = sorted(set(tensors) - expected - {"student_support_ids"})
    if extra:
        raise InputError(f"request body: unknown tensor(s) {', '.join(extra)}")
    for name, t in tensors.items():
        if t.dtype not in (torch.int32, torch.int64, torch.uint8, torch.bool):
            raise InputError(f"{name}: expected an integer tensor, got {t.dtype}")
    ids = tensors["input_ids"].long()
    if ids.dim() != 2:
        raise InputError(f"input_ids: expected [B, L], got {list(ids.shape)}")
    prompt_len = _field(p, "prompt_len", int)
    B, T = tensors["sampled_ids"].shape if tensors["sampled_ids"].dim() == 2 else (ids.shape[0], 0)
    zeros = torch.zeros((B, T))
    batch = RolloutBatch(  # only the fields a teacher reads; the shapes are checked by the teacher
        input_ids_B_L=ids,
        attention_mask_B_L=tensors["attention_mask"].long(),
        prompt_len=prompt_len,
        response_mask_B_T=tensors["response_mask"].bool(),
        sampled_ids_B_T=tensors["sampled_ids"].long(),
        old_logprobs_B_T=zeros,
        sampling_logprobs_B_T=zeros,
        finish_reason=(),
        prompt_index=(),
    )
    sup = tensors.get("student_support_ids")
    return ScoreRequest(batch=batch, params=params, student_support_ids_B_T_K=None if sup is None else sup.long(),
                        messages=messages)


# ----------------------------------------------------------------------------------------------- signal
def encode_signal(signal: TeacherSignal, response_mask_B_T: torch.Tensor, *, full: bool,
                  extra_metadata: dict[str, str] | None = None) -> bytes:
    """The answer to a score request: the signal at the scored positions only (``full``: no ids).
    ``extra_metadata``: strings the client checks (e.g. the server's tokenizer digest)."""
    mask_N = (response_mask_B_T.detach().cpu() != 0).reshape(-1)
    B, T, K = signal.teacher_logprobs_B_T_K.shape
    tensors = {
        "teacher_logprobs": signal.teacher_logprobs_B_T_K.detach().cpu().reshape(B * T, K)[mask_N],
        "sampled_logprobs": signal.sampled_logprobs_B_T.detach().cpu().reshape(-1)[mask_N],
        "logsumexp": signal.logsumexp_B_T.detach().cpu().reshape(-1)[mask_N],
    }
    if not full:
        tensors["support_ids"] = _int32(signal.support_ids_B_T_K.detach().cpu().reshape(B * T, K)[mask_N],
                                        "support_ids")
    return _save(tensors, {**(extra_metadata or {}), "opdkit.wire": WIRE_VERSION, "shape": json.dumps([B, T, K])})


def decode_signal(body: bytes, response_mask_B_T: torch.Tensor, *, device=None,
                  expect: dict[str, str] | None = None) -> TeacherSignal:
    """Scatter a score answer back into a ``TeacherSignal`` ``[B, T, K]`` (masked positions: ids 0,
    log-probs ``-inf``, sampled log-prob and log-normaliser 0, as the local teacher returns them).

    ``expect``: metadata the answer must carry with these values (a server restarted with another
    tokenizer or model is refused, not silently used)."""
    tensors, meta = _load(body, "teacher server answer")
    for k, v in (expect or {}).items():
        if meta.get(k) != v:
            raise InputError(f"teacher server answer: {k} is {meta.get(k)!r}, expected {v!r} (the server now "
                             "runs another teacher than at the start of this run)")
    try:
        B, T, K = (int(x) for x in json.loads(meta.get("shape", "")))
    except (ValueError, TypeError) as exc:
        raise InputError(f"teacher server answer: bad shape metadata ({exc})") from None
    if tuple(response_mask_B_T.shape) != (B, T):
        raise InputError(f"teacher server answer: shape [{B}, {T}], the request had {list(response_mask_B_T.shape)}")
    mask_N = (response_mask_B_T.detach().cpu() != 0).reshape(-1)
    n = int(mask_N.sum())
    lp = tensors.get("teacher_logprobs")
    if lp is None or tuple(lp.shape) != (n, K):
        raise InputError(f"teacher server answer: teacher_logprobs expected [{n}, {K}], got "
                         f"{None if lp is None else list(lp.shape)}")
    dtype = lp.dtype
    lp_N_K = torch.full((B * T, K), float("-inf"), dtype=dtype)
    lp_N_K[mask_N] = lp
    sampled = torch.zeros(B * T, dtype=dtype)
    sampled[mask_N] = tensors["sampled_logprobs"].to(dtype)
    lse = torch.zeros(B * T, dtype=dtype)
    lse[mask_N] = tensors["logsumexp"].to(dtype)
    if "support_ids" in tensors:
        ids_N_K = torch.zeros((B * T, K), dtype=torch.long)
        ids_N_K[mask_N] = tensors["support_ids"].long()
        ids = ids_N_K.reshape(B, T, K)
    else:  # the full vocabulary: a stride-0 view, as the local teacher returns it
        ids = torch.arange(K).expand(B, T, K)
    sig = TeacherSignal(ids, lp_N_K.reshape(B, T, K), sampled.reshape(B, T), lse.reshape(B, T))
    return sig if device is None else sig.to(device)


def signal_bytes_per_token(k: int, *, logprob_bytes: int = 4, full: bool = False) -> int:
    """Bytes per scored response token in an answer (without the few-hundred-byte header)."""
    return k * logprob_bytes + (0 if full else 4 * k) + 2 * logprob_bytes
