"""Multi-head self-attention over the fused attention op, with the small-data variants.

``FusedAttention`` is a drop-in for timm's ``Attention`` (same ``qkv``/``proj`` names, so
state dicts load either way) whose core is ``functional.attention_qkvpacked``: the fused
Triton kernel on CUDA, ``mgit_fast.reference`` elsewhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import _checks, functional
from .reference import gaussian_mixture_bias, patch_sq_dist

ATTENTION_VARIANTS = ("standard", "lsa", "gmm", "ibit")


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
        self.register_buffer("sq_dist", patch_sq_dist(grid_size).float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Amplitudes 1, widths 1, 2, …, ``num_kernels`` patches, in every head."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            widths = torch.arange(1, self.num_kernels + 1).to(self.log_sigma)
            self.log_sigma.copy_(widths.log().expand(self.num_heads, -1))

    def forward(self) -> Tensor:
        """The ``[H, N, N]`` bias."""
        return gaussian_mixture_bias(self.weight, self.log_sigma, self.sq_dist)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, grid_size={self.grid_size}, num_kernels={self.num_kernels}"


def ibit_widths(num_heads: int) -> Tensor:
    """IBiT's per-head Gaussian widths, in patches: head ``h`` starts at ``σ_h = h + 1``
    (1, 2, …, H), from a local head to a nearly flat one, as the GMM's kernel widths."""
    return torch.arange(1, num_heads + 1, dtype=torch.float64)


def ibit_initial_mask(num_heads: int, grid_size: int, num_prefix_tokens: int = 1) -> Tensor:
    """The IBiT mask at initialisation, ``[H, N, N]`` float64, ``N = num_prefix_tokens +
    grid_size²``: ``exp(−‖pos_i − pos_j‖² / (2σ_h²))`` between patches ``i`` and ``j`` (row-major
    grid positions, in patches; ``σ_h`` from ``ibit_widths``), 1 in the prefix tokens' rows
    and columns."""
    sigma = rearrange(ibit_widths(num_heads), "h -> h 1 1")
    patches = torch.exp(-patch_sq_dist(grid_size) / (2.0 * sigma.square()))
    return F.pad(patches, (num_prefix_tokens, 0, num_prefix_tokens, 0), value=1.0)


class IBiTMask(nn.Module):
    """IBiT's learnable multiplicative attention mask, one ``[N, N]`` map per head.

    IBiT (Utilizing Inductive Biases to Create a More Data Efficient Attention Mechanism)
    multiplies the attention map element-wise by a learned mask, ``A = softmax(s) ⊙ M``, with
    no renormalisation; ``out = A·v``. This module holds ``M`` and returns it, ``[H, N, N]``,
    ``N = num_prefix_tokens + grid_size²`` (prefix tokens, e.g. the class token, first; then
    the patches in row-major order).

    Initialisation (``ibit_initial_mask``): between patches a 2-D Gaussian of their distance,
    ``exp(−‖pos_i − pos_j‖² / (2σ_h²))`` with width ``σ_h = h + 1`` patches for head ``h``
    (1, 2, …, H); 1 in the prefix tokens' rows and columns (plain attention there). Every
    entry is learnable.

    ``mask_rank=None``: ``M`` is a full ``[H, N, N]`` parameter (``mask``).
    ``mask_rank=r``: ``M = 1 + U·Vᵀ`` with ``U, V`` ``[H, N, r]`` parameters (``mask_u``,
    ``mask_v``), initialised to the best rank-``r`` approximation (Frobenius and spectral norm)
    of the symmetric ``init − 1``: from its eigendecomposition ``Q·diag(λ)·Qᵀ`` the ``r``
    eigenpairs of largest ``|λ|``, ``U = Q_r·√|λ_r|``, ``V = Q_r·√|λ_r|·sign(λ_r)``. ``init − 1``
    is zero in the prefix rows and columns, so these start at exactly 1 (and can learn); its
    rank is at most ``grid_size²``, so ``1 ≤ r ≤ grid_size²``.
    """

    def __init__(
        self, num_heads: int, grid_size: int, mask_rank: Optional[int] = None, num_prefix_tokens: int = 1
    ) -> None:
        super().__init__()
        for name, value in (("num_heads", num_heads), ("grid_size", grid_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
            raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be ≥ 0, got {num_prefix_tokens}")
        num_patches = grid_size * grid_size
        if mask_rank is not None:
            if isinstance(mask_rank, bool) or not isinstance(mask_rank, int):
                raise TypeError(f"mask_rank must be an int or None, got {type(mask_rank).__name__}")
            if not 1 <= mask_rank <= num_patches:
                raise ValueError(
                    f"mask_rank must be in [1, grid_size² = {num_patches}] (the rank of the initial "
                    f"mask − 1), got {mask_rank}"
                )
        self.num_heads = num_heads
        self.grid_size = grid_size
        self.mask_rank = mask_rank
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_prefix_tokens + num_patches
        N = self.num_tokens
        if mask_rank is None:
            self.mask = nn.Parameter(torch.empty(num_heads, N, N))
            self.mask_u = self.mask_v = None
        else:
            self.mask = None
            self.mask_u = nn.Parameter(torch.empty(num_heads, N, mask_rank))
            self.mask_v = nn.Parameter(torch.empty(num_heads, N, mask_rank))
        self.reset_parameters()

    def initial_factors(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(U, V, discarded)`` in float64: the rank-``mask_rank`` factors of ``init − 1``
        and, per head, the eigenvalues left out (``‖init − 1 − U·Vᵀ‖_F = ‖discarded‖``)."""
        P, p0 = self.grid_size**2, self.num_prefix_tokens
        target = ibit_initial_mask(self.num_heads, self.grid_size, p0)[:, p0:, p0:] - 1.0
        eigenvalues, eigenvectors = torch.linalg.eigh(target)  # ascending; symmetric [H, P, P]
        order = eigenvalues.abs().argsort(dim=-1, descending=True)
        eigenvalues = eigenvalues.gather(-1, order)
        eigenvectors = eigenvectors.gather(-1, order.unsqueeze(-2).expand(-1, P, -1))
        kept, discarded = eigenvalues[:, : self.mask_rank], eigenvalues[:, self.mask_rank :]
        root = kept.abs().sqrt().unsqueeze(-2)
        u = eigenvectors[:, :, : self.mask_rank] * root
        v = u * kept.sign().unsqueeze(-2)
        pad = (0, 0, p0, 0)  # prefix tokens' rows of U and V: 0, so M stays 1 there
        return F.pad(u, pad), F.pad(v, pad), discarded

    def reset_parameters(self) -> None:
        """The Gaussian initialisation (full mask), or its best rank-``mask_rank`` approximation."""
        with torch.no_grad():
            if self.mask_rank is None:
                self.mask.copy_(ibit_initial_mask(self.num_heads, self.grid_size, self.num_prefix_tokens))
            else:
                u, v, _ = self.initial_factors()
                self.mask_u.copy_(u)
                self.mask_v.copy_(v)

    def forward(self) -> Tensor:
        if self.mask_rank is None:
            return self.mask
        return 1.0 + torch.einsum("hir,hjr->hij", self.mask_u, self.mask_v)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, grid_size={self.grid_size}, mask_rank={self.mask_rank}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")


class FusedAttention(nn.Module):
    """Multi-head self-attention, ``[B, N, C] → [B, N, C]``, on the fused attention op.

    ``variant``:
      - ``"standard"``: ``softmax(q·kᵀ·scale)·v``, ``scale`` (default ``head_dim**-0.5``) fixed;
      - ``"lsa"``: Locality Self-Attention (Lee et al., 2021): a learnable per-head ``scale``
        (an ``[H]`` parameter starting at ``scale``) and no token attends to itself;
      - ``"gmm"``: a learnable Gaussian-mixture bias over the patch grid (``gmm``, a
        ``GaussianMixtureBias`` of ``num_kernels`` kernels); needs ``grid_size`` (patches per
        side) and ``N = 1 + grid_size²`` tokens, the class token first;
      - ``"ibit"``: IBiT, ``(softmax(q·kᵀ·scale) ⊙ M)·v`` with a learnable multiplicative mask
        ``M`` (``ibit``, an ``IBiTMask``, full or of rank ``mask_rank``) and no
        renormalisation; needs ``grid_size`` and ``N = num_prefix_tokens + grid_size²`` tokens,
        the prefix (class) tokens first.
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
        mask_rank: Optional[int] = None,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if variant not in ATTENTION_VARIANTS:
            raise ValueError(f"variant must be one of {ATTENTION_VARIANTS}, got {variant!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}, got {num_heads!r}")
        if variant in ("gmm", "ibit") and grid_size is None:
            raise ValueError(f"grid_size (patches per side) is required for variant={variant!r}")
        if mask_rank is not None and variant != "ibit":
            raise ValueError(f"mask_rank applies to variant='ibit' only, got variant={variant!r}")
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
        self.ibit = IBiTMask(num_heads, grid_size, mask_rank, num_prefix_tokens) if variant == "ibit" else None

    def reset_parameters(self) -> None:
        """Resets the learnable LSA scale (``qkv``, ``proj``, ``gmm`` and ``ibit`` reset themselves)."""
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
        _checks.tensor("x", x, ndim=3)
        weight = self.qkv.weight
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"x must be [B, N, {weight.shape[1]}] (the module's width), got shape {tuple(x.shape)}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the module's weights are {weight.dtype} "
                            "(cast one to the other, or run under torch.autocast)")
        bias = None if attn_mask is None else _additive(attn_mask)
        if self.gmm is not None:
            bias = self.gmm() if bias is None else self.gmm() + bias
        out = functional.attention_qkvpacked(
            self.qkv(x),
            self.num_heads,
            scale=self.scale,
            bias=bias,
            diagonal_mask=self.diagonal_mask,
            mask=self.ibit() if self.ibit is not None else None,
            backend=self.backend,
        )
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, variant={self.variant!r}"


def _additive(attn_mask: Tensor) -> Tensor:
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask if attn_mask.dim() != 2 else attn_mask.unsqueeze(0)


__all__ = [
    "ATTENTION_VARIANTS",
    "FusedAttention",
    "GaussianMixtureBias",
    "IBiTMask",
    "ibit_initial_mask",
    "ibit_widths",
]
