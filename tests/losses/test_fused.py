"""support_kl_from_hidden equals support_kl on the dense logits, in values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opdkit.errors import InputError
from opdkit.losses import support_kl, support_kl_from_hidden, teacher_topk_support


def _setup(seed, lead=(2, 5), H=6, V=17, K=5, dtype=torch.float64, pad_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    teacher = torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2
    ids, lp = teacher_topk_support(teacher, K)
    pad = torch.rand(*lead, K, generator=g) < pad_frac
    lp = lp.masked_fill(pad, float("-inf"))
    ids = torch.where(pad, torch.full_like(ids, -1), ids)
    mask = torch.rand(*lead, generator=g) > 0.2
    return hidden, weight, ids, lp.to(dtype) if dtype != torch.bfloat16 else lp.float(), mask


def _both(hidden, weight, ids, lp, mask, **opts):
    chunk = opts.pop("chunk_size", 3)
    dense = support_kl(hidden @ weight.T, ids, lp, mask, **opts)
    fused = support_kl_from_hidden(hidden, weight, ids, lp, mask, chunk_size=chunk, **opts)
    w = torch.linspace(0.5, 1.5, dense.numel(), dtype=dense.dtype).reshape(dense.shape)
    gd = torch.autograd.grad((dense * w).sum(), [hidden, weight])
    gf = torch.autograd.grad((fused * w).sum(), [hidden, weight])
    return dense, fused, gd, gf


@given(
    seed=st.integers(0, 1000),
    lead=st.sampled_from([(7,), (2, 5), (2, 2, 3)]),
    chunk=st.integers(1, 12),
    opts=st.sampled_from(
        [
            dict(),
            dict(temperature=0.6),
            dict(divergence="forward_kl"),
            dict(divergence="jsd", beta=0.4),
            dict(renormalize=False),
            dict(renormalize=False, tail_bucket=True),
        ]
    ),
)
def test_fused_equals_dense_values_and_gradients(seed, lead, chunk, opts):
    dense, fused, gd, gf = _both(*_setup(seed, lead), chunk_size=chunk, **dict(opts))
    assert fused.shape == dense.shape and fused.dtype == torch.float64
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
    for a, b in zip(gf, gd):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_gradcheck():
    h, w, ids, lp, mask = _setup(1, (2, 3), H=4, V=9, K=3)
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: support_kl_from_hidden(a, b, ids, lp, mask, chunk_size=2), (h, w))


def test_fused_float32_matches_dense_and_gradients_accumulate():
    h, w, ids, lp, mask = _setup(2, (4, 16), H=32, V=300, K=16, dtype=torch.float32)
    dense, fused, gd, gf = _both(h, w, ids, lp, mask, chunk_size=7)
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-6)
    # float32 sums in another order than the dense matmul: compare relative to the gradient's norm
    for a, b in zip(gf, gd):
        assert (a - b).norm() <= 1e-5 * b.norm()
    # .backward() accumulates into an existing .grad like any autograd op
    w.grad = torch.ones_like(w)
    support_kl_from_hidden(h, w, ids, lp, mask).sum().backward()
    torch.testing.assert_close(w.grad - 1, torch.autograd.grad(support_kl(h @ w.T, ids, lp, mask).sum(), w)[0],
                               rtol=1e-4, atol=1e-6)


def test_fused_bf16_is_finite_and_close_to_float32():
    h, w, ids, lp, mask = _setup(3, (4, 8), H=16, V=64, K=8, dtype=torch.float32, pad_frac=0.0)
    out32 = support_kl_from_hidden(h, w, ids, lp, mask)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    out16 = support_kl_from_hidden(hb, wb, ids, lp, mask)
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()
    torch.testing.assert_close(out16, out32.detach(), rtol=0.05, atol=0.03)
    gh, gw = torch.autograd.grad(out16.sum(), [hb, wb])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    gh32, gw32 = torch.autograd.grad(out32.sum(), [h, w])
    torch.testing.assert_close(gh.float(), gh32, rtol=0.05, atol=0.02)
    torch.testing.assert_close(gw.float(), gw32, rtol=0.05, atol=0.02)


def test_fused_all_masked_is_zero_with_zero_gradient():
    h, w, ids, lp, mask = _setup(4)
    out = support_kl_from_hidden(h, w, ids, lp, torch.zeros_like(mask))
    assert torch.equal(out, torch.zeros_like(out))
    gh, gw = torch.autograd.grad(out.sum(), [h, w])
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_fused_only_hidden_requires_grad():
    h, w, ids, lp, mask = _setup(5)
    w = w.detach()
    (gh,) = torch.autograd.grad(support_kl_from_hidden(h, w, ids, lp, mask).sum(), [h])
    (gd,) = torch.autograd.grad(support_kl(h @ w.T, ids, lp, mask).sum(), [h])
    torch.testing.assert_close(gh, gd)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda a: a.update(weight=a["weight"][:, :3]), "weight"),
        (lambda a: a.update(weight=a["weight"].float()), "dtype"),
        (lambda a: a.update(weight=torch.zeros(17, 6, dtype=torch.float64, device="meta")), "weight"),
        (lambda a: a.update(support_ids=a["support_ids"][:1]), "support_ids"),
        (lambda a: a["support_ids"].__setitem__((0, 0, 0), 17), "support_ids"),
        (lambda a: a["hidden"].__setitem__((0, 0, 0), float("nan")), "hidden"),
        (lambda a: a.update(chunk_size=0), "chunk_size"),
    ],
)
def test_fused_bad_input_names_the_argument(change, needle):
    h, w, ids, lp, mask = _setup(6)
    a = dict(hidden=h.detach().clone(), weight=w.detach(), support_ids=ids.clone(), teacher_logprobs=lp, mask=mask)
    chunk = {"chunk_size": 4}
    if "chunk" in needle:
        chunk = {"chunk_size": 0}
    else:
        change(a)
    with pytest.raises(InputError, match=needle):
        support_kl_from_hidden(**a, **chunk)


def test_value_and_gradient_in_float32_under_autocast():
    """Inside a bf16 autocast region the fused loss still computes in float32, in both passes: its value
    and gradient equal the float32 results outside autocast (the dense loss under autocast does not)."""
    torch.manual_seed(0)
    N, H, V, K = 6, 16, 40, 5
    hidden = torch.randn(N, H, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float32, requires_grad=True)
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(N)])
    teacher = torch.log_softmax(torch.randn(N, K), -1) - 0.5
    mask = torch.ones(N, dtype=torch.bool)

    def run(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = support_kl_from_hidden(hidden, weight, ids, teacher, mask, chunk_size=4).sum()
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        return loss.detach(), gh, gw

    ref, inside = run(False), run(True)
    for a, b in zip(ref, inside, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
