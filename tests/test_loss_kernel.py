"""The Triton MGiT loss kernel against the float64 reference and scipy (CPU: the interpreter)."""
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from scipy.spatial.distance import jensenshannon

from mgit_fast import FusedMGiT, MGiTLoss, ViT, functional, reference
from mgit_fast.kernels import mgit_loss as kernel

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
NAMES = ("loss", "ce_primary", "ce_auxiliary", "js")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    def nan_buffer(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(kernel, "new_buffer", nan_buffer)


def compare(z, w, y, dtype=torch.float32, tol=None, **options):
    """Kernel on `dtype` logits vs the float64 reference on the same values, for all four
    outputs and both gradients of a random weighting of the four."""
    tol = tol or TOL[dtype]
    options = {"label_smoothing": 0.1, "temperature": 1.0, "js_weight": 0.3, **options}
    low = [t.to(dtype).requires_grad_() for t in (z, w)]
    high = [t.detach().double().requires_grad_() for t in low]
    out = functional.mgit_loss(*low, y, **options, backend="triton")
    ref = reference.mgit_loss(*high, y, **options)
    weights = torch.randn(4, dtype=torch.float64)
    grads = torch.autograd.grad(sum(c * o for c, o in zip(weights.float(), out)), low)
    ref_grads = torch.autograd.grad(sum(c * o for c, o in zip(weights, ref)), high)
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == torch.float32 and o.dim() == 0, name
        assert_rel_close(o, r, tol, name)
    for name, g, r, t in zip(("d_primary", "d_auxiliary"), grads, ref_grads, low):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_rel_close(g, r, tol, name)
    return out, grads


def batch(B, C, spread=3.0, ignored=0.25):
    z, w = torch.randn(B, C) * spread, torch.randn(B, C) * spread
    y = torch.randint(0, C, (B,))
    y[torch.rand(B) < ignored] = -100
    return z, w, y


@pytest.mark.parametrize("C", [2, 10, 1000, 5000])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_against_float64_reference(C, temperature, smoothing):
    compare(*batch(9, C), label_smoothing=smoothing, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_js_against_scipy(temperature):
    z, w, y = batch(12, 37, ignored=0.0)
    out = functional.mgit_loss(z, w, y, temperature=temperature, backend="triton")
    p = torch.softmax(z.double() / temperature, -1).numpy()
    q = torch.softmax(w.double() / temperature, -1).numpy()
    expected = float(np.mean(jensenshannon(p, q, axis=1) ** 2))
    assert abs(float(out.js) - expected) <= 1e-6 * max(expected, 1e-3)


@pytest.mark.parametrize("rows, block_c", [(1, 16), (4, 16), (8, 64), (2, 4096)])
def test_every_tiling(monkeypatch, rows, block_c):
    """Several rows per program with padded rows, and rows chunked over C (two passes)."""
    monkeypatch.setattr(kernel, "tile", lambda B, C: (rows, block_c, 4))
    compare(*batch(11, 37), temperature=1.7)
    compare(*batch(6, 100), temperature=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    compare(*batch(16, 300), dtype, temperature=2.0)


@pytest.mark.parametrize("magnitude", [1e4, 3e4])
def test_extreme_logits(magnitude):
    """Finite and accurate; an fp32 logit near 1e4 is only known to ~1e-3, which bounds any
    fp32 computation of log-probabilities from it, hence 1e-3 rather than 1e-5."""
    z, w, y = batch(8, 50, spread=magnitude)
    compare(z, w, y, tol=1e-3, temperature=1.0)
    compare(z, w, y, tol=1e-3, temperature=4.0, label_smoothing=0.0)


def test_every_row_ignored_gives_zeros():
    z, w, _ = batch(6, 10)
    y = torch.full((6,), -100)
    zz, ww = z.requires_grad_(), w.requires_grad_()
    out = functional.mgit_loss(zz, ww, y, backend="triton")
    assert all(float(o.detach()) == 0.0 for o in out)
    grads = torch.autograd.grad(sum(out), [zz, ww])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_ignored_rows_get_zero_gradient_and_custom_ignore_index():
    z, w, y = batch(10, 20, ignored=0.0)
    y[[2, 5]] = 7
    zz = z.requires_grad_()
    out = functional.mgit_loss(zz, w, y, ignore_index=7, backend="triton")
    (g,) = torch.autograd.grad(out.loss, [zz])
    assert torch.equal(g[[2, 5]], torch.zeros(2, 20)) and g[0].abs().sum() > 0
    compare(z.detach(), w, y, ignore_index=7)


def test_non_contiguous_logits_and_int32_targets():
    wide = torch.randn(8, 64)
    z, w = wide[:, :30], wide[:, 32:62]
    y = torch.randint(0, 30, (8,), dtype=torch.int32)
    assert not z.is_contiguous()
    compare(z, w, y)


def test_invalid_label_makes_nan_and_raises_in_the_module():
    z, w, y = batch(6, 10, ignored=0.0)
    y[3] = 10
    out = functional.mgit_loss(z, w, y, backend="triton")
    assert all(torch.isnan(o) for o in out)
    with pytest.raises(ValueError, match="target"):
        MGiTLoss(backend="triton")(z, w, y)


def test_fused_mgit_stops_at_a_bad_label_before_changing_anything():
    torch.manual_seed(0)
    primary = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=1, num_heads=2)
    mgit = FusedMGiT(primary, aux_seed=1, backend="triton")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    mgit.training_step(x, y)
    before = [p.detach().clone() for p in mgit.parameters()]
    y[0] = 9
    with pytest.raises(ValueError, match="target"):
        mgit.training_step(x, y)
    assert all(torch.equal(a, p) for a, p in zip(before, mgit.parameters()))
    assert int(mgit.optimizer.step_count) == 1


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: (torch.randn(4, 10), torch.randn(4, 11), torch.zeros(4, dtype=torch.long)), ValueError, "logits_auxiliary"),
        (lambda: (torch.randn(4, 10), torch.randn(4, 10).half(), torch.zeros(4, dtype=torch.long)), TypeError, "logits_auxiliary"),
        (lambda: (torch.randn(4, 10), torch.randn(4, 10), torch.zeros(4)), TypeError, "target"),
        (lambda: (torch.randn(4, 10), torch.randn(4, 10), torch.zeros(5, dtype=torch.long)), ValueError, "target"),
        (lambda: (torch.randn(4, 10).double(), torch.randn(4, 10).double(), torch.zeros(4, dtype=torch.long)), TypeError, "logits_primary"),
    ],
)
def test_bad_inputs(make, error, name):
    with pytest.raises(error, match=name):
        functional.mgit_loss(*make(), backend="triton")


# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B", [256, 4096])
@pytest.mark.parametrize("C", [10, 1000, 21843])
def test_cuda_shapes(dtype, B, C):
    z, w, y = (t.cuda() for t in batch(B, C))
    compare(z, w, y, dtype, temperature=2.0)
