"""Triton kernels of mgit_fast, installed as ``mgit_fast.kernels``.

One file per fused operation (DESIGN.md §6): attention, the MGiT loss, and the multi-gradient
AdamW update. Each is reached through ``mgit_fast.functional`` with ``backend="triton"``.
"""
import contextlib

import torch


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device, not on the tensors' one: launch inside this
    context (a no-op for CPU and meta tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
