"""The MGiT auxiliary model: the primary's architecture cut to a few blocks, freshly initialised."""
from __future__ import annotations

import copy
import itertools
from typing import Optional

import torch
from torch import nn


def _reinitialise(model: nn.Module) -> None:
    """Every submodule's ``reset_parameters()``, then the model's own ``init_weights()`` if it
    has one (which may leave some modules, e.g. timm's conv patch embedding, alone)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        init_weights()


def make_auxiliary(primary: nn.Module, depth: int = 1, *, seed: Optional[int] = None) -> nn.Module:
    """A fresh model of ``primary``'s configuration with only its first ``depth`` encoder blocks.

    Works for any model that keeps its blocks in ``.blocks`` (an ``nn.Sequential`` or
    ``nn.ModuleList``), such as ``mgit_fast.models.ViT`` or timm's ``VisionTransformer``:
    same patching, width, heads, attention and head; independently initialised; on the
    primary's device and dtype and in its train/eval mode. ``config["depth"]`` and ``depth``
    are updated where the model has them. With ``seed``, initialisation draws from a private
    generator state seeded with it, so it is reproducible and the global RNG stream is
    left untouched.
    """
    blocks = getattr(primary, "blocks", None)
    if not isinstance(primary, nn.Module) or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(
            "primary must be an nn.Module keeping its encoder blocks in .blocks "
            f"(an nn.Sequential or nn.ModuleList), got {type(primary).__name__}"
        )
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"depth must be in [1, {len(blocks)}] (the primary's blocks), got {depth}")

    # The blocks past `depth` map to None in the memo, so deepcopy does not copy them.
    skipped_blocks = {id(block): None for block in list(blocks)[depth:]}
    auxiliary = copy.deepcopy(primary, skipped_blocks)
    auxiliary.blocks = auxiliary.blocks[:depth]
    if isinstance(getattr(auxiliary, "config", None), dict) and "depth" in auxiliary.config:
        auxiliary.config["depth"] = depth
    if isinstance(getattr(auxiliary, "depth", None), int):
        auxiliary.depth = depth

    if seed is None:
        _reinitialise(auxiliary)
    else:
        tensors = itertools.chain(auxiliary.parameters(), auxiliary.buffers())
        cuda_devices = sorted({t.device.index for t in tensors if t.is_cuda})
        with torch.random.fork_rng(devices=cuda_devices):
            torch.default_generator.manual_seed(seed)
            for index in cuda_devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            _reinitialise(auxiliary)
    return auxiliary.train(primary.training)
