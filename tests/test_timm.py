"""timm's own Vision Transformers (the installed release, its real model code) with mgit_fast
swapped in, on the CPU: what a user of timm meets first.

timm is installed without its dependencies (README); its import of torchvision is served by
``tests/stand_ins`` when no working torchvision is present (see conftest.py).
"""
import copy

import pytest
import timm
import torch
from conftest import assert_rel_close

from mgit_fast import FusedAttention, FusedMGiT, patch_vit


def tiny_224():
    return timm.create_model("vit_tiny_patch16_224", num_classes=10)


def small_image():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make, image", [(tiny_224, 224), (small_image, 32)], ids=["vit_tiny_patch16_224", "32px"])
def test_patched_model_equals_unpatched(make, image):
    """Outputs in eval mode, and every parameter's gradient, equal timm's own attention's."""
    model = make().eval()
    patched = copy.deepcopy(model)
    assert patch_vit(patched) == len(model.blocks)
    assert all(isinstance(block.attn, FusedAttention) for block in patched.blocks)
    x = torch.randn(2, 3, image, image)
    ref, out = model(x), patched(x)
    assert_rel_close(out, ref, 1e-5, "logits")
    ref.square().sum().backward()
    out.square().sum().backward()
    ref_grads, grads = _grads(model), _grads(patched)
    assert ref_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name], 1e-4, name)


def test_patched_model_on_the_triton_kernel():
    """timm's block call (attn_mask=None, is_causal=False) reaches the Triton kernel (the CPU
    interpreter here) and gives timm's outputs and input gradients."""
    model = small_image().eval()
    patched = copy.deepcopy(model)
    patch_vit(patched, backend="triton")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = patched(x), model(x_ref)
    assert_rel_close(out, ref, 1e-4, "logits")
    out.sum().backward()
    ref.sum().backward()
    assert_rel_close(x.grad, x_ref.grad, 1e-4, "input gradient")


def test_is_causal_is_refused():
    attention = FusedAttention(32, 2)
    x = torch.randn(1, 5, 32)
    attention(x, attn_mask=None, is_causal=False)
    with pytest.raises(ValueError, match="is_causal"):
        attention(x, is_causal=True)


def test_fused_mgit_trains_a_timm_model():
    primary = small_image()
    mgit = FusedMGiT(primary, aux_depth=1, lr=1e-3, aux_seed=0)
    assert all(isinstance(block.attn, FusedAttention) for block in mgit.primary.blocks)
    assert len(mgit.auxiliary.blocks) == 1
    before = {name: p.detach().clone() for name, p in mgit.primary.named_parameters()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        stats = mgit.training_step(x, y)
        assert torch.isfinite(stats["loss"]) and not bool(stats["skipped"])
    changed = [name for name, p in mgit.primary.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
    assert mgit(x).shape == (8, 10)


# ------------------------------------------------------------------------------------------
# IBiT on timm's ViT (patch_vit(variant="ibit"), opt-in)
# ------------------------------------------------------------------------------------------
from mgit_fast import MultiGradientAdamW  # noqa: E402
from mgit_fast.attention import IBiTMask, ibit_initial_mask  # noqa: E402


@pytest.mark.parametrize("reg_tokens, mask_rank", [(0, None), (2, 3)])
def test_ibit_on_a_timm_vit(reg_tokens, mask_rank):
    """Masks sized from timm's grid and prefix tokens (class + register tokens, rows and
    columns 1); outputs finite and changed by the mask; gradients reach every mask; the
    weights are kept; a state dict loads into a fresh patched model with equal outputs."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10,
                              reg_tokens=reg_tokens).eval()
    prefix = 1 + reg_tokens
    assert model.num_prefix_tokens == prefix
    plain = copy.deepcopy(model)
    patch_vit(plain)
    patched = copy.deepcopy(model)
    assert patch_vit(patched, variant="ibit", mask_rank=mask_rank) == 2
    for block, original in zip(patched.blocks, model.blocks):
        assert isinstance(block.attn, FusedAttention) and block.attn.variant == "ibit"
        mask = block.attn.ibit
        assert isinstance(mask, IBiTMask) and mask.num_prefix_tokens == prefix and mask.grid_size == 8
        assert mask.mask_rank == mask_rank
        assert torch.equal(block.attn.qkv.weight, original.attn.qkv.weight)
        start = mask()
        assert start.shape == (3, prefix + 64, prefix + 64)
        assert (start[:, :prefix] == 1).all() and (start[:, :, :prefix] == 1).all()
        if mask_rank is None:
            assert torch.equal(start, ibit_initial_mask(3, 8, prefix).float())
    x = torch.randn(2, 3, 32, 32)
    out = patched(x)
    assert torch.isfinite(out).all()
    assert (out - plain(x)).abs().max() > 1e-4  # the mask acts
    out.square().sum().backward()
    for name, p in patched.named_parameters():
        if ".ibit." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            # the last block reaches the head through the class token's row alone, where the
            # low-rank V gets no gradient at the start (U's prefix rows are 0); see test_models
            assert (p.grad.abs().sum() == 0) == (name == "blocks.1.attn.ibit.mask_v"), name
    # state-dict round trip into a freshly patched model
    state = patched.state_dict()
    assert sum(".ibit." in k for k in state) == (2 if mask_rank is None else 4)
    with torch.no_grad():
        for name, p in patched.named_parameters():
            if ".ibit." in name:
                p.add_(0.1 * torch.randn_like(p))
        state = copy.deepcopy(patched.state_dict())
    fresh = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10,
                              reg_tokens=reg_tokens).eval()
    patch_vit(fresh, variant="ibit", mask_rank=mask_rank)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), patched(x))
    # the optimizer never decays the masks, although timm's no_weight_decay() does not list them
    optimizer = MultiGradientAdamW(patched, None, lr=1e-3, weight_decay=0.05, backend="torch")
    decays = dict(zip((n for n, _ in optimizer.named_primary), optimizer.decay_primary))
    assert not any(flag for name, flag in decays.items() if ".ibit." in name)
    assert decays["blocks.0.attn.qkv.weight"]


def test_ibit_patching_refuses_what_it_cannot_size_and_changes_nothing():
    from test_attention_modules import TinyTimmViT  # noqa: PLC0415 - no patch_embed: no grid

    cases = [
        (timm.create_model("vit_tiny_patch16_224", img_size=(32, 16), patch_size=4, depth=1), {}, "square"),
        (timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, dynamic_img_size=True), {},
         "dynamic_img_size"),
        (TinyTimmViT(), {}, "patch_embed.grid_size"),
        (small_image(), dict(mask_rank=65), "mask_rank"),
        (small_image(), dict(mask_rank=0), "mask_rank"),
    ]
    for model, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            patch_vit(model, variant="ibit", **kwargs)
        assert not any(isinstance(m, FusedAttention) for m in model.modules()), message
    with pytest.raises(ValueError, match="^variant"):
        patch_vit(small_image(), variant="lsa")
    with pytest.raises(ValueError, match="^mask_rank"):
        patch_vit(small_image(), mask_rank=2)


def test_default_patching_adds_no_mask():
    model = small_image()
    patch_vit(model)
    assert all(block.attn.variant == "standard" and block.attn.ibit is None for block in model.blocks)
    assert not any(".ibit." in name for name, _ in model.named_parameters())


def test_ibit_timm_model_from_the_main_job_config():
    from mgit_fast.data import load_dataset
    from mgit_fast.train import TrainConfig, build_model

    data = load_dataset("digits")
    model = build_model(TrainConfig(model="timm:vit_tiny_patch16_224", attention="ibit", mask_rank=2), data)
    masks = [m for m in model.modules() if isinstance(m, IBiTMask)]
    assert len(masks) == len(model.blocks) and all(m.mask_rank == 2 and m.grid_size == 2 for m in masks)
    assert model(data.x_test[:3]).shape == (3, 10)


def test_fused_mgit_trains_an_ibit_timm_model():
    primary = small_image()
    patch_vit(primary, variant="ibit", mask_rank=4)
    mgit = FusedMGiT(primary, aux_depth=1, lr=1e-2, aux_seed=0, backend="torch")
    auxiliary_mask = mgit.auxiliary.blocks[0].attn.ibit
    assert isinstance(auxiliary_mask, IBiTMask) and auxiliary_mask.mask_rank == 4
    before = {n: p.detach().clone() for n, p in mgit.named_parameters() if ".ibit." in n}
    assert len(before) == 2 * 2 + 2  # primary: 2 blocks × (U, V); auxiliary: 1 block × (U, V)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        stats = mgit.training_step(x, y)
        assert torch.isfinite(stats["loss"]) and not bool(stats["skipped"])
    changed = [n for n, p in mgit.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
