"""``mgit_fast.functional``: backend dispatch over the reference (CPU) path."""
from __future__ import annotations

import pytest
import torch

from mgit_fast import functional, reference

BACKENDS_ON_CPU = [None, "torch"]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Each test starts without MGIT_FAST_BACKEND; tests that need it set it themselves."""
    monkeypatch.delenv("MGIT_FAST_BACKEND", raising=False)


# ------------------------------------------------------------------------------------------
# calls and their reference twins
# ------------------------------------------------------------------------------------------
def attention_args():
    B, H, N, D = 2, 3, 17, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    options = dict(scale=torch.rand(H) + 0.5, bias=torch.randn(H, N, N), diagonal_mask=True)
    return (q, k, v), options


def qkvpacked_args():
    B, N, H, D = 2, 17, 3, 16
    return (torch.randn(B, N, 3 * H * D), H), dict(scale=0.3, bias=torch.randn(B, H, N, N))


def loss_args():
    B, C = 16, 10
    target = torch.randint(0, C, (B,))
    target[:3] = -1
    options = dict(label_smoothing=0.1, temperature=2.0, js_weight=0.3, ignore_index=-1)
    return (torch.randn(B, C) * 3, torch.randn(B, C) * 3, target), options


OPS = {
    "attention": (functional.attention, reference.attention, attention_args),
    "attention_qkvpacked": (functional.attention_qkvpacked, reference.attention_qkvpacked, qkvpacked_args),
    "mgit_loss": (functional.mgit_loss, reference.mgit_loss, loss_args),
}



def flat(out):
    """One tensor of an op's result (the loss's four outputs stacked)."""
    return torch.stack(tuple(out)) if isinstance(out, tuple) else out


def assert_same(out, ref):
    if isinstance(ref, tuple):
        assert type(out) is type(ref) and len(out) == len(ref)
        for a, b in zip(out, ref):
            assert_same(a, b)
        return
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(ref).all()
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------
# dispatch to torch on CPU
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_torch_backend_equals_reference(op, backend):
    fn, ref_fn, make = OPS[op]
    args, options = make()
    assert_same(fn(*args, **options, backend=backend), ref_fn(*args, **options))


def test_gradients_flow_through_dispatch():
    (q, k, v), options = attention_args()
    leaves = [t.requires_grad_(True) for t in (q, k, v, options["scale"], options["bias"])]
    out = functional.attention(q, k, v, **options, backend="torch")
    grads = torch.autograd.grad(out.square().sum(), leaves)
    twins = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref = reference.attention(*twins[:3], scale=twins[3], bias=twins[4], diagonal_mask=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), twins)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(r).all() and torch.equal(g, r)


@pytest.mark.parametrize("op", list(OPS))
def test_triton_backend_runs_the_kernel(op):
    fn, ref_fn, make = OPS[op]
    args, options = make()
    out, ref = flat(fn(*args, **options, backend="triton")), flat(ref_fn(*args, **options))
    assert torch.isfinite(out).all() and not torch.equal(out, ref)  # a different code path...
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # ...with the same result


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bad", ["cuda", "Torch", "", "eager"])
def test_bad_backend_raises(op, bad):
    fn, _, make = OPS[op]
    args, options = make()
    with pytest.raises(ValueError, match=r"^backend\b"):
        fn(*args, **options, backend=bad)


# ------------------------------------------------------------------------------------------
# MGIT_FAST_BACKEND
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_env_torch_is_honoured(op, monkeypatch):
    monkeypatch.setenv("MGIT_FAST_BACKEND", "torch")
    fn, ref_fn, make = OPS[op]
    args, options = make()
    assert_same(fn(*args, **options), ref_fn(*args, **options))


@pytest.mark.parametrize("op", list(OPS))
def test_env_triton_overrides_device_choice(op, monkeypatch):
    """MGIT_FAST_BACKEND=triton sends CPU tensors to the Triton path (the interpreter here)."""
    monkeypatch.setenv("MGIT_FAST_BACKEND", "triton")
    fn, ref_fn, make = OPS[op]
    args, options = make()
    assert not torch.equal(flat(fn(*args, **options)), flat(ref_fn(*args, **options)))
    # an explicit backend= argument still wins over the environment
    assert_same(fn(*args, **options, backend="torch"), ref_fn(*args, **options))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bad", ["cuda", "TRITON", "numpy"])
def test_env_bad_value_raises(op, bad, monkeypatch):
    monkeypatch.setenv("MGIT_FAST_BACKEND", bad)
    fn, ref_fn, make = OPS[op]
    args, options = make()
    with pytest.raises(ValueError, match="MGIT_FAST_BACKEND"):
        fn(*args, **options)
    # an explicit backend= argument wins over a bad environment value
    assert_same(fn(*args, **options, backend="torch"), ref_fn(*args, **options))


def test_resolve_backend(monkeypatch):
    assert functional.resolve_backend(None, "cuda") == "triton"
    assert functional.resolve_backend(None, "cpu") == "torch"
    assert functional.resolve_backend("torch", "cuda") == "torch"
    assert functional.resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("MGIT_FAST_BACKEND", "torch")
    assert functional.resolve_backend(None, "cuda") == "torch"
    assert functional.resolve_backend("triton", "cuda") == "triton"
    monkeypatch.setenv("MGIT_FAST_BACKEND", "triton")
    assert functional.resolve_backend(None, "cpu") == "triton"
    assert functional.resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setenv("MGIT_FAST_BACKEND", "")  # empty counts as unset
    assert functional.resolve_backend(None, "cpu") == "torch"
    assert functional.resolve_backend(None, "cuda") == "triton"
    with pytest.raises(ValueError, match=r"^backend\b"):
        functional.resolve_backend("bogus", "cpu")
    monkeypatch.setenv("MGIT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"^MGIT_FAST_BACKEND\b"):
        functional.resolve_backend(None, "cpu")


def test_argument_errors_pass_through_dispatch():
    """Bad inputs are caught by the shared checks on the dispatched path too."""
    (q, k, v), _ = attention_args()
    with pytest.raises(ValueError, match=r"^k\b"):
        functional.attention(q, k[:, :, 1:], v, backend="torch")
    (zp, za, target), _ = loss_args()
    with pytest.raises(ValueError, match=r"^target\b"):
        functional.mgit_loss(zp, za, target, backend="torch")  # -1 is not the default ignore_index


# ------------------------------------------------------------------------------------------
# multi-gradient AdamW
# ------------------------------------------------------------------------------------------
def adamw_state():
    shapes_p = [(4, 3), (3,), (2, 3)]
    shapes_a = [(4, 3), (5,)]
    params_p = [torch.randn(s) for s in shapes_p]
    params_a = [torch.randn(s) for s in shapes_a]
    state = dict(
        params_primary=params_p,
        grads_primary=[torch.randn(s) for s in shapes_p],
        exp_avgs_primary=[torch.zeros(s) for s in shapes_p],
        exp_avg_sqs_primary=[torch.zeros(s) for s in shapes_p],
        params_auxiliary=params_a,
        grads_auxiliary=[torch.randn(s) for s in shapes_a],
        exp_avgs_auxiliary=[torch.zeros(s) for s in shapes_a],
        exp_avg_sqs_auxiliary=[torch.zeros(s) for s in shapes_a],
    )
    options = dict(
        pairs=[(0, 0)],
        decay_primary=[True, False, True],
        decay_auxiliary=[True, False],
        step=torch.zeros((), dtype=torch.int64),
        skipped_steps=torch.zeros((), dtype=torch.int64),
        lr=1e-2,
        mix="adaptive",
        ce_primary=torch.tensor(2.0),
        ce_auxiliary=torch.tensor(1.0),
        max_grad_norm=1.0,
        average=0.1,
    )
    return state, options


def clone_state(state, options):
    state = {k: [t.clone() for t in v] for k, v in state.items()}
    options = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    return state, options


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_multi_gradient_adamw_dispatch(backend):
    state, options = adamw_state()
    before = {k: [t.clone() for t in v] for k, v in state.items()}
    twin_state, twin_options = clone_state(state, options)

    out = functional.multi_gradient_adamw(*state.values(), **options, backend=backend)
    ref = reference.multi_gradient_adamw(*twin_state.values(), **twin_options)

    assert isinstance(out, functional.MultiGradientStepOutput)
    assert not bool(out.skipped)
    assert options["step"].item() == 1 and options["skipped_steps"].item() == 0
    for name in ("params_primary", "params_auxiliary", "exp_avgs_primary", "exp_avg_sqs_auxiliary"):
        for new, old in zip(state[name], before[name]):
            assert torch.isfinite(new).all()
            assert not torch.equal(new, old), f"{name} unchanged"
    # the grads are inputs, not outputs
    for new, old in zip(state["grads_primary"], before["grads_primary"]):
        assert torch.equal(new, old)
    # identical to the reference, state and returned tensors alike
    for name in state:
        for a, b in zip(state[name], twin_state[name]):
            assert torch.equal(a, b), name
    assert_same(tuple(out), tuple(ref))


def test_multi_gradient_adamw_bad_backend_touches_nothing():
    state, options = adamw_state()
    before = {k: [t.clone() for t in v] for k, v in state.items()}
    with pytest.raises(ValueError, match=r"^backend\b"):
        functional.multi_gradient_adamw(*state.values(), **options, backend="cuda")
    for name in state:
        for a, b in zip(state[name], before[name]):
            assert torch.equal(a, b), name
    assert options["step"].item() == 0


def test_multi_gradient_adamw_triton_equals_torch():
    state, options = adamw_state()
    twin_state, twin_options = clone_state(state, options)
    out = functional.multi_gradient_adamw(*state.values(), **options, backend="triton")
    ref = functional.multi_gradient_adamw(*twin_state.values(), **twin_options, backend="torch")
    for name in state:
        for a, b in zip(state[name], twin_state[name]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert options["step"].item() == twin_options["step"].item() == 1
