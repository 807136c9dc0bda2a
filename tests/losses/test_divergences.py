"""support_kl and full_reverse_kl against brute-force float64 references and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opdkit.errors import InputError
from opdkit.losses import full_reverse_kl, support_kl, teacher_topk_support
from tests.losses import reference as ref
from tests.losses.helpers import make_problem


def _grad(out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None:
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    if not out.requires_grad:  # e.g. a reference whose every position was masked
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad((out * weights).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


@st.composite
def support_cases(draw):
    V = draw(st.integers(2, 12))
    renormalize = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 10_000)),
        B=draw(st.integers(1, 3)),
        T=draw(st.integers(1, 4)),
        V=V,
        K=draw(st.integers(1, V)),
        renormalize=renormalize,
        kind=draw(st.sampled_from(["reverse_kl", "forward_kl", "jsd"])),
        beta=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
        tail_bucket=(not renormalize) and draw(st.booleans()),
        pad_frac=draw(st.sampled_from([0.0, 0.3])),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.5])),
    )


@given(support_cases())
def test_support_kl_matches_bruteforce_values_and_gradients(case):
    p = make_problem(case["seed"], case["B"], case["T"], case["V"], case["K"], pad_frac=case["pad_frac"])
    opts = dict(renormalize=case["renormalize"], beta=case["beta"], tail_bucket=case["tail_bucket"])
    got = support_kl(
        p.student_logits, p.support_ids, p.teacher_logprobs, p.mask,
        divergence=case["kind"], temperature=case["temperature"], **opts,
    )
    want = ref.support_objective(
        p.student_logits, p.support_ids, p.teacher_logprobs, p.mask,
        kind=case["kind"], temperature=case["temperature"], **opts,
    )
    assert got.dtype == torch.float64 and got.shape == p.mask.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(got, p.student_logits), _grad(want, p.student_logits), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("renormalize", [True, False])
def test_k_equals_v_is_the_full_reverse_kl(renormalize):
    p = make_problem(3, B=2, T=5, V=13, K=13)
    ids, lp = teacher_topk_support(p.teacher_logits, 13)
    got = support_kl(p.student_logits, ids, lp, p.mask, renormalize=renormalize)
    full = full_reverse_kl(p.student_logits, p.teacher_logits, p.mask)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(got, p.student_logits), _grad(full, p.student_logits), rtol=1e-9, atol=1e-12)


def test_full_reverse_kl_matches_bruteforce():
    p = make_problem(5, B=2, T=4, V=9)
    got = full_reverse_kl(p.student_logits, p.teacher_logits, p.mask, temperature=1.0)
    want = ref.full_reverse_kl(p.student_logits, p.teacher_logits, p.mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(got, p.student_logits), _grad(want, p.student_logits), rtol=1e-9, atol=1e-12)


def test_full_reverse_kl_temperature_divides_both():
    p = make_problem(6, V=7)
    got = full_reverse_kl(p.student_logits, p.teacher_logits, p.mask, temperature=2.0)
    want = full_reverse_kl(p.student_logits / 2.0, p.teacher_logits / 2.0, p.mask)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "opts",
    [
        dict(renormalize=True),
        dict(renormalize=True, divergence="forward_kl"),
        dict(renormalize=True, divergence="jsd", beta=0.3),
        dict(renormalize=False, tail_bucket=True),
        dict(renormalize=False, tail_bucket=True, divergence="jsd", beta=0.5),
    ],
)
def test_identical_student_and_teacher_give_zero_and_zero_gradient(opts):
    p = make_problem(7, B=2, T=3, V=10, K=4)
    logits = p.student_logits
    ids, lp = teacher_topk_support(logits.detach(), 4)
    out = support_kl(logits, ids, lp, p.mask, **opts)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-12, rtol=0)
    torch.testing.assert_close(_grad(out, logits), torch.zeros_like(logits), atol=1e-12, rtol=0)
    full = full_reverse_kl(logits, logits.detach(), p.mask)
    torch.testing.assert_close(full, torch.zeros_like(full), atol=1e-12, rtol=0)
    torch.testing.assert_close(_grad(full, logits), torch.zeros_like(logits), atol=1e-12, rtol=0)


def test_truncated_sum_without_renormalisation_is_not_minimised_at_the_teacher():
    """The ablation's known flaw: at π = q the truncated sum is 0 but its gradient is not."""
    p = make_problem(8, B=1, T=2, V=10, K=3)
    ids, lp = teacher_topk_support(p.student_logits.detach(), 3)
    out = support_kl(p.student_logits, ids, lp, torch.ones(1, 2, dtype=torch.bool), renormalize=False)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-12, rtol=0)
    assert _grad(out, p.student_logits).abs().max() > 1e-3


def test_renormalised_gradient_reaches_only_support_logits():
    p = make_problem(9, B=2, T=3, V=12, K=4, pad_frac=0.25, mask_frac=0.0)
    out = support_kl(p.student_logits, p.support_ids, p.teacher_logprobs, p.mask)
    g = _grad(out, p.student_logits)
    valid = p.teacher_logprobs > -math.inf
    safe_ids = torch.where(valid, p.support_ids, 0)
    on_support = torch.zeros_like(g, dtype=torch.long).scatter_add_(-1, safe_ids, valid.long()) > 0
    assert g[~on_support].abs().max() == 0
    assert g[on_support].abs().max() > 0
    # without renormalisation the normaliser carries gradient to every logit
    g2 = _grad(support_kl(p.student_logits, p.support_ids, p.teacher_logprobs, p.mask, renormalize=False),
               p.student_logits)
    assert (g2[~on_support] != 0).float().mean() > 0.9


@pytest.mark.parametrize("renormalize", [True, False])
def test_all_masked_gives_zero_and_no_nan(renormalize):
    p = make_problem(10, pad_frac=0.5)
    mask = torch.zeros_like(p.mask)
    out = support_kl(p.student_logits, p.support_ids, p.teacher_logprobs, mask, renormalize=renormalize)
    assert torch.equal(out, torch.zeros_like(out))
    g = _grad(out, p.student_logits)
    assert torch.isfinite(g).all() and g.abs().max() == 0
    full = full_reverse_kl(p.student_logits, p.teacher_logits, mask)
    assert torch.equal(full, torch.zeros_like(full))


@pytest.mark.parametrize("tail_bucket", [False, True])
def test_fully_padded_support_gives_zero_and_finite_gradient(tail_bucket):
    p = make_problem(11, B=2, T=3, V=8, K=3)
    lp = p.teacher_logprobs.clone()
    lp[0, 1] = float("-inf")  # every slot of one position is padded
    out = support_kl(p.student_logits, p.support_ids, lp, p.mask, renormalize=not tail_bucket, tail_bucket=tail_bucket)
    assert out[0, 1] == 0
    assert torch.isfinite(out).all()
    assert torch.isfinite(_grad(out, p.student_logits)).all()


def test_neg_inf_teacher_logits_become_padded_slots():
    """A teacher that rules tokens out (-inf logits) yields -inf support entries that are ignored."""
    p = make_problem(12, B=1, T=2, V=6, K=5, mask_frac=0.0)
    teacher = p.teacher_logits.clone()
    teacher[..., :3] = float("-inf")  # only 3 finite tokens, K = 5
    ids, lp = teacher_topk_support(teacher, 5)
    assert torch.isinf(lp[..., 3:]).all() and torch.isfinite(lp[..., :3]).all()
    out = support_kl(p.student_logits, ids, lp, p.mask)
    want = support_kl(p.student_logits, ids[..., :3], lp[..., :3], p.mask)
    torch.testing.assert_close(out, want)
    assert torch.isfinite(_grad(out, p.student_logits)).all()
    # the full reverse KL against that teacher is infinite: it cannot ignore the ruled-out tokens
    full = full_reverse_kl(p.student_logits, teacher, p.mask)
    assert torch.isinf(full).all()  # the student puts mass where the teacher has none


def test_padded_slot_ids_are_never_read():
    p = make_problem(13, pad_frac=0.4)
    ids_a = p.support_ids.clone()
    ids_b = torch.where(p.teacher_logprobs > -math.inf, ids_a, torch.full_like(ids_a, 10**9))
    a = support_kl(p.student_logits, ids_a, p.teacher_logprobs, p.mask)
    b = support_kl(p.student_logits, ids_b, p.teacher_logprobs, p.mask)
    torch.testing.assert_close(a, b)


def test_jsd_endpoints_are_the_kls():
    p = make_problem(14)
    args = (p.student_logits, p.support_ids, p.teacher_logprobs, p.mask)
    forward = support_kl(*args, divergence="forward_kl")
    torch.testing.assert_close(support_kl(*args, divergence="jsd", beta=0.0), forward)
    torch.testing.assert_close(support_kl(*args, divergence="jsd", beta=1.0), support_kl(*args))
    mid = support_kl(*args, divergence="jsd", beta=0.5)
    assert (mid >= -1e-12).all() and (mid <= math.log(2) + 1e-12).all()


def test_gradcheck_float64():
    p = make_problem(15, B=1, T=2, V=6, K=3, pad_frac=0.2, scale=1.0)
    x = p.student_logits.detach().clone().requires_grad_()
    for opts in (dict(), dict(renormalize=False, tail_bucket=True), dict(divergence="jsd", beta=0.3)):
        assert torch.autograd.gradcheck(
            lambda z, opts=opts: support_kl(z, p.support_ids, p.teacher_logprobs, p.mask, **opts), (x,)
        )
    assert torch.autograd.gradcheck(lambda z: full_reverse_kl(z, p.teacher_logits, p.mask), (x,))


@pytest.mark.parametrize("renormalize", [True, False])
def test_bf16_inputs_are_finite_and_close_to_float32(renormalize):
    p = make_problem(16, B=4, T=8, V=64, K=8, dtype=torch.float32, random_support=False, mask_frac=0.0)
    s32 = p.student_logits.detach().requires_grad_()
    s16 = p.student_logits.detach().to(torch.bfloat16).requires_grad_()
    out32 = support_kl(s32, p.support_ids, p.teacher_logprobs, p.mask, renormalize=renormalize)
    out16 = support_kl(s16, p.support_ids, p.teacher_logprobs.to(torch.bfloat16), p.mask, renormalize=renormalize)
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()
    # bf16 keeps ~3 significant digits of the logits (scale 2 -> absolute error ~1e-2)
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.03)
    g16 = _grad(out16, s16)
    assert g16.dtype == torch.bfloat16 and torch.isfinite(g16).all()
    torch.testing.assert_close(g16.float(), _grad(out32, s32), rtol=0.05, atol=0.02)


# ---------------------------------------------------------------------------------------------- bad input
def _args():
    p = make_problem(17, B=2, T=3, V=8, K=3)
    return dict(
        student_logits=p.student_logits.detach(),
        support_ids=p.support_ids,
        teacher_logprobs=p.teacher_logprobs,
        mask=p.mask,
    )


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda a: a.update(mask=a["mask"][:, :2]), "mask"),
        (lambda a: a.update(mask=a["mask"][0]), "mask"),
        (lambda a: a.update(support_ids=a["support_ids"][:, :2]), "support_ids"),
        (lambda a: a.update(teacher_logprobs=a["teacher_logprobs"][..., :2]), "teacher_logprobs"),
        (lambda a: a.update(support_ids=a["support_ids"].float()), "support_ids"),
        (lambda a: a.update(student_logits=a["student_logits"].long()), "student_logits"),
        (lambda a: a.update(teacher_logprobs=a["teacher_logprobs"].long()), "teacher_logprobs"),
        (lambda a: a.update(mask=a["mask"].float() * 2), "mask"),
        (lambda a: a["support_ids"].__setitem__((0, 0, 0), 8), "support_ids"),
        (lambda a: a["support_ids"].__setitem__((0, 0, 0), -1), "support_ids"),
        (lambda a: a["student_logits"].__setitem__((1, 2, 3), float("nan")), "student_logits"),
        (lambda a: a["teacher_logprobs"].__setitem__((1, 2, 0), float("nan")), "teacher_logprobs"),
        (lambda a: a.update(teacher_logprobs=a["teacher_logprobs"] + 5.0), "teacher_logprobs"),
        (lambda a: a.update(mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), "device"),
        (lambda a: a.update(mask=[[1, 1, 1], [1, 1, 1]]), "mask"),
    ],
)
def test_bad_input_names_the_argument(change, needle):
    a = _args()
    change(a)
    with pytest.raises(InputError, match=needle):
        support_kl(a["student_logits"], a["support_ids"], a["teacher_logprobs"], a["mask"])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(divergence="kl"), "divergence"),
        (dict(beta=1.5), "beta"),
        (dict(tail_bucket=True), "tail_bucket"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_options_name_the_option(kwargs, needle):
    a = _args()
    with pytest.raises(InputError, match=needle):
        support_kl(a["student_logits"], a["support_ids"], a["teacher_logprobs"], a["mask"], **kwargs)


def test_full_reverse_kl_vocabulary_mismatch_is_explained():
    s = torch.randn(2, 3, 8)
    with pytest.raises(InputError, match="vocabulary"):
        full_reverse_kl(s, torch.randn(2, 3, 9), torch.ones(2, 3))


def test_full_reverse_kl_infinite_logits_keep_their_meaning():
    """The closed-form path falls back to the guarded formula: a student -inf logit is a zero-probability
    token (finite KL and gradient); a teacher zero under student mass is an infinite KL."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 50, generator=g, dtype=torch.float64)
    t = torch.randn(3, 50, generator=g, dtype=torch.float64)
    s[0, :10] = float("-inf")
    x = s.clone().requires_grad_(True)
    kl = full_reverse_kl(x, t, torch.ones(3, dtype=torch.bool), check_inputs=False)
    lp, lq = torch.log_softmax(s[0, 10:], -1), torch.log_softmax(t[0], -1)[10:]  # q over all 50 ids
    assert torch.allclose(kl[0], (lp.exp() * (lp - lq)).sum())
    kl.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, :10] == 0).all()
    t2 = t.clone()
    t2[1, 3] = float("-inf")
    assert torch.isinf(full_reverse_kl(s, t2, torch.ones(3, dtype=torch.bool), check_inputs=False)[1])


def test_full_reverse_kl_teacher_gradient_masked_rows_and_second_derivatives():
    """A differentiated teacher gets its gradient (autograd path); a masked row whose KL is infinite sends no
    NaN back; the closed-form path refuses a double backward instead of returning wrong numbers."""
    g = torch.Generator().manual_seed(7)
    zs = torch.randn(4, 20, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 20, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True])
    gs, gt = torch.autograd.grad(full_reverse_kl(zs, zt, mask).sum(), (zs, zt))
    ref_s, ref_t = torch.autograd.grad(ref.full_reverse_kl(zs, zt, mask).sum(), (zs, zt))
    torch.testing.assert_close(gs, ref_s)
    torch.testing.assert_close(gt, ref_t)
    assert torch.autograd.gradgradcheck(lambda a, b: full_reverse_kl(a, b, mask), (zs, zt))

    t_inf = zt.detach().clone()
    t_inf[1, 5] = float("-inf")  # row 1 is masked: its infinite KL must not poison the gradient
    x = zs.detach().clone().requires_grad_(True)
    out = full_reverse_kl(x, t_inf, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()

    y = zs.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(full_reverse_kl(y, zt.detach(), mask).sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|require grad"):
        torch.autograd.grad(grad.sum(), y)
