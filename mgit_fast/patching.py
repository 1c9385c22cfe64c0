"""patch_vit: swap the attention of an existing ViT (timm's or ours) for FusedAttention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import FusedAttention


def _is_attention(module: nn.Module) -> bool:
    """timm's ``Attention`` shape: ``qkv`` and ``proj`` Linears and ``num_heads``."""
    return (
        not isinstance(module, FusedAttention)
        and isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
    )


def _fused_from(name: str, attention: nn.Module, backend: Optional[str]) -> FusedAttention:
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
    if isinstance(getattr(attention, "proj_drop", None), nn.Module):
        fused.proj_drop = attention.proj_drop
    return fused.train(attention.training)


def patch_vit(model: nn.Module, *, backend: Optional[str] = None, dry_run: bool = False) -> int:
    """Replaces, in place and keeping the weights, every attention module of ``model`` shaped
    like timm's ``Attention`` (``qkv``/``proj`` Linears, ``num_heads``, ``scale``) with
    ``FusedAttention``; returns how many were replaced. Works on timm's
    ``VisionTransformer``; the built-in ``ViT`` already uses ``FusedAttention`` (0 replaced).
    Attention dropout, q/k normalisation and head widths other than ``dim / num_heads`` are
    refused with a ``ValueError``, before anything is replaced. ``dry_run`` checks and counts
    without replacing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = [
        (parent, child_name, f"{parent_name}.{child_name}".lstrip("."), child)
        for parent_name, parent in model.named_modules()
        for child_name, child in parent.named_children()
        if _is_attention(child)
    ]
    replacements = [_fused_from(name, child, backend) for _, _, name, child in targets]
    if dry_run:
        return len(replacements)
    for (parent, child_name, _, _), fused in zip(targets, replacements):
        setattr(parent, child_name, fused)
    return len(replacements)
