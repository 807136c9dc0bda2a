"""Nucleus (top-p) truncation without sorting a large vocabulary.

transformers' ``TopPLogitsWarper`` sorts all V logits of every row at every generated token: at V = 151,936
that sort is most of a CPU sampling step. The warper keeps the token of descending rank r (r = 1 the
largest) when the probability mass of the tokens ranked *below and at* it, accumulated from the bottom in
float32, exceeds ``1 - p``; in exact arithmetic, when "the mass ranked strictly above it is below p". This
module evaluates that rule in float64 from the row's log-sum-exp over V:

- **narrow nuclei** (a real language model's usual case): the 64 largest logits (``torch.topk``) hold mass
  ``p``; their cumulative sum settles the boundary;
- **wide nuclei** (thousands of tokens, e.g. a random-weight model or a high temperature): the logits are
  cut into 4,096 value ranges by a monotone map, one weighted histogram pass gives the mass above every
  range, and only the tokens of the range(s) at the boundary are sorted (:func:`_bucket_keep`); up to
  V = 32,768 one sort of the row costs less than that pass's many small operations (:func:`_sorted_keep`).

Two things can make the float64 answer differ from the warper's float32 one:

1. a **tie** of logits across the boundary: the warper's sort decides which of the tied tokens go, and
   only it knows its order, so such rows always go to the warper's own code;
2. **rounding**, when a token's mass ranked above lies within the warper's float32 error of ``p`` (its
   cumulative sums were measured within 5.4e-7 of exact at V = 151,936). With ``match_rounding=True`` a
   boundary within ``_MARGIN = 1e-5`` of ``p`` sends the row to the warper's sort, and the kept set is the
   warper's, token for token; this is what :func:`top_p_keep` and :class:`FastTopPLogitsWarper` (a drop-in
   for the warper) do. In a wide nucleus the boundary tokens carry ~1e-5 each, so nearly every such row is
   within the margin and is sorted anyway. With ``match_rounding=False`` (the sampler,
   :mod:`opdkit.rollout.draw`) the float64 answer is kept: the exact nucleus, which differs from the
   warper's only in tokens its float32 rounding decides (mass within ~1e-6 of the boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FastTopPLogitsWarper", "Nucleus", "candidates_from_mask", "nucleus", "top_p_keep"]

# A boundary mass this close to p goes to the warper's own arithmetic. Its float32 cumulative sums differed from
# float64 ones by at most 5.4e-7 at V = 151,936 (zipf, Gaussian logits, τ 0.5-2, measured): 1e-5 is ~20x that.
_MARGIN = 1e-5
_BUCKETS = 4096  # at most
_SORT_MAX_V = 32768  # up to this vocabulary a wide nucleus is found by one sort (fewer, larger operations)
_SPAN = 30.0  # logits more than this below the max share the lowest bucket (each carries < e^-30 of the max's mass)


def _warper_keep(scores_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """The keep mask of transformers' ``TopPLogitsWarper`` (min_tokens_to_keep 1), computed its way."""
    sorted_logits, sorted_indices = torch.sort(scores_B_V, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return ~remove.scatter(1, sorted_indices, remove)


def candidates_from_mask(keep_B_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_B_K, valid_B_K)``: the ids where ``keep_B_V`` is true, ascending, padded (id 0, invalid) to the
    largest count K of any row."""
    B = keep_B_V.shape[0]
    counts_B = keep_B_V.sum(-1)
    K = max(int(counts_B.max()) if B else 0, 1)
    rows, cols = keep_B_V.nonzero(as_tuple=True)  # row-major: each row's ids ascending
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    pos = torch.arange(rows.numel(), device=rows.device) - starts_B[rows]
    ids = torch.zeros((B, K), dtype=torch.long, device=keep_B_V.device)
    valid = torch.zeros((B, K), dtype=torch.bool, device=keep_B_V.device)
    ids[rows, pos] = cols
    valid[rows, pos] = True
    return ids, valid


def _sorted_keep(scores_R_V: torch.Tensor, e_R_V: torch.Tensor, s_R: torch.Tensor, top_p: float, *,
                 match_rounding: bool) -> torch.Tensor:
    """Keep mask ``[R, V]`` by one sort of each row and the float64 rule: for small vocabularies, where a sort
    of V costs less than the bucketed selection's many small operations. Ties across the boundary and (with
    ``match_rounding``) a boundary within ``_MARGIN`` of ``p`` go to the warper, as elsewhere."""
    R, V = scores_R_V.shape
    vals_R_V, order_R_V = torch.sort(scores_R_V, dim=-1, descending=True)
    mass_R_V = e_R_V.gather(1, order_R_V).double().div_(s_R.double()[:, None])
    above_R_V = torch.cumsum(mass_R_V, -1).sub_(mass_R_V)
    keep_sorted = above_R_V < top_p
    n_R = keep_sorted.sum(-1, keepdim=True)
    last, nxt = (n_R - 1).clamp_(min=0), n_R.clamp(max=V - 1)
    bad = (n_R < V) & (vals_R_V.gather(1, last) == vals_R_V.gather(1, nxt))
    if match_rounding:
        bad |= top_p - above_R_V.gather(1, last) < _MARGIN
        bad |= (n_R < V) & (above_R_V.gather(1, nxt) - top_p < _MARGIN)
    keep = torch.empty_like(keep_sorted).scatter_(1, order_R_V, keep_sorted)
    bad = bad[:, 0]
    if bool(bad.any()):
        keep[bad] = _warper_keep(scores_R_V[bad], top_p)
    return keep


def _bucket_keep(scores_R_V: torch.Tensor, e_R_V: torch.Tensor, s_R: torch.Tensor, top_p: float, *,
                 match_rounding: bool) -> torch.Tensor:
    """Keep mask ``[R, V]`` of the nucleus for rows whose nucleus is wide, without sorting V (module docstring).

    ``e_R_V`` are the unnormalised probabilities (``exp(scores - max)``) and ``s_R`` their sum. A higher
    bucket means a strictly larger logit (the map ``(x - lo) * scale``, clamped and floored, is monotone), so
    a bucket whose mass *and everything above it* is below ``p - margin`` is kept whole, one whose mass above
    is at least ``p + margin`` is dropped whole, and only the tokens of the bucket(s) in between are sorted
    and decided one by one.
    """
    R, V = scores_R_V.shape
    device = scores_R_V.device
    margin = _MARGIN if match_rounding else 0.0
    m_R = scores_R_V.amax(-1)
    lo_R = torch.maximum(scores_R_V.clamp(min=-3e38).amin(-1), m_R - _SPAN)
    NB = max(64, min(_BUCKETS, V // 16))  # ~16+ tokens per bucket on average: no more buckets than useful
    scale_R = NB / (m_R - lo_R).clamp(min=1e-30)
    offset_R = torch.arange(R, device=device, dtype=torch.float32) * NB
    # bucket + row offset, as exact small integers in float32 (R * 4096 < 2**24)
    b_R_V = (scores_R_V - lo_R[:, None]).mul_(scale_R[:, None]).clamp_(0, NB - 1).floor_().add_(offset_R[:, None])
    # bucket masses: accumulated in float64 where the warper's answer must be matched to within _MARGIN; else
    # float32 (the sampler's exact-rule nucleus: an error of ~1e-7 of a bucket's mass moves no real boundary)
    acc = torch.float64 if match_rounding else torch.float32
    hist_R_N = torch.zeros(R * NB, dtype=acc, device=device).index_add_(
        0, b_R_V.view(-1).to(torch.int32), e_R_V.reshape(-1).to(acc)).view(R, NB).double()
    hist_R_N /= s_R.double()[:, None]
    at_or_above_R_N = hist_R_N.flip(-1).cumsum(-1).flip(-1)  # mass of this bucket and every higher one
    above_R_N = at_or_above_R_N - hist_R_N
    region_R_N = (at_or_above_R_N >= top_p - margin) & (above_R_N < top_p + margin)
    has_region = region_R_N.any(-1) & torch.isfinite(m_R)
    n = torch.arange(NB, device=device)
    j_lo_R = torch.where(region_R_N, n, NB).amin(-1)
    j_hi_R = torch.where(region_R_N, n, -1).amax(-1)
    keep = b_R_V > (j_hi_R + offset_R)[:, None]
    # the tokens of every row's boundary region, sorted by row, then by logit descending (two stable sorts)
    lo_b, hi_b = (j_lo_R + offset_R)[:, None], (j_hi_R + offset_R)[:, None]
    rows, cols = ((b_R_V >= lo_b) & (b_R_V <= hi_b) & has_region[:, None]).nonzero(as_tuple=True)
    vals = scores_R_V[rows, cols]
    order = torch.sort(vals, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    rows, cols, vals = rows[order], cols[order], vals[order]
    mass = e_R_V[rows, cols].double() / s_R.double()[rows]
    counts_R = torch.bincount(rows, minlength=R)
    starts_R = torch.cumsum(counts_R, 0) - counts_R
    before = torch.cumsum(mass, 0) - mass  # across all rows' segments; each row's start subtracted below
    base_R = torch.zeros(R, dtype=torch.float64, device=device)
    nonempty = counts_R > 0
    base_R[nonempty] = before[starts_R[nonempty]]
    above = above_R_N[rows, j_hi_R[rows]] + before - base_R[rows]  # mass ranked strictly above each token
    kept = above < top_p
    keep[rows[kept], cols[kept]] = True
    # per row: the last kept and the first dropped token of its region; a tie between them (or a boundary
    # within the margin, when the warper's rounding must be matched) sends the row to the warper
    n_keep_R = torch.bincount(rows[kept], minlength=R)
    fallback = ~has_region | ((n_keep_R == 0) & ~keep.any(-1))
    inner = nonempty & (n_keep_R > 0) & (n_keep_R < counts_R)
    if bool(inner.any()):
        last = starts_R[inner] + n_keep_R[inner] - 1
        fallback[inner] |= vals[last] == vals[last + 1]
    if match_rounding:
        near = (above - top_p).abs() < _MARGIN
        fallback |= torch.bincount(rows[near], minlength=R) > 0
    if bool(fallback.any()):
        keep[fallback] = _warper_keep(scores_R_V[fallback], top_p)
    return keep


def _pad_to(x_R_K: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x_R_K, (0, width - x_R_K.shape[1]))  # zeros: id 0, invalid


@dataclass(frozen=True)
class Nucleus:
    """The kept tokens of every row, in one of two forms: rows ``narrow_rows`` as candidate lists
    ``ids_R_K[i][valid_R_K[i]]`` (K small), rows ``wide_rows`` as a mask ``keep_W_V``."""

    narrow_rows: torch.Tensor
    ids_R_K: torch.Tensor
    valid_R_K: torch.Tensor
    wide_rows: torch.Tensor
    keep_W_V: torch.Tensor


def nucleus(scores_B_V: torch.Tensor, top_p: float, *, probs: tuple[torch.Tensor, torch.Tensor] | None = None,
            start_k: int = 64, match_rounding: bool = True) -> Nucleus:
    """The top-p kept set of every row of ``scores_B_V`` (logits after temperature and any top-k, ``-inf``
    for removed tokens), as transformers' warper defines it (module docstring).

    Args:
        top_p: the nucleus mass, in (0, 1).
        probs: ``(e_B_V, s_B, m_B)`` when the caller has them already: ``e = exp(scores - m)`` for some per-row
            ``m`` (e.g. the max before a token was blocked) and ``s`` its row sums (so ``lse = m + log s``).
        start_k: the partial selection's size; rows whose nucleus is wider go to the bucketed selection.
        match_rounding: True: where the warper's float32 rounding could decide, use its own sort (its set,
            token for token); False: the exact (float64) nucleus.
    """
    if scores_B_V.dim() != 2:
        raise ValueError(f"scores: expected [B, V], got shape {tuple(scores_B_V.shape)}")
    if not 0 < top_p < 1:
        raise ValueError(f"top_p: expected 0 < top_p < 1, got {top_p}")
    B, V = scores_B_V.shape
    device = scores_B_V.device
    if probs is None:
        m_B = scores_B_V.amax(-1)
        e_B_V = (scores_B_V - m_B[:, None]).exp()
        s_B = e_B_V.sum(-1)
    else:
        e_B_V, s_B, m_B = probs
    lse_B = m_B.double() + s_B.double().log()  # float32 sum: relative error ~1e-7 in every mass, inside _MARGIN
    k = min(start_k, V)
    r = torch.arange(B, device=device)
    # every probability is at most e_max / s: with k * e_max / s < p the top k cannot hold the nucleus
    e_max_B = torch.exp(scores_B_V.amax(-1).double() - m_B.double()).clamp(max=1.0)
    surely_wide = (k * e_max_B / s_B.double() < top_p - 1e-6) & torch.isfinite(lse_B) & (k < V)
    rest = r[~surely_wide]
    ids_R_K = torch.zeros((0, k), dtype=torch.long, device=device)
    valid_R_K = torch.zeros((0, k), dtype=torch.bool, device=device)
    narrow = rest[:0]
    wide = r[surely_wide]
    if rest.numel():
        vals_R_k, idx_R_k = torch.topk(scores_B_V[rest], k, dim=-1)  # sorted, largest first
        mass_R_k = torch.exp(vals_R_k.double() - lse_B[rest, None])
        above_R_k = torch.cumsum(mass_R_k, dim=-1) - mass_R_k  # mass ranked strictly above each token
        n_keep_R = (above_R_k < top_p).sum(dim=-1)  # ranks are kept from the top while that holds
        settled = (n_keep_R < k) | (k == V)  # the first dropped token is inside the top k
        q = torch.arange(rest.numel(), device=device)
        last = (n_keep_R - 1).clamp(min=0)
        nxt = n_keep_R.clamp(max=k - 1)
        tie = (n_keep_R < k) & (vals_R_k[q, last] == vals_R_k[q, nxt])
        bad = tie | ~torch.isfinite(lse_B[rest])
        if match_rounding:  # only the last kept and the first dropped token can sit near the boundary
            bad |= (top_p - above_R_k[q, last] < _MARGIN) | ((n_keep_R < k) & (above_R_k[q, nxt] - top_p < _MARGIN))
        ok = settled & ~bad
        narrow = rest[ok]
        ids_R_K = idx_R_k[ok]
        valid_R_K = torch.arange(k, device=device)[None, :] < n_keep_R[ok][:, None]
        if (settled & bad).any():  # the warper's own answer; usually a handful of tokens
            rows = rest[settled & bad]
            e_ids, e_valid = candidates_from_mask(_warper_keep(scores_B_V[rows], top_p))
            width = max(k, e_ids.shape[1])
            ids_R_K = torch.cat([_pad_to(ids_R_K, width), _pad_to(e_ids, width)])
            valid_R_K = torch.cat([_pad_to(valid_R_K, width), _pad_to(e_valid, width)])
            narrow = torch.cat([narrow, rows])
        wide = torch.cat([wide, rest[~settled]])
    wide = wide.sort().values
    select = _sorted_keep if V <= _SORT_MAX_V else _bucket_keep
    if wide.numel() == B:  # rows 0..B-1 in order
        keep = select(scores_B_V, e_B_V, s_B, top_p, match_rounding=match_rounding)
    elif wide.numel():
        keep = select(scores_B_V[wide], e_B_V[wide], s_B[wide], top_p, match_rounding=match_rounding)
    else:
        keep = torch.zeros((0, V), dtype=torch.bool, device=device)
    return Nucleus(narrow, ids_R_K, valid_R_K, wide, keep)


def top_p_keep(scores_B_V: torch.Tensor, top_p: float, *, match_rounding: bool = True) -> torch.Tensor:
    """Bool ``[B, V]``: the tokens transformers' top-p warper keeps for ``scores_B_V`` (module docstring)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
    if top_p >= 1.0:
        return _warper_keep(scores_B_V, top_p)
    nu = nucleus(scores_B_V, top_p, match_rounding=match_rounding)
    keep = torch.zeros(scores_B_V.shape, dtype=torch.bool, device=scores_B_V.device)
    rows = nu.narrow_rows[:, None].expand_as(nu.ids_R_K)
    keep[rows[nu.valid_R_K], nu.ids_R_K[nu.valid_R_K]] = True
    keep[nu.wide_rows] = nu.keep_W_V
    return keep


class FastTopPLogitsWarper:
    """A drop-in for transformers' ``TopPLogitsWarper`` (``min_tokens_to_keep=1``): the same kept tokens,
    found by :func:`top_p_keep` instead of a full sort. Usable in ``generate``'s ``logits_processor`` list."""

    def __init__(self, top_p: float, filter_value: float = -float("inf")):
        top_p = float(top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
        self.top_p = top_p
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~top_p_keep(scores, self.top_p), self.filter_value)
