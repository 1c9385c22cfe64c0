"""FusedAttention and the ViT on the Triton kernel, patch_vit, and the GPU-only checks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close
from torch import nn

from mgit_fast import FusedAttention, FusedMGiT, ViT, patch_vit, reference


class TimmStyleAttention(nn.Module):
    """timm's ``Attention`` as written there (qkv → reshape → SDPA → proj), for CPU tests."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class TinyTimmViT(nn.Module):
    def __init__(self, dim=32, heads=2, depth=2, **attention_kwargs):
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.LayerNorm(dim), TimmStyleAttention(dim, heads, **attention_kwargs)) for _ in range(depth)]
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.blocks(x)[:, 0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_vit_keeps_outputs(backend):
    model = TinyTimmViT().double() if backend == "torch" else TinyTimmViT()
    x = torch.randn(3, 9, 32, dtype=next(model.parameters()).dtype)
    before = model(x)
    original = copy.deepcopy(model)
    assert patch_vit(model, backend=backend) == 2
    assert all(isinstance(b[1], FusedAttention) for b in model.blocks)
    assert model.blocks[0][1].qkv is not original.blocks[0][1].qkv  # the deepcopy's, not shared
    assert_rel_close(model(x), before, 1e-5 if backend == "triton" else 1e-12, "patched output")
    # weights were kept, not re-initialised, and gradients reach them
    torch.testing.assert_close(model.blocks[1][1].qkv.weight, original.blocks[1][1].qkv.weight)
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert patch_vit(model) == 0  # already fused


def test_patch_vit_refuses_attention_dropout_and_changes_nothing():
    model = TinyTimmViT(attn_drop=0.1)
    with pytest.raises(ValueError, match="attention dropout"):
        patch_vit(model)
    assert all(isinstance(b[1], TimmStyleAttention) for b in model.blocks)
    with pytest.raises(TypeError, match="model"):
        patch_vit("vit")


def test_fused_mgit_fuses_timm_style_attention():
    """FusedMGiT swaps both models' timm-style attention for FusedAttention (weights kept),
    unless told not to; a model it cannot swap is refused before either model changes."""
    primary, auxiliary = TinyTimmViT(), TinyTimmViT(depth=1)
    x, y = torch.randn(4, 9, 32), torch.randint(0, 3, (4,))
    before = primary(x)
    mgit = FusedMGiT(primary, auxiliary, backend="torch")
    assert all(isinstance(b[1], FusedAttention) for m in (mgit.primary, mgit.auxiliary) for b in m.blocks)
    assert_rel_close(mgit(x), before, 1e-5, "fused primary")
    assert torch.isfinite(mgit.training_step(x, y)["loss"])

    kept = FusedMGiT(TinyTimmViT(), TinyTimmViT(depth=1), fuse_attention=False)
    assert all(isinstance(b[1], TimmStyleAttention) for b in kept.primary.blocks)

    primary = TinyTimmViT()
    with pytest.raises(ValueError, match="attention dropout"):
        FusedMGiT(primary, TinyTimmViT(depth=1, attn_drop=0.1))
    assert all(isinstance(b[1], TimmStyleAttention) for b in primary.blocks)


def test_patch_vit_on_the_builtin_vit_is_a_no_op():
    model = ViT(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    assert patch_vit(model) == 0


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_attn_mask_becomes_a_bias(mask_kind):
    attention = FusedAttention(32, 2, backend="triton")
    timm_style = TimmStyleAttention(32, 2)
    timm_style.load_state_dict(attention.state_dict())
    x = torch.randn(2, 9, 32)
    keep = torch.rand(2, 1, 9, 9) > 0.3
    keep |= torch.eye(9, dtype=torch.bool)  # every row keeps something
    mask = keep if mask_kind == "bool" else torch.randn(2, 1, 9, 9)
    assert_rel_close(attention(x, attn_mask=mask), timm_style(x, attn_mask=mask), 1e-5, "masked")


@pytest.mark.parametrize("variant, mask_rank", [("standard", None), ("lsa", None), ("gmm", None), ("ibit", None),
                                               ("ibit", 2)])
def test_fused_attention_triton_equals_torch(variant, mask_rank):
    torch.manual_seed(0)
    module = FusedAttention(32, 2, variant=variant, grid_size=3, backend="torch", mask_rank=mask_rank)
    twin = copy.deepcopy(module)
    twin.backend = "triton"
    x = torch.randn(2, 10, 32)
    out, out_t = module(x), twin(x)
    assert_rel_close(out_t, out, 1e-5, "out")
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(module.parameters()), upstream)
    grads_t = torch.autograd.grad(out_t, list(twin.parameters()), upstream)
    for (name, _), g, g_t in zip(module.named_parameters(), grads, grads_t):
        tol = 1e-4 if name == "scale" else 1e-5
        assert_rel_close(g_t, g, tol, name)


def test_vit_on_triton_trains_like_torch():
    torch.manual_seed(0)
    model = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=4, embed_dim=32, depth=2, num_heads=2,
                attention="lsa", backend="torch")
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, FusedAttention):
            m.backend = "triton"
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,))
    losses = [F.cross_entropy(m(x), y) for m in (model, twin)]
    assert_rel_close(losses[1], losses[0], 1e-5, "loss")
    grads = [torch.autograd.grad(loss, list(m.parameters())) for loss, m in zip(losses, (model, twin))]
    for (name, _), g, g_t in zip(model.named_parameters(), *grads):
        assert_rel_close(g_t, g, 1e-4, name)


# ------------------------------------------------------------------------------------------
# on a CUDA GPU
# ------------------------------------------------------------------------------------------
VIT_SHAPES = [(32, 3, 65, 64), (16, 6, 197, 64), (8, 12, 197, 64), (4, 4, 577, 32), (8, 2, 257, 128), (64, 3, 17, 16)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", VIT_SHAPES)
@pytest.mark.parametrize("variant", ["standard", "lsa", "bias", "mask"])
def test_cuda_vit_shapes_against_float64_and_sdpa(dtype, shape, variant):
    from mgit_fast import functional

    B, H, N, D = shape
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype, requires_grad=True)
    scale = (torch.rand(H, device="cuda") * 0.1 + D**-0.5).requires_grad_() if variant == "lsa" else None
    bias = torch.randn(H, N, N, device="cuda", requires_grad=True) if variant == "bias" else None
    mask = (torch.rand(H, N, N, device="cuda") * 1.5).requires_grad_() if variant == "mask" else None
    out = functional.attention_qkvpacked(qkv, H, scale=scale, bias=bias, diagonal_mask=variant == "lsa", mask=mask)
    leaves = [t for t in (qkv, scale, bias, mask) if t is not None]
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, upstream)
    twins = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.attention_qkvpacked(
        twins[0], H, scale=twins[1] if scale is not None else None, bias=twins[-1] if bias is not None else None,
        diagonal_mask=variant == "lsa", mask=twins[-1] if mask is not None else None,
    )
    ref_grads = torch.autograd.grad(ref, twins, upstream.double())
    assert_rel_close(out, ref, 2e-2, "out")
    for t, g, r in zip(leaves, grads, ref_grads):
        assert_rel_close(g, r, 5e-2 if t is scale else 2e-2, "grad")
    if variant == "standard":
        q, k, v = qkv.detach().view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
        assert_rel_close(out, sdpa, 2e-2, "vs sdpa")


@pytest.mark.cuda
def test_cuda_fp32_against_float64():
    q, k, v = (torch.randn(4, 3, 197, 64, device="cuda") for _ in range(3))
    from mgit_fast import functional

    out = functional.attention(q, k, v, backend="triton")
    ref = reference.attention(q.double(), k.double(), v.double())
    assert_rel_close(out, ref, 1e-3, "fp32 (tf32 dots)")


@pytest.mark.cuda
def test_cuda_timm_patching():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        before = model(x)
        assert patch_vit(model) == 12
        after = model(x)
    assert_rel_close(after, before, 1e-3, "patched timm ViT")


@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph_block():
    model = ViT(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, attention="lsa").cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert_rel_close(out, eager, 1e-3, "compiled")


def test_fused_attention_names_x_for_a_wrong_shape_or_dtype():
    """A wrong width, rank or dtype is refused naming ``x`` (not a matmul error, not ``qkv``)."""
    attention = FusedAttention(32, 2, backend="torch")
    with pytest.raises(ValueError, match=r"x must be \[B, N, 32\]"):
        attention(torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        attention(torch.randn(5, 32))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        attention(torch.randn(2, 5, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside: accepted
        assert attention(torch.randn(2, 5, 32)).shape == (2, 5, 32)
