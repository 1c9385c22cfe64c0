"""patch_vit: swap the attention of an existing ViT (timm's or ours) for FusedAttention."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .attention import FusedAttention, IBiTMask

PATCH_VARIANTS = ("standard", "ibit")


def _is_attention(module: nn.Module) -> bool:
    """timm's ``Attention`` shape: ``qkv`` and ``proj`` Linears and ``num_heads``."""
    return (
        not isinstance(module, FusedAttention)
        and isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
    )


def _token_grid(model: nn.Module) -> Tuple[int, int]:
    """``(grid_size, num_prefix_tokens)`` of a timm-style ViT, for an IBiT mask sized from it."""
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if grid is None:
        raise ValueError(
            "model: variant='ibit' needs the token grid: a model with patch_embed.grid_size (timm's "
            f"VisionTransformer), got {type(model).__name__} without one"
        )
    if getattr(model, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_pad", False):
        raise ValueError("model: variant='ibit' needs a fixed token count; build the model with "
                         "dynamic_img_size=False and dynamic_img_pad=False")
    grid = tuple(int(g) for g in grid) if isinstance(grid, (tuple, list)) else (int(grid), int(grid))
    if len(grid) != 2 or grid[0] != grid[1]:
        raise ValueError(f"model: variant='ibit' needs a square patch grid, got patch_embed.grid_size={grid}")
    prefix = getattr(model, "num_prefix_tokens", 1)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"model: num_prefix_tokens must be an int ≥ 0, got {prefix!r}")
    return grid[0], prefix


def _fused_from(
    name: str,
    attention: nn.Module,
    backend: Optional[str],
    ibit: Optional[Tuple[int, int, Optional[int]]] = None,
) -> FusedAttention:
    dim = attention.qkv.in_features
    if attention.qkv.out_features != 3 * dim or attention.proj.in_features != dim:
        raise ValueError(f"model: {name} has a head width other than dim / num_heads, not supported")
    dropout = getattr(attention, "attn_drop", None)
    if isinstance(dropout, nn.Dropout) and dropout.p > 0:
        raise ValueError(
            f"model: {name} uses attention dropout p={dropout.p}, which the fused kernel does not "
            "implement; build the model with attn_drop_rate=0"
        )
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attention, part, nn.Identity()), nn.Identity):
            raise ValueError(f"model: {name}.{part} is not supported by FusedAttention")
    with torch.device("meta"):  # weights come from the module being replaced
        fused = FusedAttention(
            dim, attention.num_heads, qkv_bias=attention.qkv.bias is not None, scale=attention.scale, backend=backend
        )
    fused.qkv, fused.proj = attention.qkv, attention.proj
    if ibit is not None:  # a fresh mask (it has no counterpart in the replaced module), beside the weights
        grid_size, prefix, mask_rank = ibit
        weight = attention.qkv.weight
        fused.variant = "ibit"
        fused.ibit = IBiTMask(attention.num_heads, grid_size, mask_rank, prefix).to(weight.device, weight.dtype)
    if isinstance(getattr(attention, "proj_drop", None), nn.Module):
        fused.proj_drop = attention.proj_drop
    return fused.train(attention.training)


def patch_vit(
    model: nn.Module,
    *,
    backend: Optional[str] = None,
    dry_run: bool = False,
    variant: str = "standard",
    mask_rank: Optional[int] = None,
) -> int:
    """Replaces, in place and keeping the weights, every attention module of ``model`` shaped
    like timm's ``Attention`` (``qkv``/``proj`` Linears, ``num_heads``, ``scale``) with
    ``FusedAttention``; returns how many were replaced. Works on timm's
    ``VisionTransformer``; the built-in ``ViT`` already uses ``FusedAttention`` (0 replaced).
    Attention dropout, q/k normalisation and head widths other than ``dim / num_heads`` are
    refused with a ``ValueError``, before anything is replaced. ``dry_run`` checks and counts
    without replacing.

    ``variant="ibit"`` (opt-in; the default ``"standard"`` keeps the model's attention as it
    computes) gives every replaced attention a fresh IBiT mask (``IBiTMask``, full or of rank
    ``mask_rank``): ``softmax(q·kᵀ·scale) ⊙ M``, no renormalisation, sized from the model:
    ``patch_embed.grid_size`` (it must be square and fixed: no ``dynamic_img_size``) and
    ``num_prefix_tokens`` (class and register tokens, whose rows and columns start at 1). The
    masks are new parameters: build optimizers after patching, and note that timm's
    ``no_weight_decay()`` does not list them (``MultiGradientAdamW`` excludes them itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if variant not in PATCH_VARIANTS:
        raise ValueError(f"variant must be one of {PATCH_VARIANTS}, got {variant!r}")
    if mask_rank is not None and variant != "ibit":
        raise ValueError(f"mask_rank applies to variant='ibit' only, got variant={variant!r}")
    targets = [
        (parent, child_name, f"{parent_name}.{child_name}".lstrip("."), child)
        for parent_name, parent in model.named_modules()
        for child_name, child in parent.named_children()
        if _is_attention(child)
    ]
    ibit = None
    if variant == "ibit" and targets:
        grid_size, prefix = _token_grid(model)
        IBiTMask(1, grid_size, mask_rank, prefix)  # validates mask_rank before anything is replaced
        ibit = (grid_size, prefix, mask_rank)
    replacements = [_fused_from(name, child, backend, ibit) for _, _, name, child in targets]
    if dry_run:
        return len(replacements)
    for (parent, child_name, _, _), fused in zip(targets, replacements):
        setattr(parent, child_name, fused)
    return len(replacements)
