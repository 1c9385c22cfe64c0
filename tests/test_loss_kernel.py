"""The Triton MGiT loss kernel against the float64 reference and scipy (CPU: the interpreter)."""
import contextlib

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from scipy.spatial.distance import jensenshannon
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from mgit_fast import FusedMGiT, MGiTLoss, ViT, functional, reference
from mgit_fast.kernels import mgit_loss as kernel

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
NAMES = ("loss", "ce_primary", "ce_auxiliary", "js")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a kernel writes starts NaN; the shapes allocated are listed."""
    shapes = []

    def nan_buffer(shape, *, device, dtype):
        shapes.append(tuple(shape))
        with _disable_current_modes():  # stands for torch.empty: an allocation, unseen by AtenOps
            return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(kernel, "new_buffer", nan_buffer)
    return shapes


@pytest.fixture
def launches(monkeypatch):
    """The (kernel, grid) of every loss launch. A launch runs with dispatch modes off: the
    interpreter's host copies of its arguments are not torch ops a GPU launch would make."""
    log = []

    class Recorded:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            log.append((self.fn.__name__, tuple(grid)))
            launch = self.fn[grid]

            def run(*args, **kwargs):
                with _disable_current_modes():
                    return launch(*args, **kwargs)

            return run

    for name in ("_mgit_loss_fwd_kernel", "_mgit_loss_finish_kernel", "_mgit_loss_bwd_kernel"):
        monkeypatch.setattr(kernel, name, Recorded(getattr(kernel, name)))
    return log


@pytest.fixture(params=["one program", "several programs"])
def programs(request, monkeypatch):
    """Both schedules: every row in one program (one launch), or a program per tile plus the
    finishing reduction."""
    monkeypatch.setattr(kernel, "SINGLE_PROGRAM_ELEMENTS", 10**9 if request.param == "one program" else 0)
    return request.param


def compare(z, w, y, dtype=torch.float32, tol=None, weights=None, **options):
    """Kernel on `dtype` logits vs the float64 reference on the same values, for all four
    outputs and both gradients of a weighting of the four (random unless given: the backward
    recomputes the rows; `weights` proportional to (1, 0, 0, 0) or (1, 1, 1, λ): it only scales
    the gradients the forward wrote)."""
    tol = tol or TOL[dtype]
    options = {"label_smoothing": 0.1, "temperature": 1.0, "js_weight": 0.3, **options}
    low = [t.to(dtype).requires_grad_() for t in (z, w)]
    high = [t.detach().double().requires_grad_() for t in low]
    out = functional.mgit_loss(*low, y, **options, backend="triton")
    ref = reference.mgit_loss(*high, y, **{k: float(v) for k, v in options.items()})
    weights = torch.randn(4, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
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
@pytest.mark.parametrize("single", [True, False])
def test_every_tiling(monkeypatch, rows, block_c, single):
    """Several rows per tile with padded rows, rows chunked over C (a pass each for the
    log-sum-exps, the JS sums and the gradients), one program or one per tile."""
    monkeypatch.setattr(kernel, "tile", lambda B, C: (rows, block_c, 4, 1 if single else -(-B // rows)))
    compare(*batch(11, 37), temperature=1.7)
    compare(*batch(6, 100), temperature=1.0, weights=(2.5, 0.0, 0.0, 0.0))


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


@pytest.mark.parametrize("C", [10, 3000])
@pytest.mark.parametrize("weights", [(3.7, 0.0, 0.0, 0.0), (0.5, 2.0, -1.0, 3.0)])
def test_every_row_ignored_gives_zeros(programs, C, weights):
    z, w, _ = batch(6, C)
    y = torch.full((6,), -100)
    zz, ww = z.requires_grad_(), w.requires_grad_()
    out = functional.mgit_loss(zz, ww, y, temperature=2.0, backend="triton")
    assert all(float(o.detach()) == 0.0 for o in out)
    grads = torch.autograd.grad(sum(c * o for c, o in zip(weights, out)), [zz, ww])
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
# one pass: the forward writes the gradients, the backward scales them
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C, temperature", [(10, 1.0), (37, 2.0), (3000, 0.5)])
def test_both_schedules_against_float64_reference(programs, C, temperature):
    z, w, y = batch(7, C)
    compare(z, w, y, temperature=temperature)  # a random weighting: the rows are recomputed
    compare(z, w, y, temperature=temperature, weights=(3.7, 0.0, 0.0, 0.0))  # loss · 3.7
    compare(z, w, y, temperature=temperature, js_weight=0.3, weights=(-1.5, 2.0, 2.0, 0.6))  # + 2·(ce + ce + λ·js)


def _grads_with_logits_poisoned_after_forward(weights, C=12):
    z, w, y = batch(9, C)
    options = dict(label_smoothing=0.1, temperature=2.0, js_weight=0.3)
    zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
    out = functional.mgit_loss(zz, ww, y, **options, backend="triton")
    zz.data.fill_(float("nan"))  # what the backward reads of the logits is now NaN
    ww.data.fill_(float("nan"))
    grads = torch.autograd.grad(sum(c * o for c, o in zip(weights, out)), [zz, ww])
    high = [t.double().requires_grad_() for t in (z, w)]
    ref = reference.mgit_loss(*high, y, **options)
    ref_grads = torch.autograd.grad(sum(c * o for c, o in zip(weights, ref)), high)
    return grads, ref_grads


@pytest.mark.parametrize("weights", [(3.7, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 0.3), (-2.0, 0.5, 0.5, 0.15)])
def test_backward_only_scales_the_forwards_gradients(programs, launches, weights):
    """Upstream gradients proportional to `loss` (or to ce + ce + λ·js, λ = 0.3), rows of one
    chunk: the backward reads no logit, so poisoning them after the forward changes nothing;
    same grid as the forward, one launch."""
    grads, ref_grads = _grads_with_logits_poisoned_after_forward(weights, 12)
    for name, g, r in zip(("d_primary", "d_auxiliary"), grads, ref_grads):
        assert_rel_close(g, r, 1e-5, name)
    forward, backward = launches[:-1], launches[-1]
    assert backward == ("_mgit_loss_bwd_kernel", forward[0][1])
    expected = ["_mgit_loss_fwd_kernel"] + (["_mgit_loss_finish_kernel"] if programs == "several programs" else [])
    assert [name for name, _ in forward] == expected
    assert (forward[0][1] == (1,)) == (programs == "one program")


@pytest.mark.parametrize("C", [2048, 3000])
def test_gradients_are_stored_only_for_rows_of_one_chunk(poison, C):
    """C ≤ 2,048: the forward writes both [B, C] gradients; a longer row writes none and its
    backward recomputes from the logits (so poisoning them after the forward shows)."""
    z, w, y = batch(3, C)
    functional.mgit_loss(z.requires_grad_(), w.requires_grad_(), y, backend="triton")
    assert poison.count((3, C)) == (2 if C <= 2048 else 0)
    if C > 2048:
        grads, _ = _grads_with_logits_poisoned_after_forward((3.7, 0.0, 0.0, 0.0), C)
        assert all(torch.isnan(g).any() for g in grads)


def test_other_weightings_recompute_from_the_logits():
    """The converse of the test above: a weighting not proportional to `loss` reads the
    logits again (here poisoned), so the check above can tell the two paths apart."""
    grads, _ = _grads_with_logits_poisoned_after_forward((0.5, 2.0, -1.0, 3.0))
    assert all(torch.isnan(g).any() for g in grads)


def test_small_batch_is_one_launch_each_way(launches):
    """B·C = 2,560 (C = 10, B = 256): one forward launch that writes the outputs, one backward."""
    z, w, y = batch(256, 10)
    zz, ww = z.requires_grad_(), w.requires_grad_()
    out = functional.mgit_loss(zz, ww, y, temperature=2.0, backend="triton")
    assert launches == [("_mgit_loss_fwd_kernel", (1,))]
    grads = torch.autograd.grad(out.loss * 3.7, [zz, ww])
    assert launches[1:] == [("_mgit_loss_bwd_kernel", (1,))]
    high = [t.detach().double().requires_grad_() for t in (zz, ww)]
    ref = reference.mgit_loss(*high, y, temperature=2.0)
    for o, r, name in zip(out, ref, NAMES):
        assert_rel_close(o, r, 1e-5, name)
    for g, r in zip(grads, torch.autograd.grad(ref.loss * 3.7, high)):
        assert_rel_close(g, r, 1e-5, "gradient")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no logit requires grad", "grad"])
def test_gradients_are_written_only_when_needed(poison, programs, mode):
    z, w, y = batch(9, 12)
    if mode in ("grad", "no_grad", "inference_mode"):
        z, w = z.requires_grad_(), w.requires_grad_()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    with context():
        out = functional.mgit_loss(z, w, y, temperature=2.0, backend="triton")
    assert poison.count((9, 12)) == (2 if mode == "grad" else 0)
    ref = reference.mgit_loss(z.detach().double(), w.detach().double(), y, temperature=2.0)
    for o, r, name in zip(out, ref, NAMES):
        assert_rel_close(o, r, 1e-5, name)


# ------------------------------------------------------------------------------------------
# temperature and js_weight as device tensors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [2.0, 1.0])
@pytest.mark.parametrize("weights", [(3.7, 0.0, 0.0, 0.0), (0.5, 2.0, -1.0, 3.0)])
def test_tensor_options_equal_floats(programs, temperature, weights):
    """Same results from floats and from 0-dim float32 tensors (bit for bit where the float
    takes the tempered path too, T ≠ 1)."""
    z, w, y = batch(9, 12)
    results = []
    for T, lam in ((temperature, 0.3), (torch.tensor(temperature), torch.tensor(0.3))):
        zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
        out = functional.mgit_loss(zz, ww, y, label_smoothing=0.1, temperature=T, js_weight=lam, backend="triton")
        grads = torch.autograd.grad(sum(c * o for c, o in zip(weights, out)), [zz, ww])
        results.append(torch.cat([torch.stack(tuple(out)).flatten()] + [g.flatten() for g in grads]))
    if temperature != 1.0:
        assert torch.equal(results[0], results[1])
    else:
        assert_rel_close(results[1], results[0], 1e-6, "tensor vs float")


def test_in_place_changes_reach_the_next_call(programs):
    """A module holding tensors: fill_ changes what the next call computes, nothing is rebuilt;
    a backward uses the values its forward ran with."""
    T, lam = torch.tensor(2.0), torch.tensor(0.3)
    criterion = MGiTLoss(label_smoothing=0.1, temperature=T, js_weight=lam, backend="triton")
    z, w, y = batch(9, 12)
    leaves = [z.requires_grad_(), w.requires_grad_()]
    first = criterion(*leaves, y)
    T.fill_(0.5)
    lam.fill_(1.5)
    first_grads = torch.autograd.grad(first.loss * 3.7, leaves)
    second = criterion(*leaves, y)
    second_grads = torch.autograd.grad(sum(c * o for c, o in zip((0.5, 2.0, -1.0, 3.0), second)), leaves)
    assert criterion.temperature is T and criterion.js_weight is lam
    high = [t.detach().double().requires_grad_() for t in leaves]
    for out, grads, options, weights in (
        (first, first_grads, dict(temperature=2.0, js_weight=0.3), (3.7, 0.0, 0.0, 0.0)),
        (second, second_grads, dict(temperature=0.5, js_weight=1.5), (0.5, 2.0, -1.0, 3.0)),
    ):
        ref = reference.mgit_loss(*high, y, label_smoothing=0.1, **options)
        for o, r, name in zip(out, ref, NAMES):
            assert_rel_close(o, r, 1e-5, name)
        ref_grads = torch.autograd.grad(sum(c * o for c, o in zip(weights, ref)), high)
        for g, r in zip(grads, ref_grads):
            assert_rel_close(g, r, 1e-5, "gradient")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensor_options_on_the_torch_backend_too(backend):
    z, w, y = batch(6, 10)
    out = functional.mgit_loss(z, w, y, temperature=torch.tensor(2.0), js_weight=torch.tensor(0.7), backend=backend)
    ref = reference.mgit_loss(z.double(), w.double(), y, temperature=2.0, js_weight=0.7)
    for o, r, name in zip(out, ref, NAMES):
        assert_rel_close(o, r, 1e-5, name)


@pytest.mark.parametrize("name", ["temperature", "js_weight"])
@pytest.mark.parametrize(
    "value, error",
    [
        (torch.tensor(2.0, dtype=torch.float64), TypeError),
        (torch.tensor([2.0]), ValueError),
        (torch.tensor(2.0, requires_grad=True), ValueError),
        (torch.tensor(2.0, device="meta"), ValueError),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_tensor_options(name, value, error, backend):
    z, w, y = batch(4, 5)
    with pytest.raises(error, match=name):
        functional.mgit_loss(z, w, y, **{name: value}, backend=backend)
    if value.device.type != "meta":  # the module learns the logits' device at its first call
        with pytest.raises(error, match=name):
            MGiTLoss(**{name: value})


# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B", [256, 4096])
@pytest.mark.parametrize("C", [10, 1000, 21843])
def test_cuda_shapes(dtype, B, C):
    z, w, y = (t.cuda() for t in batch(B, C))
    compare(z, w, y, dtype, temperature=2.0)


# ------------------------------------------------------------------------------------------
# objectives that use some of the four outputs: the others' gradients arrive as None
# ------------------------------------------------------------------------------------------
class AtenOps(TorchDispatchMode):
    """The aten ops that would launch on a GPU (not views, not allocations) outside our kernel
    launches (the eager path launches directly: the `launches` fixture hides the interpreter's
    copies) and outside our custom ops (the compiled path: the mode is off within an op)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func.namespace == "aten" and not func.is_view and name not in ("empty", "empty_strided", "detach"):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _objective(out, weights):
    """Σ weight · output over the outputs named in `weights` (the others stay out of the graph)."""
    return sum(c * getattr(out, name) for name, c in weights.items())


def _some_outputs(weights, C, poison_logits=False, **options):
    """The kernel's gradients of `_objective` (logits poisoned after the forward on request) and
    the float64 reference's (zeros where an output does not depend on a logit)."""
    options = {"label_smoothing": 0.1, "temperature": 2.0, "js_weight": 0.3, **options}
    z, w, y = batch(7, C)
    zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
    out = functional.mgit_loss(zz, ww, y, **options, backend="triton")
    if poison_logits:
        zz.data.fill_(float("nan"))
        ww.data.fill_(float("nan"))
    grads = torch.autograd.grad(_objective(out, weights), [zz, ww])
    high = [t.double().requires_grad_() for t in (z, w)]
    ref = reference.mgit_loss(*high, y, **options)
    ref_grads = torch.autograd.grad(_objective(ref, weights), high, materialize_grads=True)
    return grads, ref_grads


# (weights, whether the forward's stored gradients only need scaling: g_js = λ·g_cp = λ·g_ca, λ = 0.3)
SOME_OUTPUTS = [
    ({"loss": 2.5}, True),
    ({"ce_primary": 1.0}, False),
    ({"ce_auxiliary": -0.7}, False),
    ({"js": 3.0}, False),
    ({"loss": 1.0, "js": 2.0}, False),
    ({"ce_primary": 2.0, "ce_auxiliary": 2.0, "js": 0.6}, True),  # 2·(ce + ce + λ·js) without `loss`
    ({"loss": 1.0, "ce_primary": 1.0}, False),
    ({"ce_primary": 0.5, "js": -1.0}, False),
    ({"ce_primary": 1.0, "ce_auxiliary": 1.0}, False),
]


@pytest.mark.parametrize("weights, scaled", SOME_OUTPUTS, ids=lambda v: "+".join(v) if isinstance(v, dict) else str(v))
@pytest.mark.parametrize("C", [12, 3000])
def test_gradients_when_some_outputs_are_used(programs, weights, scaled, C):
    """One output, or a combination, in the objective: the float64 reference's gradients,
    from the stored gradients (C = 12) or the saved row statistics (C = 3,000)."""
    grads, ref_grads = _some_outputs(weights, C)
    for name, g, r in zip(("d_primary", "d_auxiliary"), grads, ref_grads):
        if r.abs().max() == 0:  # an output that does not depend on this logit
            assert torch.equal(g, torch.zeros_like(g)), name
        else:
            assert_rel_close(g, r, 1e-5, name)


@pytest.mark.parametrize("weights, scaled", SOME_OUTPUTS, ids=lambda v: "+".join(v) if isinstance(v, dict) else str(v))
def test_absent_gradients_count_as_zero_in_the_devices_choice(weights, scaled):
    """With rows of one chunk, the backward decides on the device whether the stored gradients
    only need scaling, an absent upstream gradient counting as 0: then it reads no logit
    (poisoning them after the forward changes nothing); otherwise it recomputes from them."""
    grads, ref_grads = _some_outputs(weights, 12, poison_logits=True)
    if scaled:
        for name, g, r in zip(("d_primary", "d_auxiliary"), grads, ref_grads):
            assert_rel_close(g, r, 1e-5, name)
    else:
        assert all(torch.isnan(g).any() for g in grads)


@pytest.mark.parametrize(
    "objective, ops",
    [
        (lambda out: out.loss, ["ones_like"]),
        (lambda out: out.js, ["ones_like"]),
        (lambda out: out.loss + 2 * out.js, ["mul", "add", "ones_like", "mul"]),  # the objective's own ops
    ],
)
def test_no_torch_ops_around_the_kernels(launches, objective, ops):
    """B = 256, C = 10: `out.loss.backward()` is the forward launch, the backward launch and
    autograd's seed (ones_like); no zeros for the unused outputs, no stack."""
    z, w, y = batch(256, 10)
    zz, ww = z.requires_grad_(), w.requires_grad_()
    with AtenOps() as seen:
        out = functional.mgit_loss(zz, ww, y, temperature=2.0, backend="triton")
        objective(out).backward()
    assert [name for name, _ in launches] == ["_mgit_loss_fwd_kernel", "_mgit_loss_bwd_kernel"]
    assert seen.names == ops


class _OpNames(TorchDispatchMode):
    """Every op dispatched, by schema name (ours: mgit_fast::...)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs_grad", [True, False])
def test_eager_calls_launch_without_the_custom_ops(launches, needs_grad):
    """Eagerly the kernels launch straight from an autograd.Function (a custom op's dispatch
    cost most of a call's host time); the custom ops serve torch.compile (test_compile.py)."""
    z, w, y = batch(6, 10)
    zz, ww = z.requires_grad_(needs_grad), w.requires_grad_(needs_grad)
    with _OpNames() as seen:
        out = functional.mgit_loss(zz, ww, y, temperature=2.0, backend="triton")
        if needs_grad:
            out.loss.backward()
    assert [name for name in seen.names if name.startswith("mgit_fast::")] == []
    expected = ["_mgit_loss_fwd_kernel"] + (["_mgit_loss_bwd_kernel"] if needs_grad else [])
    assert [name for name, _ in launches] == expected
    assert all(t.grad_fn is None for t in out) != needs_grad


class _NoGradient(torch.autograd.Function):
    """The identity, whose backward passes no gradient (None) on."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_no_upstream_gradient_launches_nothing(programs, launches):
    """All four upstream gradients None: no backward launch, no tensor made; the logits get
    no gradient (zeros when materialised)."""
    z, w, y = batch(7, 12)
    zz, ww = z.requires_grad_(), w.requires_grad_()
    out = functional.mgit_loss(zz, ww, y, backend="triton")
    forward = list(launches)
    cut = _NoGradient.apply(out.loss)
    with AtenOps() as seen:
        grads = torch.autograd.grad(cut, [zz, ww], allow_unused=True)
    assert grads == (None, None)
    assert launches == forward
    assert seen.names == ["ones_like"]


def test_one_logit_requires_grad_and_its_gradient_is_not_requested(programs):
    """Only the auxiliary's logits require grad and the objective is ce_primary, which does not
    depend on them: their gradient is exactly 0; js alone still reaches them."""
    z, w, y = batch(7, 12)
    ww = w.requires_grad_()
    out = functional.mgit_loss(z, ww, y, temperature=2.0, js_weight=0.3, backend="triton")
    (g,) = torch.autograd.grad(out.ce_primary * 3.0, [ww], retain_graph=True)
    assert torch.equal(g, torch.zeros_like(g))
    (g,) = torch.autograd.grad(out.js, [ww])
    high = w.detach().double().requires_grad_()
    ref = reference.mgit_loss(z.double(), high, y, temperature=2.0, js_weight=0.3)
    assert_rel_close(g, torch.autograd.grad(ref.js, [high])[0], 1e-5, "d_auxiliary")
