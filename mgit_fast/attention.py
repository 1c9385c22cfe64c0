"""Multi-head self-attention over the fused attention op, with the small-data variants.

``FusedAttention`` is a drop-in for timm's ``Attention`` (same ``qkv``/``proj`` names, so
state dicts load either way) whose core is ``functional.attention_qkvpacked``: the fused
Triton kernel on CUDA, ``mgit_fast.reference`` elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import functional

ATTENTION_VARIANTS = ("standard", "lsa", "gmm")


class GaussianMixtureBias(nn.Module):
    """A learnable Gaussian-mixture attention bias over a square patch grid.

    ``bias[h, i, j] = Σ_k weight[h, k] · exp(−‖pos_i − pos_j‖² / (2·σ[h, k]²))``,
    ``σ = exp(log_sigma)``, in patch units, for the ``grid_size²`` patch tokens; the class
    token (token 0) gets bias 0 in its row and column. Output ``[H, N, N]``,
    ``N = 1 + grid_size²``. Kernel ``k`` starts at amplitude 1 and width ``k + 1`` patches.
    """

    def __init__(self, num_heads: int, grid_size: int, num_kernels: int = 2) -> None:
        super().__init__()
        for name, value in (("num_heads", num_heads), ("grid_size", grid_size), ("num_kernels", num_kernels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_heads = num_heads
        self.grid_size = grid_size
        self.num_kernels = num_kernels
        self.weight = nn.Parameter(torch.empty(num_heads, num_kernels))
        self.log_sigma = nn.Parameter(torch.empty(num_heads, num_kernels))
        rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
        sq_dist = (positions[:, None] - positions[None, :]).square().sum(dim=-1)
        self.register_buffer("sq_dist", sq_dist, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Amplitudes 1, widths 1, 2, …, ``num_kernels`` patches, in every head."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            widths = torch.arange(1, self.num_kernels + 1).to(self.log_sigma)
            self.log_sigma.copy_(widths.log().expand(self.num_heads, -1))

    def forward(self) -> Tensor:
        inv_two_var = rearrange(0.5 * torch.exp(-2.0 * self.log_sigma), "h k -> h k 1 1")
        kernels = torch.exp(-self.sq_dist * inv_two_var)
        patch_bias = torch.einsum("hk,hkij->hij", self.weight, kernels)
        return F.pad(patch_bias, (1, 0, 1, 0))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, grid_size={self.grid_size}, num_kernels={self.num_kernels}"


class FusedAttention(nn.Module):
    """Multi-head self-attention, ``[B, N, C] → [B, N, C]``, on the fused attention op.

    ``variant``:
      - ``"standard"``: ``softmax(q·kᵀ·scale)·v``, ``scale`` (default ``head_dim**-0.5``) fixed;
      - ``"lsa"``: Locality Self-Attention (Lee et al., 2021): a learnable per-head ``scale``
        (an ``[H]`` parameter starting at ``scale``) and no token attends to itself;
      - ``"gmm"``: a learnable Gaussian-mixture bias over the patch grid (``gmm``, a
        ``GaussianMixtureBias`` of ``num_kernels`` kernels); needs ``grid_size`` (patches per
        side) and ``N = 1 + grid_size²`` tokens, the class token first.
    ``backend``: ``None`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        scale: Optional[float] = None,
        variant: str = "standard",
        grid_size: Optional[int] = None,
        num_kernels: int = 2,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if variant not in ATTENTION_VARIANTS:
            raise ValueError(f"variant must be one of {ATTENTION_VARIANTS}, got {variant!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}, got {num_heads!r}")
        if variant == "gmm" and grid_size is None:
            raise ValueError("grid_size (patches per side) is required for variant='gmm'")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.variant = variant
        self.diagonal_mask = variant == "lsa"
        self.backend = backend
        self.initial_scale = float(scale) if scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if variant == "lsa":
            self.scale = nn.Parameter(torch.full((num_heads,), self.initial_scale))
        else:
            self.scale = self.initial_scale
        self.gmm = GaussianMixtureBias(num_heads, grid_size, num_kernels) if variant == "gmm" else None

    def reset_parameters(self) -> None:
        """Resets the learnable LSA scale (``qkv``, ``proj`` and ``gmm`` reset themselves)."""
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.fill_(self.initial_scale)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """``x [B, N, C]``; ``attn_mask`` (timm's block argument): boolean (True = attend) or
        additive, broadcastable to ``[B, H, N, N]`` as ``[N, N]``, ``[H|1, N, N]`` or
        ``[B|1, H|1, N, N]``; it is added to the bias. ``is_causal`` (timm passes it) must be
        False: ViT attention is bidirectional."""
        if is_causal:
            raise ValueError("is_causal=True is not supported: FusedAttention is bidirectional ViT attention")
        bias = self.gmm() if self.gmm is not None else None
        if attn_mask is not None:
            mask = _additive(attn_mask)
            bias = mask if bias is None else bias + mask
        out = functional.attention_qkvpacked(
            self.qkv(x),
            self.num_heads,
            scale=self.scale,
            bias=bias,
            diagonal_mask=self.diagonal_mask,
            backend=self.backend,
        )
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, variant={self.variant!r}"


def _additive(attn_mask: Tensor) -> Tensor:
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask if attn_mask.dim() != 2 else attn_mask.unsqueeze(0)


__all__ = ["ATTENTION_VARIANTS", "FusedAttention", "GaussianMixtureBias"]
