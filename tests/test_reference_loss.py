"""``mgit_fast.reference.mgit_loss`` against independent oracles.

JS: ``scipy.spatial.distance.jensenshannon(p, q, axis=1) ** 2`` (natural log), mean over the
kept rows. CE: ``torch.nn.functional.cross_entropy`` in float64 with the same label smoothing
and ignore_index.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

from conftest import assert_rel_close
from mgit_fast import reference

LN2 = math.log(2.0)
F64_TOL = 1e-10
F32_TOL = 1e-5
HALF_TOL = 2e-2
OUTPUTS = ("loss", "ce_primary", "ce_auxiliary", "js")


# ------------------------------------------------------------------------------------------
# oracles and builders
# ------------------------------------------------------------------------------------------
def scipy_js(zp, za, target, temperature=1.0, ignore_index=-100):
    """Mean over kept rows of scipy's JS distance squared (natural log) on float64 softmaxes."""
    zp = zp.detach().to(torch.float64) / temperature
    za = za.detach().to(torch.float64) / temperature
    p = torch.softmax(zp, dim=1).numpy()
    q = torch.softmax(za, dim=1).numpy()
    rows = jensenshannon(p, q, axis=1) ** 2
    keep = (target != ignore_index).numpy()
    return float(rows[keep].mean()) if keep.any() else 0.0, rows


def torch_ce(z, target, label_smoothing=0.0, ignore_index=-100):
    return F.cross_entropy(
        z.to(torch.float64), target.long(), label_smoothing=label_smoothing, ignore_index=ignore_index
    )


def make_logits(B, C, dtype=torch.float64, spread=2.0, requires_grad=False):
    zp = (spread * torch.randn(B, C, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad)
    za = (spread * torch.randn(B, C, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad)
    return zp, za


def make_target(B, C, ignored=0, ignore_index=-100, dtype=torch.int64):
    target = torch.randint(0, C, (B,))
    if ignored:
        target[torch.randperm(B)[:ignored]] = ignore_index
    return target.to(dtype)


def as_scalar(x):
    return torch.as_tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------------------------
# JS
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("C", [2, 10, 1000])
@pytest.mark.parametrize("ignored", [0, 5])
def test_js_matches_scipy(temperature, C, ignored):
    B = 32
    zp, za = make_logits(B, C)
    target = make_target(B, C, ignored=ignored)
    out = reference.mgit_loss(zp, za, target, temperature=temperature)
    expected, rows = scipy_js(zp, za, target, temperature)
    assert_rel_close(out.js, as_scalar(expected), F64_TOL, "js")
    # the per-row helper matches too
    js_rows = reference.jensen_shannon_rows(zp, za, temperature=temperature)
    assert_rel_close(js_rows, torch.from_numpy(rows), F64_TOL, "js rows")


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_js_float32_matches_scipy(temperature):
    B, C = 64, 10
    zp, za = make_logits(B, C, dtype=torch.float32)
    target = make_target(B, C, ignored=3)
    out = reference.mgit_loss(zp, za, target, temperature=temperature)
    expected, _ = scipy_js(zp, za, target, temperature)
    assert out.js.dtype == torch.float32
    assert_rel_close(out.js, as_scalar(expected), F32_TOL, "js")


@pytest.mark.parametrize("spread", [0.1, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_js_bounds(spread, dtype):
    zp, za = make_logits(256, 7, dtype=dtype, spread=spread)
    rows = reference.jensen_shannon_rows(zp, za)
    assert torch.isfinite(rows).all()
    assert (rows >= -1e-7).all() and (rows <= LN2 + 1e-6).all()
    js = reference.mgit_loss(zp, za, make_target(256, 7)).js
    assert torch.isfinite(js) and -1e-7 <= js.item() <= LN2 + 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_js_identical_logits_is_zero(dtype, tol, temperature):
    B, C = 16, 10
    z = (3 * torch.randn(B, C, dtype=torch.float64)).to(dtype)
    zp, za = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out = reference.mgit_loss(zp, za, make_target(B, C), temperature=temperature)
    assert torch.isfinite(out.js) and abs(out.js.item()) < tol
    # JS has its minimum there: zero gradient
    out.js.backward()
    for g in (zp.grad, za.grad):
        assert torch.isfinite(g).all() and g.abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [2, 10, 1000])
def test_js_disjoint_is_ln2(dtype, C):
    B = 8
    a = torch.arange(B) % C
    b = (a + 1) % C
    hot = 60.0
    zp = (hot * F.one_hot(a, C)).to(dtype)
    za = (hot * F.one_hot(b, C)).to(dtype)
    js = reference.mgit_loss(zp, za, a).js
    assert torch.isfinite(js) and abs(js.item() - LN2) < 1e-6
    # exactly one-hot in the limit: ±1e4 logits
    zp = (2e4 * F.one_hot(a, C) - 1e4).to(dtype)
    za = (2e4 * F.one_hot(b, C) - 1e4).to(dtype)
    js = reference.mgit_loss(zp, za, a).js
    assert torch.isfinite(js) and abs(js.item() - LN2) < 1e-6


def test_js_excludes_ignored_rows():
    """Changing an ignored row's logits changes nothing."""
    B, C = 12, 5
    zp, za = make_logits(B, C)
    target = make_target(B, C, ignored=4)
    out = reference.mgit_loss(zp, za, target)
    ignored = target == -100
    zp2 = zp.clone()
    zp2[ignored] = 50 * torch.randn(int(ignored.sum()), C, dtype=torch.float64)
    out2 = reference.mgit_loss(zp2, za, target)
    for name in OUTPUTS:
        assert torch.equal(getattr(out, name), getattr(out2, name)), name


# ------------------------------------------------------------------------------------------
# CE and the total
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("ignored", [0, 7])
@pytest.mark.parametrize("C", [2, 10, 1000])
def test_ce_matches_torch(label_smoothing, ignore_index, ignored, C):
    B = 24
    zp, za = make_logits(B, C)
    target = make_target(B, C, ignored=ignored, ignore_index=ignore_index)
    out = reference.mgit_loss(
        zp, za, target, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    ce_p = torch_ce(zp, target, label_smoothing, ignore_index)
    ce_a = torch_ce(za, target, label_smoothing, ignore_index)
    assert_rel_close(out.ce_primary, ce_p, F64_TOL, "ce_primary")
    assert_rel_close(out.ce_auxiliary, ce_a, F64_TOL, "ce_auxiliary")
    js, _ = scipy_js(zp, za, target, ignore_index=ignore_index)
    assert_rel_close(out.js, as_scalar(js), F64_TOL, "js")
    # the reference cross_entropy helper on its own
    assert_rel_close(
        reference.cross_entropy(zp, target, label_smoothing=label_smoothing, ignore_index=ignore_index),
        ce_p,
        F64_TOL,
    )


@pytest.mark.parametrize("js_weight", [None, 0.0, 0.1, 2.5, -1.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_loss_is_weighted_sum(js_weight, dtype, tol):
    B, C = 16, 10
    zp, za = make_logits(B, C, dtype=dtype)
    target = make_target(B, C, ignored=2)
    kwargs = {} if js_weight is None else {"js_weight": js_weight}
    out = reference.mgit_loss(zp, za, target, label_smoothing=0.1, temperature=2.0, **kwargs)
    weight = 0.1 if js_weight is None else js_weight
    expected = out.ce_primary.double() + out.ce_auxiliary.double() + weight * out.js.double()
    assert_rel_close(out.loss, expected, tol, "loss")
    # and against fully independent oracles
    independent = (
        torch_ce(zp, target, 0.1)
        + torch_ce(za, target, 0.1)
        + weight * scipy_js(zp, za, target, 2.0)[0]
    )
    assert_rel_close(out.loss, independent, 1e-10 if dtype == torch.float64 else F32_TOL)


def test_output_is_named_tuple():
    zp, za = make_logits(4, 3)
    out = reference.mgit_loss(zp, za, make_target(4, 3))
    assert isinstance(out, reference.MGiTLossOutput)
    loss, ce_p, ce_a, js = out
    assert loss is out.loss and ce_p is out.ce_primary and ce_a is out.ce_auxiliary and js is out.js


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "output,label_smoothing,temperature,fast_mode",
    [(o, 0.1, 2.0, True) for o in OUTPUTS]
    + [(o, 0.0, 0.5, True) for o in OUTPUTS]
    + [("mix", 0.1, 0.5, False)],
)
def test_gradcheck(output, label_smoothing, temperature, fast_mode):
    B, C = (6, 5) if fast_mode else (5, 4)
    zp, za = make_logits(B, C, requires_grad=True)
    target = make_target(B, C, ignored=2)
    weights = torch.rand(4, dtype=torch.float64) + 0.1

    def fn(zp, za):
        out = reference.mgit_loss(
            zp, za, target, label_smoothing=label_smoothing, temperature=temperature, js_weight=0.7
        )
        if output == "mix":
            return sum(w * o for w, o in zip(weights, out))
        return getattr(out, output)

    assert torch.autograd.gradcheck(
        fn, (zp, za), eps=1e-6, atol=1e-8, rtol=1e-5, fast_mode=fast_mode
    )


@pytest.mark.parametrize("output", OUTPUTS)
def test_grads_match_oracle_autograd(output):
    """Gradients equal those of F.cross_entropy and of a JS written from scratch in float64."""
    B, C = 20, 7
    target = make_target(B, C, ignored=5)
    zp, za = make_logits(B, C, requires_grad=True)
    zp2, za2 = (t.detach().clone().requires_grad_(True) for t in (zp, za))
    T, eps, lam = 2.0, 0.1, 0.3
    out = reference.mgit_loss(zp, za, target, label_smoothing=eps, temperature=T, js_weight=lam)

    keep = target != -100
    p, q = torch.softmax(zp2[keep] / T, 1), torch.softmax(za2[keep] / T, 1)
    m = 0.5 * (p + q)
    js = (0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)).mean()
    ce_p, ce_a = torch_ce(zp2, target, eps), torch_ce(za2, target, eps)
    ref = {"loss": ce_p + ce_a + lam * js, "ce_primary": ce_p, "ce_auxiliary": ce_a, "js": js}[output]

    getattr(out, output).backward()
    ref.backward()
    for name, a, b in (("primary", zp, zp2), ("auxiliary", za, za2)):
        if b.grad is None:  # the output does not depend on this input
            assert a.grad is None or torch.equal(a.grad, torch.zeros_like(a.grad)), name
        else:
            assert_rel_close(a.grad, b.grad, 1e-10, f"grad {name}")


def test_ignored_rows_get_exactly_zero_gradient():
    B, C = 16, 10
    zp, za = make_logits(B, C, requires_grad=True)
    target = make_target(B, C, ignored=6)
    out = reference.mgit_loss(zp, za, target, label_smoothing=0.1, temperature=2.0, js_weight=0.5)
    weights = torch.rand(4, dtype=torch.float64) + 0.1
    sum(w * o for w, o in zip(weights, out)).backward()
    ignored = target == -100
    for g in (zp.grad, za.grad):
        assert torch.isfinite(g).all()
        assert torch.equal(g[ignored], torch.zeros_like(g[ignored]))
        assert (g[~ignored].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_every_row_ignored_gives_zero(dtype, ignore_index):
    B, C = 8, 5
    zp, za = make_logits(B, C, dtype=dtype, requires_grad=True)
    target = torch.full((B,), ignore_index, dtype=torch.int64)
    out = reference.mgit_loss(
        zp, za, target, label_smoothing=0.1, temperature=0.5, ignore_index=ignore_index
    )
    for name in OUTPUTS:
        value = getattr(out, name)
        assert torch.isfinite(value), name
        assert value.item() == 0.0, name
    sum(out).backward()
    for g in (zp.grad, za.grad):
        assert g is not None and torch.isfinite(g).all()
        assert torch.equal(g, torch.zeros_like(g))


def test_empty_batch_gives_zero():
    zp, za = make_logits(0, 4, requires_grad=True)
    out = reference.mgit_loss(zp, za, torch.zeros(0, dtype=torch.long))
    for name in OUTPUTS:
        assert getattr(out, name).item() == 0.0, name


# ------------------------------------------------------------------------------------------
# large logits, dtypes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,magnitude",
    [
        (torch.float64, 1e4),
        (torch.float32, 1e4),
        (torch.float32, 3e4),
        (torch.float16, 3e4),
        (torch.bfloat16, 3e4),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_large_logits_stay_finite(dtype, magnitude, temperature):
    B, C = 32, 10
    zp = (magnitude * (2 * torch.rand(B, C, dtype=torch.float64) - 1)).to(dtype).requires_grad_(True)
    za = (magnitude * (2 * torch.rand(B, C, dtype=torch.float64) - 1)).to(dtype).requires_grad_(True)
    # a few rows where the two models agree exactly, a few with one extreme logit each
    with torch.no_grad():
        za[:4] = zp[:4]
        zp[4:6] = -magnitude
        zp[4:6, 0] = magnitude
    target = make_target(B, C, ignored=3)
    kwargs = dict(label_smoothing=0.1, temperature=temperature, js_weight=0.5)
    out = reference.mgit_loss(zp, za, target, **kwargs)
    zp64, za64 = (t.detach().to(torch.float64).requires_grad_(True) for t in (zp, za))
    ref = reference.mgit_loss(zp64, za64, target, **kwargs)
    for name in OUTPUTS:
        assert_rel_close(getattr(out, name), getattr(ref, name), F32_TOL, name)
    assert_rel_close(out.ce_primary, torch_ce(zp64, target, 0.1), F32_TOL, "ce vs torch")
    assert -1e-6 <= out.js.item() <= LN2 + 1e-6
    # gradients of the total loss
    out.loss.backward()
    ref.loss.backward()
    for name, a, b in (("primary", zp, zp64), ("auxiliary", za, za64)):
        tol = F32_TOL if dtype in (torch.float32, torch.float64) else HALF_TOL
        assert_rel_close(a.grad, b.grad, tol, f"grad {name}")


@pytest.mark.parametrize(
    "dtype,out_dtype,tol",
    [
        (torch.float16, torch.float32, HALF_TOL),
        (torch.bfloat16, torch.float32, HALF_TOL),
        (torch.float32, torch.float32, F32_TOL),
        (torch.float64, torch.float64, 1e-14),
    ],
)
def test_output_dtypes_and_precision(dtype, out_dtype, tol):
    B, C = 64, 10
    zp, za = make_logits(B, C, dtype=dtype, requires_grad=True)
    target = make_target(B, C, ignored=4)
    kwargs = dict(label_smoothing=0.1, temperature=2.0, js_weight=0.3)
    out = reference.mgit_loss(zp, za, target, **kwargs)
    zp64, za64 = (t.detach().to(torch.float64).requires_grad_(True) for t in (zp, za))
    ref = reference.mgit_loss(zp64, za64, target, **kwargs)
    for name in OUTPUTS:
        value = getattr(out, name)
        assert value.dtype == out_dtype and value.dim() == 0, name
        assert value.requires_grad, name
        assert_rel_close(value, getattr(ref, name), tol, name)
    # independent oracle for the float64 side
    assert_rel_close(ref.ce_primary, torch_ce(zp64, target, 0.1), 1e-12)
    weights = torch.rand(4, dtype=torch.float64) + 0.1
    sum(w * o for w, o in zip(weights, out)).backward()
    sum(w * o for w, o in zip(weights, ref)).backward()
    for name, a, b in (("primary", zp, zp64), ("auxiliary", za, za64)):
        assert a.grad.dtype == dtype, name
        assert_rel_close(a.grad, b.grad, tol, f"grad {name}")


def test_int32_targets_equal_int64():
    B, C = 16, 10
    zp, za = make_logits(B, C)
    target = make_target(B, C, ignored=3)
    out64 = reference.mgit_loss(zp, za, target, label_smoothing=0.1)
    out32 = reference.mgit_loss(zp, za, target.to(torch.int32), label_smoothing=0.1)
    for name in OUTPUTS:
        assert torch.equal(getattr(out64, name), getattr(out32, name)), name
    assert_rel_close(out32.ce_primary, torch_ce(zp, target, 0.1), F64_TOL)


def test_non_contiguous_logits():
    B, C = 16, 10
    big = torch.randn(C, 2 * B, dtype=torch.float64)
    zp = big[:, ::2].t()  # [B, C], strided rows and columns
    za = torch.randn(B, 3 * C, dtype=torch.float64)[:, C : 2 * C]
    assert not zp.is_contiguous() and not za.is_contiguous()
    target = make_target(B, C, ignored=2)
    out = reference.mgit_loss(zp, za, target)
    ref = reference.mgit_loss(zp.contiguous(), za.contiguous(), target)
    for name in OUTPUTS:
        assert_rel_close(getattr(out, name), getattr(ref, name), 1e-14, name)
    assert_rel_close(out.ce_auxiliary, torch_ce(za, target), F64_TOL)


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
B_, C_ = 6, 5


def call(zp=None, za=None, target=None, **kwargs):
    zp = torch.randn(B_, C_) if zp is None else zp
    za = torch.randn(B_, C_) if za is None else za
    target = torch.randint(0, C_, (B_,)) if target is None else target
    return reference.mgit_loss(zp, za, target, **kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(za=torch.randn(B_, C_ + 1)), ValueError, "logits_auxiliary"),
        (dict(za=torch.randn(B_ + 1, C_)), ValueError, "logits_auxiliary"),
        (dict(za=torch.randn(B_, C_, dtype=torch.float64)), TypeError, "logits_auxiliary"),
        (dict(za=torch.randn(B_, C_).half()), TypeError, "logits_auxiliary"),
        (dict(za=torch.randn(B_ * C_)), ValueError, "logits_auxiliary"),
        (dict(za=torch.randn(B_, C_, device="meta")), ValueError, "logits_auxiliary"),
        (dict(zp=torch.randn(B_ * C_), za=torch.randn(B_ * C_)), ValueError, "logits_primary"),
        (dict(zp=torch.randn(B_, C_, 1), za=torch.randn(B_, C_, 1)), ValueError, "logits_primary"),
        (dict(zp=torch.randn(B_, 1), za=torch.randn(B_, 1), target=torch.zeros(B_, dtype=torch.long)),
         ValueError, "logits_primary"),
        (dict(zp=torch.randint(0, 3, (B_, C_)), za=torch.randint(0, 3, (B_, C_))), TypeError,
         "logits_primary"),
        (dict(zp=np.zeros((B_, C_))), TypeError, "logits_primary"),
        (dict(target=torch.zeros(B_, dtype=torch.float32)), TypeError, "target"),
        (dict(target=torch.zeros(B_, dtype=torch.int16)), TypeError, "target"),
        (dict(target=torch.zeros(B_, C_, dtype=torch.long)), ValueError, "target"),
        (dict(target=torch.zeros(B_, 1, dtype=torch.long)), ValueError, "target"),
        (dict(target=torch.zeros(B_ + 1, dtype=torch.long)), ValueError, "target"),
        (dict(target=[0] * B_), TypeError, "target"),
        (dict(target=torch.full((B_,), C_, dtype=torch.long)), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, 2, 3, 4, 99])), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, -1, 3, 4, 0])), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, -100, 3, 4, 0]), ignore_index=-1), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, -5, 3, 4, 0], dtype=torch.int32)), ValueError, "target"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=None), TypeError, "temperature"),
        (dict(js_weight=float("nan")), ValueError, "js_weight"),
        (dict(js_weight="0.1"), TypeError, "js_weight"),
    ],
)
def test_bad_inputs_raise(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        call(**kwargs)


@pytest.mark.parametrize("ignore_index", [-1, -100, 7])
def test_ignore_index_label_is_accepted(ignore_index):
    """A label equal to ignore_index (negative, or >= C) is not 'out of range'."""
    zp, za = make_logits(B_, C_)
    target = torch.tensor([0, 1, ignore_index, 3, 4, ignore_index])
    out = reference.mgit_loss(zp, za, target, ignore_index=ignore_index)
    assert_rel_close(out.ce_primary, torch_ce(zp, target, 0.0, ignore_index), F64_TOL)
