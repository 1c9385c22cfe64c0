"""``mgit_fast.reference.attention`` / ``attention_qkvpacked`` against independent oracles.

The oracle is ``torch.nn.functional.scaled_dot_product_attention`` in float64 with an explicit
float mask (the bias, plus −inf on the diagonal for ``diagonal_mask=True``) and ``scale=``.
A per-head scale is applied by scaling q before SDPA (with ``scale=1``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close, rel_err
from mgit_fast import reference

F64_TOL = 1e-12
F32_TOL = 1e-5
HALF_TOL = 2e-2


# ------------------------------------------------------------------------------------------
# oracle and input builders
# ------------------------------------------------------------------------------------------
def sdpa_oracle(q, k, v, *, scale=None, bias=None, diagonal_mask=False):
    """Float64 SDPA with an explicit float mask; differentiable in every tensor argument."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    N = q.shape[-2]
    mask = torch.zeros(N, N, dtype=torch.float64)
    if bias is not None:
        mask = mask + bias.to(torch.float64)
    if diagonal_mask:
        eye = torch.eye(N, dtype=torch.bool)
        mask = torch.where(eye, torch.full_like(mask, float("-inf")), mask)
    if isinstance(scale, torch.Tensor):
        per_head = scale.to(torch.float64).reshape(-1)[None, :, None, None]
        return F.scaled_dot_product_attention(q * per_head, k, v, attn_mask=mask, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def make_qkv(B, H, N, D, dtype=torch.float64, requires_grad=False):
    return [torch.randn(B, H, N, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def make_scale(kind, H, dtype=torch.float64, requires_grad=False):
    if kind == "none":
        return None
    if kind == "float":
        return 0.37
    if kind == "int":
        return 1
    if kind == "tensor0":
        return (0.2 + torch.rand((), dtype=dtype)).requires_grad_(requires_grad)
    if kind == "tensorH":
        return (0.2 + torch.rand(H, dtype=dtype)).requires_grad_(requires_grad)
    raise AssertionError(kind)


BIAS_SHAPES = {
    "none": None,
    "HNN": lambda B, H, N: (H, N, N),
    "1NN": lambda B, H, N: (1, N, N),
    "BHNN": lambda B, H, N: (B, H, N, N),
    "1HNN": lambda B, H, N: (1, H, N, N),
    "B1NN": lambda B, H, N: (B, 1, N, N),
    "11NN": lambda B, H, N: (1, 1, N, N),
}


def make_bias(kind, B, H, N, dtype=torch.float64, requires_grad=False):
    if kind == "none":
        return None
    return torch.randn(BIAS_SHAPES[kind](B, H, N), dtype=dtype).requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------
# forward vs SDPA
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "N,diagonal_mask",
    [(1, False)] + [(n, m) for n in (2, 3, 17, 65) for m in (False, True)],
)
@pytest.mark.parametrize("D", [16, 32, 64])
def test_matches_sdpa_shapes(N, D, diagonal_mask):
    B, H = 2, 3
    q, k, v = make_qkv(B, H, N, D)
    out = reference.attention(q, k, v, diagonal_mask=diagonal_mask)
    ref = sdpa_oracle(q, k, v, diagonal_mask=diagonal_mask)
    assert out.shape == (B, H, N, D) and out.dtype == torch.float64
    assert_rel_close(out, ref, F64_TOL, f"N={N} D={D}")


@pytest.mark.parametrize("scale_kind", ["none", "float", "int", "tensor0", "tensorH"])
@pytest.mark.parametrize("bias_kind", list(BIAS_SHAPES))
@pytest.mark.parametrize("diagonal_mask", [False, True])
def test_matches_sdpa_options(scale_kind, bias_kind, diagonal_mask):
    B, H, N, D = 2, 3, 17, 16
    q, k, v = make_qkv(B, H, N, D)
    scale = make_scale(scale_kind, H)
    bias = make_bias(bias_kind, B, H, N)
    out = reference.attention(q, k, v, scale=scale, bias=bias, diagonal_mask=diagonal_mask)
    ref = sdpa_oracle(q, k, v, scale=scale, bias=bias, diagonal_mask=diagonal_mask)
    assert_rel_close(out, ref, F64_TOL, f"scale={scale_kind} bias={bias_kind}")


def test_per_head_scale_matches_sdpa_per_head():
    """A ``[H]`` scale tensor uses scale[h] for head h: compare head by head with SDPA's scale=."""
    B, H, N, D = 2, 4, 9, 16
    q, k, v = make_qkv(B, H, N, D)
    scale = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    bias = torch.randn(H, N, N, dtype=torch.float64)
    out = reference.attention(q, k, v, scale=scale, bias=bias)
    for h in range(H):
        ref_h = F.scaled_dot_product_attention(
            q[:, h], k[:, h], v[:, h], attn_mask=bias[h], scale=float(scale[h])
        )
        assert_rel_close(out[:, h], ref_h, F64_TOL, f"head {h}")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 2, 7, 32)
    assert_rel_close(
        reference.attention(q, k, v), reference.attention(q, k, v, scale=32**-0.5), F64_TOL
    )
    # ... and it matters: a different scale gives a different result
    assert rel_err(reference.attention(q, k, v, scale=1.0), reference.attention(q, k, v)) > 1e-3


def test_diagonal_mask_token_ignores_its_own_value():
    """With the diagonal masked, output row i does not depend on v[..., i, :]."""
    B, H, N, D = 1, 2, 6, 16
    q, k, v = make_qkv(B, H, N, D)
    out = reference.attention(q, k, v, diagonal_mask=True)
    v2 = v.clone()
    v2[:, :, 3] += 100.0
    out2 = reference.attention(q, k, v2, diagonal_mask=True)
    assert torch.equal(out[:, :, 3], out2[:, :, 3])
    assert not torch.allclose(out[:, :, 2], out2[:, :, 2])
    # N=2: each token attends only to the other one
    q, k, v = make_qkv(B, H, 2, D)
    out = reference.attention(q, k, v, diagonal_mask=True)
    assert_rel_close(out, v.flip(-2), F64_TOL)


# ------------------------------------------------------------------------------------------
# non-contiguous inputs
# ------------------------------------------------------------------------------------------
def test_non_contiguous_inputs():
    B, H, N, D = 2, 3, 17, 32
    # q: transposed view of a [B, N, H, D] tensor (unit stride on D)
    q = torch.randn(B, N, H, D, dtype=torch.float64).transpose(1, 2)
    # k: a slice along N and D of a bigger tensor
    k = torch.randn(B, H, N + 5, 2 * D, dtype=torch.float64)[:, :, 2 : N + 2, D:]
    # v: strided on D (stride 2) from a permuted tensor
    v = torch.randn(H, B, N, 2 * D, dtype=torch.float64).permute(1, 0, 2, 3)[..., ::2]
    # bias: transposed on its last two dims
    bias = torch.randn(H, N, N, dtype=torch.float64).transpose(-1, -2)
    for t in (q, k, v, bias):
        assert not t.is_contiguous()
    out = reference.attention(q, k, v, bias=bias, diagonal_mask=True)
    ref = sdpa_oracle(q, k, v, bias=bias, diagonal_mask=True)
    assert_rel_close(out, ref, F64_TOL)
    contiguous = reference.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), bias=bias.contiguous(), diagonal_mask=True
    )
    assert_rel_close(out, contiguous, F64_TOL)


# ------------------------------------------------------------------------------------------
# precisions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, F32_TOL), (torch.float16, HALF_TOL), (torch.bfloat16, HALF_TOL)]
)
@pytest.mark.parametrize("with_options", [False, True])
def test_low_precision_vs_float64(dtype, tol, with_options):
    B, H, N, D = 2, 3, 65, 64
    q, k, v = make_qkv(B, H, N, D, dtype=dtype, requires_grad=True)
    scale = make_scale("tensorH", H, dtype=dtype, requires_grad=True) if with_options else None
    bias = make_bias("HNN", B, H, N, dtype=dtype, requires_grad=True) if with_options else None
    out = reference.attention(q, k, v, scale=scale, bias=bias, diagonal_mask=with_options)
    assert out.dtype == dtype and out.shape == (B, H, N, D)

    # the float64 oracle on the very same (quantized) inputs
    leaves = [q, k, v] + ([scale, bias] if with_options else [])
    leaves64 = [t.detach().to(torch.float64).requires_grad_(True) for t in leaves]
    q64, k64, v64 = leaves64[:3]
    s64, b64 = (leaves64[3], leaves64[4]) if with_options else (None, None)
    ref = sdpa_oracle(q64, k64, v64, scale=s64, bias=b64, diagonal_mask=with_options)
    assert_rel_close(out, ref, tol, f"{dtype} forward")

    grad_out = torch.randn(B, H, N, D, dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    names = ["q", "k", "v", "scale", "bias"]
    for name, leaf, leaf64 in zip(names, leaves, leaves64):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert_rel_close(leaf.grad, leaf64.grad, tol, f"{dtype} grad {name}")


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("diagonal_mask", [False, True])
def test_gradcheck_full(diagonal_mask):
    """Full (every-element) gradcheck for q, k, v, a per-head scale and a [B, H, N, N] bias."""
    B, H, N, D = 1, 2, 3, 2
    q, k, v = make_qkv(B, H, N, D, requires_grad=True)
    scale = make_scale("tensorH", H, requires_grad=True)
    bias = make_bias("BHNN", B, H, N, requires_grad=True)

    def fn(q, k, v, scale, bias):
        return reference.attention(q, k, v, scale=scale, bias=bias, diagonal_mask=diagonal_mask)

    assert torch.autograd.gradcheck(fn, (q, k, v, scale, bias), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("diagonal_mask", [False, True])
@pytest.mark.parametrize("bias_kind", ["HNN", "BHNN", "1NN", "B1NN"])
@pytest.mark.parametrize("scale_kind", ["tensorH", "tensor0"])
def test_gradcheck_fast(diagonal_mask, bias_kind, scale_kind):
    """gradcheck's fast mode (random projections of the Jacobian) over the option grid."""
    B, H, N, D = 2, 2, 5, 4
    q, k, v = make_qkv(B, H, N, D, requires_grad=True)
    scale = make_scale(scale_kind, H, requires_grad=True)
    bias = make_bias(bias_kind, B, H, N, requires_grad=True)

    def fn(q, k, v, scale, bias):
        return reference.attention(q, k, v, scale=scale, bias=bias, diagonal_mask=diagonal_mask)

    assert torch.autograd.gradcheck(
        fn, (q, k, v, scale, bias), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize("diagonal_mask", [False, True])
def test_gradcheck_float_scale_no_bias(diagonal_mask):
    q, k, v = make_qkv(1, 3, 6, 8, requires_grad=True)

    def fn(q, k, v):
        return reference.attention(q, k, v, scale=0.8, diagonal_mask=diagonal_mask)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("diagonal_mask", [False, True])
def test_grads_match_sdpa_autograd(diagonal_mask):
    """Gradients for q, k, v, a per-head scale and a [B, H, N, N] bias equal SDPA's."""
    B, H, N, D = 2, 3, 17, 16
    q, k, v = make_qkv(B, H, N, D, requires_grad=True)
    scale = make_scale("tensorH", H, requires_grad=True)
    bias = make_bias("BHNN", B, H, N, requires_grad=True)
    leaves = [q, k, v, scale, bias]
    twins = [t.detach().clone().requires_grad_(True) for t in leaves]
    grad_out = torch.randn(B, H, N, D, dtype=torch.float64)
    reference.attention(q, k, v, scale=scale, bias=bias, diagonal_mask=diagonal_mask).backward(grad_out)
    sdpa_oracle(*twins[:3], scale=twins[3], bias=twins[4], diagonal_mask=diagonal_mask).backward(grad_out)
    for name, a, b in zip(["q", "k", "v", "scale", "bias"], leaves, twins):
        assert_rel_close(a.grad, b.grad, 1e-10, f"grad {name}")
    if diagonal_mask:
        diag = torch.diagonal(bias.grad, dim1=-2, dim2=-1)
        assert torch.equal(diag, torch.zeros_like(diag)), "masked positions must get zero bias grad"


# ------------------------------------------------------------------------------------------
# qkv packed
# ------------------------------------------------------------------------------------------
def timm_unpacked(qkv, num_heads, **options):
    B, N, width = qkv.shape
    D = width // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    out = reference.attention(q, k, v, **options)
    return out.transpose(1, 2).reshape(B, N, num_heads * D)


@pytest.mark.parametrize(
    "B,N,H,D,options",
    [
        (2, 17, 3, 16, {}),
        (1, 65, 2, 32, {"diagonal_mask": True}),
        (3, 5, 4, 8, {"scale": "tensorH", "bias": "HNN", "diagonal_mask": True}),
        (2, 10, 1, 64, {"scale": 0.3, "bias": "BHNN"}),
    ],
)
def test_qkvpacked_matches_timm_layout(B, N, H, D, options):
    qkv = torch.randn(B, N, 3 * H * D, dtype=torch.float64, requires_grad=True)
    opts = dict(options)
    if opts.get("scale") == "tensorH":
        opts["scale"] = make_scale("tensorH", H, requires_grad=True)
    if isinstance(opts.get("bias"), str):
        opts["bias"] = make_bias(opts["bias"], B, H, N, requires_grad=True)
    tensors = [t for t in opts.values() if isinstance(t, torch.Tensor)]

    out = reference.attention_qkvpacked(qkv, H, **opts)
    assert out.shape == (B, N, H * D) and out.dtype == qkv.dtype

    qkv2 = qkv.detach().clone().requires_grad_(True)
    opts2 = {
        key: (val.detach().clone().requires_grad_(True) if isinstance(val, torch.Tensor) else val)
        for key, val in opts.items()
    }
    tensors2 = [t for t in opts2.values() if isinstance(t, torch.Tensor)]
    ref = timm_unpacked(qkv2, H, **opts2)
    assert_rel_close(out, ref, F64_TOL, "forward")

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert_rel_close(qkv.grad, qkv2.grad, F64_TOL, "grad qkv")
    for a, b in zip(tensors, tensors2):
        assert_rel_close(a.grad, b.grad, F64_TOL, "grad option")


def test_qkvpacked_independent_oracle_and_non_contiguous():
    """Packed attention on a non-contiguous qkv against SDPA on hand-sliced q, k, v."""
    B, N, H, D = 2, 17, 2, 16
    qkv = torch.randn(N, B, 3 * H * D, dtype=torch.float64).transpose(0, 1)  # [B, N, 3HD] view
    assert not qkv.is_contiguous()
    out = reference.attention_qkvpacked(qkv, H)
    q = torch.stack([qkv[..., h * D : (h + 1) * D] for h in range(H)], dim=1)
    k = torch.stack([qkv[..., (H + h) * D : (H + h + 1) * D] for h in range(H)], dim=1)
    v = torch.stack([qkv[..., (2 * H + h) * D : (2 * H + h + 1) * D] for h in range(H)], dim=1)
    ref = sdpa_oracle(q, k, v)  # [B, H, N, D]
    ref = torch.cat([ref[:, h] for h in range(H)], dim=-1)  # [B, N, H*D]
    assert_rel_close(out, ref, F64_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_qkvpacked_low_precision(dtype):
    B, N, H, D = 2, 17, 3, 32
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
    out = reference.attention_qkvpacked(qkv, H, diagonal_mask=True)
    assert out.dtype == dtype
    ref = timm_unpacked(qkv.to(torch.float64), H, diagonal_mask=True)
    assert_rel_close(out, ref, F32_TOL if dtype == torch.float32 else HALF_TOL)


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
B_, H_, N_, D_ = 2, 3, 5, 8


def good():
    return [torch.randn(B_, H_, N_, D_) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate,exc,name",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q"),
        (lambda q, k, v: (q[None], k, v), ValueError, "q"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "q"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "q"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q"),
        (lambda q, k, v: (q.bool(), k, v), TypeError, "q"),
        (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, "q"),
        (lambda q, k, v: (q, k[:, :, :-1], v), ValueError, "k"),
        (lambda q, k, v: (q, k[:, :-1], v), ValueError, "k"),
        (lambda q, k, v: (q, k[0], v), ValueError, "k"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "k"),
        (lambda q, k, v: (q, k, v[..., :-1]), ValueError, "v"),
        (lambda q, k, v: (q, k, v[:1]), ValueError, "v"),
        (lambda q, k, v: (q, k, v.bfloat16()), TypeError, "v"),
        (lambda q, k, v: (q, k, v.int()), TypeError, "v"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v"),
    ],
)
def test_bad_qkv_raise(mutate, exc, name):
    q, k, v = mutate(*good())
    with pytest.raises(exc, match=rf"^{name}\b"):
        reference.attention(q, k, v)


@pytest.mark.parametrize(
    "bias_shape",
    [
        (N_, N_),
        (H_ + 1, N_, N_),
        (H_, N_, N_ + 1),
        (H_, N_ + 1, N_),
        (B_ + 1, H_, N_, N_),
        (B_, 2, N_, N_),
        (B_, H_, N_, 1),
        (1, B_, H_, N_, N_),
        (N_,),
    ],
)
def test_bad_bias_shape_raises(bias_shape):
    with pytest.raises(ValueError, match=r"^bias\b"):
        reference.attention(*good(), bias=torch.randn(bias_shape))


@pytest.mark.parametrize(
    "bias,exc",
    [
        (torch.zeros(H_, N_, N_, dtype=torch.long), TypeError),
        (torch.zeros(H_, N_, N_, dtype=torch.bool), TypeError),
        ([[0.0]], TypeError),
        (torch.zeros(H_, N_, N_, device="meta"), ValueError),
    ],
)
def test_bad_bias_type_raises(bias, exc):
    with pytest.raises(exc, match=r"^bias\b"):
        reference.attention(*good(), bias=bias)


@pytest.mark.parametrize(
    "scale,exc",
    [
        (torch.ones(H_ + 1), ValueError),
        (torch.ones(1, H_), ValueError),
        (torch.ones(1), ValueError),  # H_ > 1: a one-element [1] tensor is neither [] nor [H]
        (torch.ones(H_, 1), ValueError),
        (torch.ones((), dtype=torch.long), TypeError),
        (torch.ones(H_, dtype=torch.int32), TypeError),
        ("0.5", TypeError),
        (True, TypeError),
        ([0.5] * H_, TypeError),
        (torch.ones(H_, device="meta"), ValueError),
    ],
)
def test_bad_scale_raises(scale, exc):
    with pytest.raises(exc, match=r"^scale\b"):
        reference.attention(*good(), scale=scale)


@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True), 1.0])
def test_non_bool_diagonal_mask_raises(value):
    with pytest.raises(TypeError, match=r"^diagonal_mask\b"):
        reference.attention(*good(), diagonal_mask=value)


def test_diagonal_mask_with_one_token_raises():
    q, k, v = (torch.randn(2, 3, 1, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"^diagonal_mask\b"):
        reference.attention(q, k, v, diagonal_mask=True)
    # without the mask a single token is fine: it attends to itself and returns v
    assert_rel_close(reference.attention(q, k, v), v, F32_TOL)


@pytest.mark.parametrize(
    "shape,num_heads,exc,name",
    [
        ((2, 5, 3 * 3 * 8 + 1), 3, ValueError, "num_heads"),
        ((2, 5, 51), 2, ValueError, "num_heads"),
        ((2, 5, 20), 3, ValueError, "num_heads"),
        ((2, 5, 72), 0, ValueError, "num_heads"),
        ((2, 5, 72), -1, ValueError, "num_heads"),
        ((2, 5, 72), True, ValueError, "num_heads"),
        ((5, 72), 3, ValueError, "qkv"),
        ((2, 1, 5, 72), 3, ValueError, "qkv"),
    ],
)
def test_bad_qkvpacked_raise(shape, num_heads, exc, name):
    with pytest.raises(exc, match=name):
        reference.attention_qkvpacked(torch.randn(shape), num_heads)


def test_qkvpacked_bad_dtype_and_num_heads_type():
    with pytest.raises(TypeError, match=r"^qkv\b"):
        reference.attention_qkvpacked(torch.zeros(2, 5, 72, dtype=torch.long), 3)
    with pytest.raises((TypeError, ValueError), match=r"^num_heads\b"):
        reference.attention_qkvpacked(torch.randn(2, 5, 72), 3.0)
    with pytest.raises(ValueError, match=r"^bias\b"):
        reference.attention_qkvpacked(torch.randn(2, 5, 72), 3, bias=torch.randn(3, 5, 6))

