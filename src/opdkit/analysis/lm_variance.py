"""Bias and variance of the OPD gradient estimators on real (tiny) language models, by Monte Carlo.

The toy problems (``opdkit.analysis.toy``) have an exact gradient; real networks do not. Here a student and a
teacher language model (the demo's, ``opdkit analyze variance --problem demo``) play the roles of π and q:

- A trajectory is a prompt drawn uniformly from ``prompts`` and exactly ``T`` tokens sampled from the student
  (τ = 1, no top-p; the end-of-sequence token is an ordinary token here, so every trajectory has T positions).
- The gradient is taken with respect to the student's **output layer** ``W [V, d]`` (the unembedding), with the
  network's last hidden states ``h_t`` held as they are: one shared parameter matrix that every position's
  log-prob depends on (``log π(·|c_t) = log_softmax(W h_t)``), 65 536 coordinates for the demo. The
  score-function identity holds for any subset of parameters, so γ = 1 is unbiased for the gradient of the
  sequence reverse KL with respect to ``W``.
- Per sample: the per-token losses come from the library (``sampled_token_advantages`` +
  ``policy_gradient_loss`` for the sampled-token estimator with discount γ, ``support_kl`` on the teacher's
  top-K), autograd gives ``∂L/∂z_t`` for the logits ``z_t = W h_t``, and the sample's gradient is
  ``Σ_t (∂L/∂z_t) h_tᵀ`` (float64).
- Bias: against a **reference** gradient, the mean of the γ = 1 estimator over an independent set of
  ``reference_factor`` times as many trajectories; its own noise, ``sqrt(var(γ=1) / N_ref) / ‖ref‖``, is reported
  as ``reference_noise`` (a bias below it is not resolved).
- Variance: as for the toy problems (``opdkit.analysis.estimators``): groups of ``samples_per_estimate``
  trajectories, the unbiased within-group estimate of ``E‖g − E g‖²``, a bootstrap interval over groups.

Shapes: ``n`` trajectories of ``T`` tokens, vocabulary ``V``, hidden size ``d``; a gradient is ``[V, d]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from opdkit.analysis.estimators import EstimatorSpec, _bootstrap_ci
from opdkit.errors import InputError
from opdkit.losses import aggregate, policy_gradient_loss, sampled_token_advantages, support_kl, teacher_topk_support

__all__ = [
    "DEMO_GAMMAS",
    "DEMO_KS",
    "DEMO_TS",
    "LM_N_ESTIMATES",
    "LM_SAMPLES_PER_ESTIMATE",
    "LMProblem",
    "head_gradients",
    "run_lm_variance",
    "sample_trajectories",
]

DEMO_TS: tuple[int, ...] = (4, 16, 64, 256)
DEMO_GAMMAS: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
DEMO_KS: tuple[int, ...] = (4, 16, 64)
LM_N_ESTIMATES = 40
LM_SAMPLES_PER_ESTIMATE = 50
_CHUNK_LOGITS = 1 << 22  # logits per autograd pass (float64: ~10 tensors of this size)


class LMProblem:
    """A student and a teacher causal LM (same tokenizer) and the prompts' token ids.

    ``student``/``teacher``: Hugging Face causal LMs (eval mode); ``prompt_ids``: one list of token ids per
    prompt (the chat template's rendering, generation prompt included).
    """

    def __init__(self, student, teacher, prompt_ids: Sequence[Sequence[int]]):
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise InputError("prompts: expected at least one non-empty prompt")
        self.student, self.teacher = student, teacher
        self.prompt_ids = [torch.tensor(list(p), dtype=torch.long) for p in prompt_ids]
        head = student.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise InputError("the student's output layer must be a bias-free linear map (a causal LM's lm_head)")
        self.W_V_d = head.weight.detach().double()

    @property
    def V(self) -> int:
        return int(self.W_V_d.shape[0])


@torch.no_grad()
def sample_trajectories(problem: LMProblem, n: int, T: int, generator: torch.Generator):
    """``n`` trajectories of exactly ``T`` tokens: ``(prompt index [n], tokens [n, T])``.

    Prompts are drawn uniformly (iid); every prompt's trajectories are sampled together with a KV cache,
    each token by ``torch.multinomial`` on the student's softmax (float64) with ``generator``.
    """
    import inspect

    which = torch.randint(len(problem.prompt_ids), (n,), generator=generator)
    tokens = torch.empty(n, T, dtype=torch.long)
    # transformers names the cache argument ``cache`` from 5.x, ``past_key_values`` before
    key = "cache" if "cache" in inspect.signature(problem.student.forward).parameters else "past_key_values"
    for p in range(len(problem.prompt_ids)):
        rows = torch.nonzero(which == p).flatten()
        if rows.numel() == 0:
            continue
        ids = problem.prompt_ids[p].unsqueeze(0).expand(rows.numel(), -1)
        logits, cache = _next_logits(problem.student, ids, None, key)
        for t in range(T):
            y = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=generator)
            tokens[rows, t] = y[:, 0]
            if t + 1 < T:
                logits, cache = _next_logits(problem.student, y, cache, key)
    return which, tokens


def _next_logits(model, ids: torch.Tensor, cache, key: str):
    """The last position's logits and the KV cache after ``ids`` (``key``: the model's cache argument)."""
    out = model(input_ids=ids, use_cache=True, **({} if cache is None else {key: cache}))
    new = out["cache"] if "cache" in out else out["past_key_values"]
    return out.logits[:, -1], new


@torch.no_grad()
def _forward(problem: LMProblem, which: torch.Tensor, tokens: torch.Tensor):
    """Per trajectory: the student's last hidden states ``[n, T, d]`` (float64) at the positions that predict
    each token, and the teacher's logits there ``[n, T, V]`` (float64)."""
    n, T = tokens.shape
    h = torch.empty(n, T, problem.W_V_d.shape[1], dtype=torch.float64)
    q = torch.empty(n, T, problem.V, dtype=torch.float64)
    for p in range(len(problem.prompt_ids)):
        rows = torch.nonzero(which == p).flatten()
        if rows.numel() == 0:
            continue
        L = problem.prompt_ids[p].numel()
        ids = torch.cat([problem.prompt_ids[p].unsqueeze(0).expand(rows.numel(), -1), tokens[rows]], dim=1)
        s_out = problem.student(input_ids=ids, output_hidden_states=True)
        hidden = s_out.hidden_states[-1][:, L - 1 : L + T - 1]
        # the last hidden state is the one the output layer reads (after the final norm): checked, not assumed
        if not torch.allclose(hidden @ problem.student.get_output_embeddings().weight.T,
                              s_out.logits[:, L - 1 : L + T - 1], atol=1e-4, rtol=1e-4):
            raise InputError("the student's last hidden state is not the input of its output layer")
        h[rows] = hidden.double()
        q[rows] = problem.teacher(input_ids=ids).logits[:, L - 1 : L + T - 1].double()
    return h, q


def head_gradients(problem: LMProblem, tokens: torch.Tensor, h_n_T_d: torch.Tensor, teacher_n_T_V: torch.Tensor,
                   spec: EstimatorSpec) -> torch.Tensor:
    """``[n, V·d]`` each trajectory's gradient of its loss ``Σ_t L_t`` w.r.t. the output layer ``W``."""
    n, T = tokens.shape
    logits = (h_n_T_d @ problem.W_V_d.T).requires_grad_(True)
    mask = torch.ones(n, T, dtype=torch.bool)
    if spec.estimator == "sampled_token":
        lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        lq = torch.log_softmax(teacher_n_T_V, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        adv = sampled_token_advantages(lq, lp.detach(), mask, gamma=spec.gamma)
        per_token = policy_gradient_loss(lp, lp.detach(), adv, mask)
    else:
        ids, tlp = teacher_topk_support(teacher_n_T_V, spec.K)
        per_token = support_kl(logits, ids, tlp, mask, renormalize=spec.renormalize)
    total = aggregate(per_token, mask, "seq-mean-token-sum", denominator=1.0)
    (dz,) = torch.autograd.grad(total, logits)
    return torch.einsum("ntv,ntd->nvd", dz, h_n_T_d).reshape(n, -1)


class _Moments:
    """Streaming sums of per-sample gradients: the mean, and per group ``Σ‖g‖²`` and ``‖Σ g‖²``."""

    def __init__(self, D: int, M: int):
        self.M, self.sum = M, torch.zeros(D, dtype=torch.float64)
        self.group_var: list[float] = []
        self.n = 0

    def add_groups(self, g_n_D: torch.Tensor) -> None:
        self.sum += g_n_D.sum(0)
        self.n += g_n_D.shape[0]
        groups = g_n_D.reshape(-1, self.M, g_n_D.shape[1])
        sq = groups.square().sum((1, 2))
        gsum_sq = groups.sum(1).square().sum(-1)
        self.group_var += ((sq - gsum_sq / self.M) / (self.M - 1)).tolist()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n


def _stats(problem, tokens, h, q, spec, M) -> _Moments:
    n, T = tokens.shape
    per_chunk = max(M, (_CHUNK_LOGITS // (T * problem.V)) // M * M)
    mom = _Moments(problem.W_V_d.numel(), M)
    for a in range(0, n, per_chunk):
        b = min(n, a + per_chunk)
        mom.add_groups(head_gradients(problem, tokens[a:b], h[a:b], q[a:b], spec))
    return mom


def run_lm_variance(
    problem: LMProblem,
    specs: Sequence[EstimatorSpec],
    *,
    Ts: Sequence[int] = DEMO_TS,
    n_estimates: int = LM_N_ESTIMATES,
    samples_per_estimate: int = LM_SAMPLES_PER_ESTIMATE,
    reference_factor: int = 4,
    seed: int = 0,
    verbose: bool = False,
) -> list[dict]:
    """The result rows of ``opdkit analyze variance --problem demo`` (the CSV columns, and for the report:
    ``bias_rel_exact`` and ``variance_exact`` NaN, ``bias_noise_floor`` the reference's noise,
    ``group_variances``)."""
    if n_estimates < 2 or samples_per_estimate < 2 or reference_factor < 1:
        raise InputError("n_estimates and samples_per_estimate: expected >= 2; reference_factor: >= 1")
    if not Ts or any(int(t) < 1 for t in Ts):
        raise InputError(f"Ts: expected horizons >= 1, got {list(Ts)}")
    M, N = int(samples_per_estimate), int(n_estimates) * int(samples_per_estimate)
    results: list[dict] = []
    for T in [int(t) for t in Ts]:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 1009 * T)
        ref_which, ref_tokens = sample_trajectories(problem, N * reference_factor, T, gen)
        ref_h, ref_q = _forward(problem, ref_which, ref_tokens)
        ref = _stats(problem, ref_tokens, ref_h, ref_q, EstimatorSpec("sampled_token", gamma=1.0), M)
        del ref_h, ref_q
        ref_mean = ref.mean
        ref_norm = float(ref_mean.norm())
        ref_noise = math.sqrt(max(sum(ref.group_var) / len(ref.group_var), 0.0) / ref.n) / ref_norm
        which, tokens = sample_trajectories(problem, N, T, gen)
        h, q = _forward(problem, which, tokens)
        for i, spec in enumerate(specs):
            mom = _stats(problem, tokens, h, q, spec, M)
            gv = torch.tensor(mom.group_var, dtype=torch.float64)
            variance = float(gv.mean())
            lo, hi = _bootstrap_ci(gv, int(seed) * 7919 + 131 * T + i)
            results.append({
                "estimator": spec.name, "T": T, "gamma": spec.gamma, "K": spec.K,
                "renormalize": spec.renormalize,
                "bias_rel": float((mom.mean - ref_mean).norm()) / ref_norm,
                "variance": variance, "variance_ci_low": lo, "variance_ci_high": hi,
                "bias_rel_exact": math.nan, "variance_exact": math.nan,
                "bias_noise_floor": math.sqrt(max(variance, 0.0) / N) / ref_norm + ref_noise,
                "n_samples": N, "grad_norm_exact": ref_norm, "reference_noise": ref_noise,
                "group_variances": mom.group_var,
            })
        if verbose:
            print(f"T={T}: {len(specs)} settings, {N} samples (+{N * reference_factor} for the reference), "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    return results
