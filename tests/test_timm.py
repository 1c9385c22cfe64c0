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
