"""mgit_fast: fused Triton kernels for Multi-Gradient Image Transformer (MGiT) training.

``FusedMGiT`` trains a primary ViT beside a compact auxiliary (DESIGN.md §1); its pieces are
``FusedAttention``, ``MGiTLoss`` and ``MultiGradientAdamW``, each over ``mgit_fast.functional``
(Triton on CUDA, the plain-PyTorch ``mgit_fast.reference`` elsewhere).
"""
from . import functional, reference
from .attention import FusedAttention
from .loss import MGiTLoss
from .mgit import FusedMGiT
from .models import ViT, make_auxiliary
from .optim import MultiGradientAdamW
from .patching import patch_vit
from .reference import MGiTLossOutput

__version__ = "0.1.0"

__all__ = [
    "FusedAttention",
    "FusedMGiT",
    "MGiTLoss",
    "MGiTLossOutput",
    "MultiGradientAdamW",
    "ViT",
    "functional",
    "make_auxiliary",
    "patch_vit",
    "reference",
]
