"""Models for MGiT: a small-data ViT on the fused attention, and the auxiliary-model factory."""
from .auxiliary import make_auxiliary
from .vit import Block, DropPath, Mlp, ViT

__all__ = ["Block", "DropPath", "Mlp", "ViT", "make_auxiliary"]
