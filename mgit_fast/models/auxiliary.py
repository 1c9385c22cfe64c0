"""The MGiT auxiliary model: the primary's architecture cut to a few blocks, freshly initialised."""
from __future__ import annotations

import copy
import itertools
from typing import Optional, Tuple

import torch
from torch import nn


def _reinitialise(model: nn.Module) -> None:
    """Every submodule's ``reset_parameters()``, then the model's own ``init_weights()`` if it
    has one (timm's leaves some modules, e.g. its conv patch embedding, alone; transformers'
    initialises every module it has a rule for)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        # transformers skips what it marked initialised (the marks survive the deep copy)
        for t in itertools.chain(model.modules(), model.parameters(), model.buffers()):
            t.__dict__.pop("_is_hf_initialized", None)
        init_weights()


def encoder_blocks(model: nn.Module) -> Tuple[str, nn.Module]:
    """(path, container) of a model's encoder blocks: ``.blocks`` (mgit_fast's ViT, timm), else
    the one ``nn.ModuleList`` named ``layers``/``layer`` holding ``config.num_hidden_layers``
    blocks (transformers' ViT, DeiT, Dinov2, ...)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return "blocks", blocks
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer") and len(m) == layers]
    if len(found) != 1:
        raise TypeError(
            "primary must be an nn.Module keeping its encoder blocks in .blocks (an nn.Sequential or nn.ModuleList) "
            f"or a transformers model with one block list of config.num_hidden_layers, got {type(model).__name__}"
        )
    return found[0]


def make_auxiliary(primary: nn.Module, depth: int = 1, *, seed: Optional[int] = None) -> nn.Module:
    """A fresh model of ``primary``'s configuration with only its first ``depth`` encoder blocks.

    Works for a model that keeps its blocks in ``.blocks`` (an ``nn.Sequential`` or
    ``nn.ModuleList``), such as ``mgit_fast.models.ViT`` or timm's ``VisionTransformer``, and for
    transformers' vision encoders (ViT, DeiT, Dinov2, ...: the block list of
    ``config.num_hidden_layers``): same patching, width, heads, attention and head;
    independently initialised; on the primary's device and dtype and in its train/eval mode.
    ``config["depth"]``, ``config.num_hidden_layers`` and ``depth`` are updated where the model
    has them. With ``seed``, initialisation draws from a private generator state seeded with it,
    so it is reproducible and the global RNG stream is left untouched.
    """
    if not isinstance(primary, nn.Module):
        raise TypeError(f"primary must be an nn.Module, got {type(primary).__name__}")
    path, blocks = encoder_blocks(primary)
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"depth must be in [1, {len(blocks)}] (the primary's blocks), got {depth}")

    # The blocks past `depth` map to None in the memo, so deepcopy does not copy them.
    skipped_blocks = {id(block): None for block in list(blocks)[depth:]}
    auxiliary = copy.deepcopy(primary, skipped_blocks)
    parent, _, name = path.rpartition(".")
    owner = auxiliary.get_submodule(parent)
    setattr(owner, name, getattr(owner, name)[:depth])
    config = getattr(auxiliary, "config", None)
    if isinstance(config, dict) and "depth" in config:
        config["depth"] = depth
    elif isinstance(getattr(config, "num_hidden_layers", None), int):
        config.num_hidden_layers = depth
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
