"""A Vision Transformer for small images, on ``FusedAttention``.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2``, ``norm``,
``head``), so state dicts move between the two for the standard, conv-patched model.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..attention import ATTENTION_VARIANTS, FusedAttention, GaussianMixtureBias, IBiTMask

LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm epsilon


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a residual branch for a random ``drop_prob``
    fraction of the samples and scales the kept ones by ``1 / (1 − drop_prob)``; the identity
    in eval mode or when ``drop_prob == 0``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob!r}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob if keep_prob > 0.0 else x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, ``dim → hidden_dim → dim``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x)))``, then
    ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attention: str = "standard",
        grid_size: Optional[int] = None,
        backend: Optional[str] = None,
        mask_rank: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = FusedAttention(
            dim, num_heads, qkv_bias, variant=attention, grid_size=grid_size, backend=backend, mask_rank=mask_rank
        )
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a strided convolution: ``[B, C, H, W] → [B, N, D]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


def shift_image(x: Tensor, dy: int, dx: int) -> Tensor:
    """``x`` moved ``dy`` pixels down and ``dx`` right (negative: up/left), zero-filled:
    ``out[..., i, j] = x[..., i − dy, j − dx]`` where that index exists, else 0."""
    return F.pad(x, (dx, -dx, dy, -dy))


def shifted_images(x: Tensor, shift: int) -> Tensor:
    """``[B, C, H, W] → [B, 5·C, H, W]``: the image, then its shifts by ``shift`` pixels
    up-left, up-right, down-left and down-right, concatenated on channels."""
    diagonals = [(-shift, -shift), (-shift, shift), (shift, -shift), (shift, shift)]
    return torch.cat([x] + [shift_image(x, dy, dx) for dy, dx in diagonals], dim=1)


class ShiftedPatchEmbed(nn.Module):
    """Shifted Patch Tokenization (Lee et al., 2021): the image and its four diagonal
    half-patch shifts, split into patches, flattened, LayerNorm-ed and projected to D."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = 5 * in_chans * patch_size * patch_size
        self.norm = nn.LayerNorm(patch_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(patch_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        stacked = shifted_images(x, self.patch_size // 2)
        p = self.patch_size
        patches = rearrange(stacked, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        return self.proj(self.norm(patches))


class ViT(nn.Module):
    """Vision Transformer with a class token, learned position embeddings and pre-norm blocks.

    Defaults are a small-data ViT for 32×32 images (Lee et al.'s CIFAR setting). ``attention``
    picks the attention variant of every block (``"standard"``, ``"lsa"``, ``"gmm"``, ``"ibit"``;
    see ``FusedAttention``), ``mask_rank`` the rank of IBiT's mask (None: a full ``[N, N]`` mask
    per head; ``IBiTMask``), ``spt`` the Shifted Patch Tokenization, ``drop_path`` the
    stochastic depth of the last block (rising linearly from 0 at the first).
    ``ViT(**model.config)`` rebuilds a model of the same shape.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 192,
        depth: int = 9,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
        attention: str = "standard",
        spt: bool = False,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
        mask_rank: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.config: Dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            attention=attention,
            spt=spt,
            drop_path=drop_path,
            qkv_bias=qkv_bias,
            backend=backend,
            mask_rank=mask_rank,
        )
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth"):
            _positive_int(name, self.config[name])
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        if mask_rank is not None and attention != "ibit":
            raise ValueError(f"mask_rank applies to attention='ibit' only, got attention={attention!r}")
        if not 0.0 <= drop_path <= 1.0:
            raise ValueError(f"drop_path must be in [0, 1], got {drop_path!r}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads

        grid_size = img_size // patch_size
        embed = ShiftedPatchEmbed if spt else PatchEmbed
        self.patch_embed = embed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid_size * grid_size, embed_dim))
        drop_rates = torch.linspace(0.0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, attention, grid_size, backend, mask_rank)
                for rate in drop_rates
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re-)initialises every parameter: truncated normal (std 0.02) for the Linear and
        patch-embedding weights, ``pos_embed`` and ``cls_token``; zero biases; LayerNorm to
        the identity; the LSA scales, GMM masks and IBiT masks to their starting values."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (FusedAttention, GaussianMixtureBias, IBiTMask)):
                module.reset_parameters()

    def no_weight_decay(self) -> Set[str]:
        """Names of ≥2-dim parameters that take no weight decay: the embeddings and the GMM
        and IBiT mask parameters."""
        names = {"pos_embed", "cls_token"}
        for module_name, module in self.named_modules():
            if isinstance(module, (GaussianMixtureBias, IBiTMask)):
                names.update(f"{module_name}.{name}" for name, _ in module.named_parameters())
        return names

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, in_chans, img_size, img_size]`` → normalised tokens ``[B, N, D]``,
        the class token first."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        dtype = self.cls_token.dtype
        if x.dtype != dtype and (x.dtype == torch.float64 or not x.is_floating_point()
                                 or not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x must have the model's dtype {dtype} (or a lower precision under autocast), "
                            f"got {x.dtype}")
        tokens = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls_tokens, tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))

    def forward_head(self, x: Tensor) -> Tensor:
        """Tokens ``[B, N, D]`` → logits ``[B, num_classes]`` from the class token."""
        return self.head(x[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


__all__ = [
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "ShiftedPatchEmbed",
    "ViT",
    "shift_image",
    "shifted_images",
]
