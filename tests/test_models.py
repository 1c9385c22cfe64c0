"""FusedAttention, the ViT and make_auxiliary, on the CPU (torch backend), against float64
hand-written references."""
from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgit_fast.attention import FusedAttention, GaussianMixtureBias, IBiTMask, ibit_initial_mask
from mgit_fast.models import Block, DropPath, ViT, make_auxiliary
from mgit_fast.models.vit import ShiftedPatchEmbed, shifted_images

VARIANTS = ("standard", "lsa", "gmm", "ibit")
TINY = dict(img_size=8, patch_size=2, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
NUM_TOKENS = 1 + (8 // 2) ** 2


def tiny_vit(**overrides) -> ViT:
    return ViT(**{**TINY, **overrides})


def rel_err(out: Tensor, ref: Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def images(batch: int = 3, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(batch, 3, 8, 8, dtype=dtype)


# --------------------------------------------------------------------------------------------
# hand-written references
# --------------------------------------------------------------------------------------------
def timm_attention(
    attn: FusedAttention, x: Tensor, scale, bias: Optional[Tensor] = None, diagonal_mask: bool = False
) -> Tensor:
    """timm's Attention.forward, written out, with LSA's mask and an additive bias."""
    B, N, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if diagonal_mask:
        scores = scores.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf"))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


def gmm_bias_loop(weight: Tensor, log_sigma: Tensor, grid_size: int) -> Tensor:
    """The Gaussian-mixture bias, element by element, in float64."""
    H, K = weight.shape
    P = grid_size * grid_size
    bias = torch.zeros(H, P + 1, P + 1, dtype=torch.float64)
    for h in range(H):
        for i in range(P):
            for j in range(P):
                (ri, ci), (rj, cj) = divmod(i, grid_size), divmod(j, grid_size)
                sq_dist = (ri - rj) ** 2 + (ci - cj) ** 2
                bias[h, 1 + i, 1 + j] = sum(
                    weight[h, k].item() * math.exp(-sq_dist / (2 * math.exp(log_sigma[h, k].item()) ** 2))
                    for k in range(K)
                )
    return bias


def timm_vit_forward(model: ViT, x: Tensor) -> Tensor:
    """timm's VisionTransformer forward (conv patches, standard attention), written out."""
    tokens = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.patch_size)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + model.pos_embed
    for block in model.blocks:
        tokens = tokens + timm_attention(block.attn, block.norm1(tokens), block.attn.head_dim**-0.5)
        tokens = tokens + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(tokens))))
    return model.head(model.norm(tokens)[:, 0])


# --------------------------------------------------------------------------------------------
# FusedAttention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [None, 0.3])
def test_standard_attention_matches_timm(scale):
    attn = FusedAttention(32, num_heads=4, scale=scale).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    ref = timm_attention(attn, x, scale if scale is not None else 8**-0.5)
    assert rel_err(attn(x), ref) < 1e-12


def test_lsa_attention_matches_timm_with_learned_scale_and_diagonal_mask():
    attn = FusedAttention(32, num_heads=4, variant="lsa").double()
    assert attn.diagonal_mask and isinstance(attn.scale, nn.Parameter) and attn.scale.shape == (4,)
    assert torch.allclose(attn.scale, torch.full((4,), 8**-0.5, dtype=torch.float64))
    with torch.no_grad():
        attn.scale.copy_(torch.rand(4, dtype=torch.float64) + 0.1)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    ref = timm_attention(attn, x, attn.scale.view(4, 1, 1), diagonal_mask=True)
    assert rel_err(attn(x), ref) < 1e-12


def test_gmm_bias_matches_loop_and_spares_the_class_token():
    gmm = GaussianMixtureBias(num_heads=2, grid_size=3, num_kernels=3).double()
    with torch.no_grad():
        gmm.weight.copy_(torch.randn(2, 3, dtype=torch.float64))
        gmm.log_sigma.copy_(torch.randn(2, 3, dtype=torch.float64) * 0.5)
    bias = gmm()
    assert bias.shape == (2, 10, 10)
    assert rel_err(bias, gmm_bias_loop(gmm.weight, gmm.log_sigma, 3)) < 1e-12
    assert (bias[:, 0, :] == 0).all() and (bias[:, :, 0] == 0).all()
    assert "sq_dist" not in gmm.state_dict()


def test_gmm_starts_at_unit_amplitudes_and_spread_widths():
    gmm = GaussianMixtureBias(num_heads=3, grid_size=4, num_kernels=2)
    assert torch.equal(gmm.weight, torch.ones(3, 2))
    assert torch.allclose(gmm.log_sigma.exp(), torch.tensor([[1.0, 2.0]] * 3))


def test_gmm_attention_matches_timm_with_bias():
    attn = FusedAttention(32, num_heads=2, variant="gmm", grid_size=3).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    bias = gmm_bias_loop(attn.gmm.weight, attn.gmm.log_sigma, 3)
    assert rel_err(attn(x), timm_attention(attn, x, 16**-0.5, bias=bias)) < 1e-12


@pytest.mark.parametrize("variant, names", [("lsa", ["scale"]), ("gmm", ["gmm.weight", "gmm.log_sigma"])])
def test_gradients_reach_mask_parameters(variant, names):
    attn = FusedAttention(32, num_heads=2, variant=variant, grid_size=3)
    attn(torch.randn(2, 10, 32)).square().sum().backward()
    params = dict(attn.named_parameters())
    for name in names:
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------
# IBiT: the multiplicative mask
# --------------------------------------------------------------------------------------------
def ibit_init_loop(num_heads: int, grid_size: int, prefix: int = 1) -> Tensor:
    """IBiT's initial mask, element by element, in float64: a Gaussian of the patch distance
    of width h + 1 patches in head h; 1 in the prefix tokens' rows and columns."""
    P = grid_size * grid_size
    mask = torch.ones(num_heads, prefix + P, prefix + P, dtype=torch.float64)
    for h in range(num_heads):
        for i in range(P):
            for j in range(P):
                (ri, ci), (rj, cj) = divmod(i, grid_size), divmod(j, grid_size)
                sq_dist = (ri - rj) ** 2 + (ci - cj) ** 2
                mask[h, prefix + i, prefix + j] = math.exp(-sq_dist / (2 * (h + 1) ** 2))
    return mask


@pytest.mark.parametrize("grid_size, prefix", [(3, 1), (2, 1), (4, 3), (3, 0)])
def test_ibit_mask_starts_as_gaussians_with_ones_for_the_prefix_tokens(grid_size, prefix):
    module = IBiTMask(num_heads=3, grid_size=grid_size, num_prefix_tokens=prefix)
    mask = module()
    N = prefix + grid_size**2
    assert mask.shape == (3, N, N) and mask.dtype == torch.float32 and module.num_tokens == N
    expected = ibit_init_loop(3, grid_size, prefix)
    assert (mask.double() - expected).abs().max() < 1e-7
    assert (mask[:, :prefix, :] == 1).all() and (mask[:, :, :prefix] == 1).all()
    assert (torch.diagonal(mask, dim1=-2, dim2=-1) == 1).all()
    # neighbours (distance 1) in head 0 start at exp(-1/2); the heads widen: head h > head h-1 off the diagonal
    assert mask[0, prefix, prefix + 1].item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    off = ~torch.eye(grid_size**2, dtype=torch.bool)
    patches = mask[:, prefix:, prefix:]
    assert (patches[1][off] > patches[0][off]).all() and (patches[2][off] > patches[1][off]).all()
    # torch.exp and math.exp may differ in the last bit (vectorised exp on AVX-512): 4 float64 ULPs
    torch.testing.assert_close(ibit_initial_mask(3, grid_size, prefix), expected, rtol=1e-15, atol=0.0)
    assert dict(module.named_parameters()).keys() == {"mask"}


@pytest.mark.parametrize("grid_size, heads", [(2, 4), (3, 3), (4, 2)])
def test_ibit_low_rank_start_is_the_best_rank_r_approximation(grid_size, heads):
    """M = 1 + U·Vᵀ starts at the best rank-r approximation of init − 1: its error is the
    norm of the discarded eigenvalues, equal to the Eckart–Young optimum (singular values of
    the symmetric target), falls with r and is zero at r = grid_size²; prefix rows/columns
    start at exactly 1."""
    P = grid_size**2
    target = ibit_init_loop(heads, grid_size) - 1.0
    singular = torch.linalg.svdvals(target)  # [H, P + 1], descending; |eigenvalues| of a symmetric matrix
    previous = None
    for rank in range(1, P + 1):
        module = IBiTMask(heads, grid_size, mask_rank=rank)
        assert dict(module.named_parameters()).keys() == {"mask_u", "mask_v"}
        assert module.mask_u.shape == module.mask_v.shape == (heads, P + 1, rank)
        u, v, discarded = module.initial_factors()
        error = torch.linalg.matrix_norm(target - u @ v.transpose(-1, -2))  # Frobenius, per head
        optimum = singular[:, rank:].square().sum(-1).sqrt()
        assert torch.allclose(error, discarded.norm(dim=-1), rtol=1e-9, atol=1e-12)
        assert torch.allclose(error, optimum, rtol=1e-9, atol=1e-12)
        mask = module()
        assert (mask[:, 0, :] == 1).all() and (mask[:, :, 0] == 1).all()
        float_error = torch.linalg.matrix_norm(mask.double() - 1.0 - target)
        assert torch.allclose(float_error, error, atol=1e-5)
        if previous is not None:
            assert (error <= previous + 1e-12).all()
        previous = error
    assert error.max() < 1e-12  # full rank: exact
    if P > 2:  # a low rank is already a close start: rank 2 keeps most of the structure
        rank2 = IBiTMask(heads, grid_size, mask_rank=2)
        assert (torch.linalg.matrix_norm(rank2().double() - 1 - target) < 0.5 * torch.linalg.matrix_norm(target)).all()


def ibit_attention_reference(attn: FusedAttention, x: Tensor, mask: Tensor) -> Tensor:
    """softmax(q·kᵀ·scale) ⊙ M, not renormalised, times v; then the projection."""
    B, N, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    probs = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1) * mask
    return attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("mask_rank", [None, 2])
def test_ibit_attention_is_softmax_times_mask_without_renormalisation(mask_rank):
    attn = FusedAttention(32, num_heads=2, variant="ibit", grid_size=3, mask_rank=mask_rank).double()
    with torch.no_grad():
        for p in attn.ibit.parameters():
            p.copy_(torch.rand_like(p) * 2)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    mask = attn.ibit()
    assert rel_err(attn(x), ibit_attention_reference(attn, x, mask)) < 1e-12
    # renormalising the masked rows would be a different operation
    renormalised = mask / (mask.sum(-1, keepdim=True))
    assert rel_err(attn(x), ibit_attention_reference(attn, x, renormalised)) > 1e-3


@pytest.mark.parametrize("mask_rank", [None, 3])
def test_ibit_mask_gradients_match_finite_differences(mask_rank):
    """float64, small: every mask parameter's gradient against central differences."""
    attn = FusedAttention(8, num_heads=2, variant="ibit", grid_size=2, mask_rank=mask_rank, backend="torch").double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    weights = torch.randn(2, 5, 8, dtype=torch.float64)

    def loss() -> Tensor:
        return (attn(x) * weights).sum()

    params = dict(attn.ibit.named_parameters())
    assert set(params) == ({"mask"} if mask_rank is None else {"mask_u", "mask_v"})
    grads = torch.autograd.grad(loss(), list(params.values()))
    eps = 1e-6
    for (name, p), grad in zip(params.items(), grads):
        numeric = torch.zeros_like(p)
        with torch.no_grad():
            for index in range(p.numel()):
                flat = p.view(-1)
                flat[index] += eps
                up = loss()
                flat[index] -= 2 * eps
                down = loss()
                flat[index] += eps
                numeric.view(-1)[index] = (up - down) / (2 * eps)
        assert grad.abs().sum() > 0, name
        assert rel_err(grad, numeric) < 1e-7, name


def test_ibit_reset_parameters_restores_the_start():
    for rank in (None, 2):
        module = IBiTMask(2, 3, mask_rank=rank)
        start = module().detach().clone()
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        assert not torch.equal(module(), start)
        module.reset_parameters()
        assert torch.equal(module(), start)


def test_vit_ibit_forward_backward_weight_decay_and_auxiliary():
    for rank in (None, 2):
        model = tiny_vit(attention="ibit", mask_rank=rank, depth=3)
        assert model.config["mask_rank"] == rank and ViT(**model.config).config == model.config
        masks = {n for n, _ in model.named_parameters() if ".ibit." in n}
        assert len(masks) == (3 if rank is None else 6)
        assert masks <= model.no_weight_decay()
        F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
        for name in masks:
            grad = dict(model.named_parameters())[name].grad
            assert grad is not None and torch.isfinite(grad).all(), name
            # Only the class token's row of the last block reaches the head; there
            # dM[0, j] · U[0] = 0 at the start (U's class-token row is 0), so that block's V gets
            # no gradient yet; every other mask parameter gets one.
            assert (grad.abs().sum() == 0) == (name == "blocks.2.attn.ibit.mask_v"), name
        with torch.no_grad():
            for block in model.blocks:
                for p in block.attn.ibit.parameters():
                    p.mul_(0.5)
        auxiliary = make_auxiliary(model, 1, seed=0)
        start = IBiTMask(2, 4, mask_rank=rank)()
        assert torch.equal(auxiliary.blocks[0].attn.ibit(), start)  # a fresh mask, the primary's untouched
        assert not torch.equal(model.blocks[0].attn.ibit(), start)
        model.init_weights()
        assert all(torch.equal(block.attn.ibit(), start) for block in model.blocks)


def test_fused_mgit_steps_an_ibit_vit():
    from mgit_fast import FusedMGiT

    primary = tiny_vit(attention="ibit", mask_rank=None)
    mgit = FusedMGiT(primary, aux_depth=1, aux_seed=0, lr=1e-2, backend="torch")
    names = [n for n, _ in mgit.optimizer.named_primary]
    decays = dict(zip(names, mgit.optimizer.decay_primary))
    assert not any(decays[n] for n in names if ".ibit." in n) and decays["blocks.0.attn.qkv.weight"]
    before = {n: p.detach().clone() for n, p in mgit.primary.named_parameters() if ".ibit." in n}
    aux_before = mgit.auxiliary.blocks[0].attn.ibit.mask.detach().clone()
    x, y = images(8), torch.randint(0, 5, (8,))
    for _ in range(2):
        stats = mgit.training_step(x, y)
        assert torch.isfinite(stats["loss"]) and not bool(stats["skipped"])
    for name, start in before.items():
        assert not torch.equal(dict(mgit.primary.named_parameters())[name], start), name
    assert not torch.equal(mgit.auxiliary.blocks[0].attn.ibit.mask, aux_before)


# --------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------
def timm_names(depth: int, variant: str, spt: bool) -> set:
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    names |= {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    if spt:
        names |= {"patch_embed.norm.weight", "patch_embed.norm.bias"}
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
        if variant == "lsa":
            names.add(f"blocks.{i}.attn.scale")
        if variant == "gmm":
            names |= {f"blocks.{i}.attn.gmm.weight", f"blocks.{i}.attn.gmm.log_sigma"}
        if variant == "ibit":
            names.add(f"blocks.{i}.attn.ibit.mask")
    return names


@pytest.mark.parametrize("spt", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_names_and_shapes(variant, spt):
    model = tiny_vit(attention=variant, spt=spt)
    params = dict(model.named_parameters())
    assert set(params) == timm_names(2, variant, spt)
    assert params["cls_token"].shape == (1, 1, 32)
    assert params["pos_embed"].shape == (1, NUM_TOKENS, 32)
    assert params["head.weight"].shape == (5, 32)
    assert params["blocks.0.mlp.fc1.weight"].shape == (64, 32)
    assert isinstance(model.blocks, nn.Sequential) and all(isinstance(b, Block) for b in model.blocks)
    if spt:
        assert params["patch_embed.norm.weight"].shape == (5 * 3 * 2 * 2,)
        assert params["patch_embed.proj.weight"].shape == (32, 5 * 3 * 2 * 2)
    else:
        assert isinstance(model.patch_embed.proj, nn.Conv2d)
        assert params["patch_embed.proj.weight"].shape == (32, 3, 2, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_weight_decay(variant):
    model = tiny_vit(attention=variant)
    gmm_names = {f"blocks.{i}.attn.gmm.{n}" for i in range(2) for n in ("weight", "log_sigma")}
    ibit_names = {f"blocks.{i}.attn.ibit.mask" for i in range(2)}
    masks = {"gmm": gmm_names, "ibit": ibit_names}.get(variant, set())
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} | masks
    assert model.no_weight_decay() <= set(dict(model.named_parameters()))


@pytest.mark.parametrize("spt", [False, True])
def test_output_shapes_and_config_rebuild(spt):
    model = tiny_vit(spt=spt, attention="gmm")
    x = images(4)
    tokens = model.forward_features(x)
    assert tokens.shape == (4, NUM_TOKENS, 32)
    assert model.forward_head(tokens).shape == (4, 5)
    assert torch.equal(model(x), model.forward_head(tokens))
    rebuilt = ViT(**model.config)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == shapes
    attributes = ("num_classes", "embed_dim", "num_heads", "patch_size", "img_size", "depth")
    assert [getattr(model, a) for a in attributes] == [5, 32, 2, 2, 8, 2]


def test_standard_vit_matches_timm_forward():
    model = tiny_vit().double()
    x = images(dtype=torch.float64)
    assert rel_err(model(x), timm_vit_forward(model, x)) < 1e-12


def test_init_weights_reinitialises_every_parameter():
    model = tiny_vit(attention="lsa", spt=True)
    gmm_model = tiny_vit(attention="gmm")
    ibit_models = [tiny_vit(attention="ibit"), tiny_vit(attention="ibit", mask_rank=3)]
    for m in (model, gmm_model, *ibit_models):
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(7.0)
        m.init_weights()
        stale = [n for n, p in m.named_parameters() if (p == 7.0).any()]
        assert not stale
    assert 0.005 < model.blocks[0].attn.qkv.weight.std().item() < 0.04
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(96))


@pytest.mark.parametrize("spt", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_through_vit(variant, spt):
    model = tiny_vit(attention=variant, spt=spt, drop_path=0.2)
    F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    mask_names = ("attn.scale", "gmm.weight", "gmm.log_sigma", "ibit.mask")
    mask_grads = {n: p.grad for n, p in model.named_parameters() if n.endswith(mask_names)}
    assert len(mask_grads) == {"standard": 0, "lsa": 2, "gmm": 4, "ibit": 2}[variant]
    for name, grad in mask_grads.items():
        # Only the class token reaches the head, and its row carries no GMM bias, so the last
        # block's GMM gets a zero gradient; every other mask parameter gets a nonzero one.
        last_gmm = name.startswith("blocks.1.attn.gmm")
        assert (grad.abs().sum() == 0) == last_gmm, name
        if name == "blocks.1.attn.ibit.mask":  # IBiT's class-token row is a mask entry like any other
            assert (grad[:, 0].abs() > 0).all() and (grad[:, 1:] == 0).all()


# --------------------------------------------------------------------------------------------
# Shifted Patch Tokenization
# --------------------------------------------------------------------------------------------
def test_shifted_images_against_slicing():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(1, 2, 6, 6) + 1
    s = 2
    up_left, up_right, down_left, down_right = (torch.zeros_like(x) for _ in range(4))
    up_left[..., :-s, :-s] = x[..., s:, s:]
    up_right[..., :-s, s:] = x[..., s:, :-s]
    down_left[..., s:, :-s] = x[..., :-s, s:]
    down_right[..., s:, s:] = x[..., :-s, :-s]
    expected = torch.cat([x, up_left, up_right, down_left, down_right], dim=1)
    assert torch.equal(shifted_images(x, s), expected)


def test_shifted_patch_embed_against_loops():
    embed = ShiftedPatchEmbed(patch_size=2, in_chans=3, embed_dim=16).double()
    nn.init.normal_(embed.norm.weight)
    nn.init.normal_(embed.norm.bias)
    x = images(2, dtype=torch.float64)
    stacked = shifted_images(x, 1)
    patches = torch.stack(  # patch (r, c) flattened as (row, column, channel)
        [
            stacked[:, :, r : r + 2, c : c + 2].permute(0, 2, 3, 1).reshape(2, -1)
            for r in range(0, 8, 2)
            for c in range(0, 8, 2)
        ],
        dim=1,
    )
    ref = embed.proj(F.layer_norm(patches, (60,), embed.norm.weight, embed.norm.bias, eps=embed.norm.eps))
    out = embed(x)
    assert out.shape == (2, 16, 16)
    assert rel_err(out, ref) < 1e-12


# --------------------------------------------------------------------------------------------
# stochastic depth
# --------------------------------------------------------------------------------------------
def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    torch.manual_seed(0)
    out = drop(x)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)
    assert torch.equal(drop.eval()(x), x)


def test_block_with_every_branch_dropped_is_the_identity():
    block = Block(32, 2, drop_path=1.0).train()
    x = torch.randn(4, NUM_TOKENS, 32)
    assert torch.equal(block(x), x)
    assert not torch.allclose(block.eval()(x), x)


def test_vit_drop_path_rates_and_modes():
    model = tiny_vit(depth=3, drop_path=0.3)
    assert [b.drop_path.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.15, 0.3])
    x = images(8)
    eval_out = model.eval()(x)
    model.train()
    torch.manual_seed(1)
    train_out = model(x)
    torch.manual_seed(1)
    assert torch.equal(model(x), train_out)
    assert not torch.allclose(train_out, eval_out)
    no_drop = tiny_vit()
    assert torch.equal(no_drop.train()(x), no_drop.eval()(x))


# --------------------------------------------------------------------------------------------
# make_auxiliary
# --------------------------------------------------------------------------------------------
def perturb_(model: nn.Module) -> None:
    """Moves every parameter away from any initial value, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)


@pytest.mark.parametrize("spt", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_make_auxiliary(variant, spt):
    primary = tiny_vit(attention=variant, spt=spt, depth=3)
    initial = copy.deepcopy(primary.state_dict())
    perturb_(primary)
    trained = copy.deepcopy(primary.state_dict())
    auxiliary = make_auxiliary(primary, 2)

    assert len(auxiliary.blocks) == 2 and auxiliary.depth == 2
    assert auxiliary.config == {**primary.config, "depth": 2}
    assert set(dict(auxiliary.named_parameters())) == timm_names(2, variant, spt)
    for name, p in auxiliary.named_parameters():
        assert p.shape == trained[name].shape, name
        assert not torch.equal(p, trained[name]), f"{name} kept the primary's value"
        masks = ("gmm", "ibit")  # start at fixed values; everything else is drawn at random
        if p.dim() >= 2 and not any(m in name for m in masks):  # independent of the primary's init
            assert not torch.equal(p, initial[name]), name
    assert auxiliary(images()).shape == (3, 5)
    # the primary is untouched
    assert len(primary.blocks) == 3 and primary.config["depth"] == 3
    assert all(torch.equal(p, trained[n]) for n, p in primary.state_dict().items())


def test_make_auxiliary_keeps_dtype_and_mode():
    primary = tiny_vit().double().eval()
    auxiliary = make_auxiliary(primary)
    assert all(p.dtype == torch.float64 for p in auxiliary.parameters())
    assert not any(m.training for m in auxiliary.modules())
    assert make_auxiliary(primary.train()).training


def test_make_auxiliary_seed_is_reproducible_and_private():
    primary = tiny_vit(attention="gmm")
    rng_before = torch.get_rng_state()
    first = make_auxiliary(primary, 1, seed=3)
    second = make_auxiliary(primary, 1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    other = make_auxiliary(primary, 1, seed=4)
    for name, p in first.state_dict().items():
        assert torch.equal(p, second.state_dict()[name]), name
    assert not torch.equal(first.head.weight, other.head.weight)
    make_auxiliary(primary, 1)
    assert not torch.equal(torch.get_rng_state(), rng_before)


class PlainEncoder(nn.Module):
    """A model without init_weights: blocks in a ModuleList, a depth attribute."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.depth = depth
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def test_make_auxiliary_generic_model_uses_reset_parameters():
    primary = PlainEncoder()
    perturb_(primary)
    auxiliary = make_auxiliary(primary, 2)
    assert isinstance(auxiliary.blocks, nn.ModuleList) and len(auxiliary.blocks) == 2
    assert auxiliary.depth == 2
    primary_params = dict(primary.named_parameters())
    for name, p in auxiliary.named_parameters():
        assert not torch.equal(p, primary_params[name]), name
    assert auxiliary(torch.randn(2, 4)).shape == (2, 4)


def test_make_auxiliary_errors():
    primary = tiny_vit()
    for depth in (0, 3, -1):
        with pytest.raises(ValueError, match="^depth"):
            make_auxiliary(primary, depth)
    with pytest.raises(TypeError, match="^depth"):
        make_auxiliary(primary, 1.0)
    with pytest.raises(TypeError, match="^primary"):
        make_auxiliary(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(variant="flash"), ValueError, "variant"),
        (dict(num_heads=3), ValueError, "num_heads"),
        (dict(num_heads=0), ValueError, "num_heads"),
        (dict(variant="gmm"), ValueError, "grid_size"),
        (dict(variant="gmm", grid_size=0), ValueError, "grid_size"),
        (dict(variant="gmm", grid_size=3, num_kernels=0), ValueError, "num_kernels"),
        (dict(variant="ibit"), ValueError, "grid_size"),
        (dict(variant="ibit", grid_size=0), ValueError, "grid_size"),
        (dict(variant="ibit", grid_size=2.0), TypeError, "grid_size"),
        (dict(variant="ibit", grid_size=3, mask_rank=0), ValueError, "mask_rank"),
        (dict(variant="ibit", grid_size=3, mask_rank=10), ValueError, "mask_rank"),
        (dict(variant="ibit", grid_size=3, mask_rank=2.0), TypeError, "mask_rank"),
        (dict(variant="ibit", grid_size=3, mask_rank=True), TypeError, "mask_rank"),
        (dict(variant="ibit", grid_size=3, num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
        (dict(variant="ibit", grid_size=3, num_prefix_tokens=1.0), TypeError, "num_prefix_tokens"),
        (dict(variant="gmm", grid_size=3, mask_rank=2), ValueError, "mask_rank"),
        (dict(mask_rank=2), ValueError, "mask_rank"),
    ],
)
def test_attention_errors(kwargs, error, name):
    with pytest.raises(error, match=f"^{name}"):
        FusedAttention(32, **{"num_heads": 2, **kwargs})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(img_size=9), "img_size"),
        (dict(attention="window"), "attention"),
        (dict(num_heads=3), "num_heads"),
        (dict(depth=0), "depth"),
        (dict(drop_path=1.5), "drop_path"),
        (dict(attention="lsa", mask_rank=2), "mask_rank"),
        (dict(attention="ibit", mask_rank=17), "mask_rank"),
    ],
)
def test_vit_errors(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        tiny_vit(**kwargs)


def test_vit_rejects_bad_images():
    model = tiny_vit()
    for x in (torch.randn(2, 3, 8, 6), torch.randn(2, 1, 8, 8), torch.randn(3, 8, 8)):
        with pytest.raises(ValueError, match="^x"):
            model(x)
    with pytest.raises(TypeError, match="^x"):
        model([[0.0]])


def test_input_dtype_is_checked_and_named():
    """float64 (or integer) images get a TypeError naming x, not layer_norm's message; under
    autocast a lower precision passes; the model's own dtype always does."""
    from mgit_fast import FusedMGiT

    model = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    for bad in (torch.float64, torch.int64):
        with pytest.raises(TypeError, match="^x must have the model's dtype"):
            model(torch.zeros(2, 1, 8, 8, dtype=bad))
    with pytest.raises(ValueError, match="^x must have shape"):
        model(torch.zeros(2, 3, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)).shape == (2, 3)
    assert model.double()(torch.randn(2, 1, 8, 8, dtype=torch.float64)).shape == (2, 3)
    mgit = FusedMGiT(ViT(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2))
    with pytest.raises(TypeError, match="^x must have the models' dtype"):
        mgit.training_step(torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
