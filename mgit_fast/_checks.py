"""Argument checks shared by every backend.

Each check raises a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
value or device) whose message starts with the argument's name, before any work is done.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def tensor(name: str, value, *, ndim: Optional[int] = None, dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def same_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def same_dtype(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}")


def attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Union[None, float, Tensor],
    bias: Optional[Tensor],
    diagonal_mask: bool,
    mask: Optional[Tensor] = None,
) -> None:
    """Checks the ``attention`` contract: q, k, v ``[B, H, N, D]`` alike; scale; bias; the
    diagonal mask; the multiplicative mask."""
    tensor("q", q, ndim=4)
    for name, t in (("k", k), ("v", v)):
        tensor(name, t, ndim=4)
        same_dtype(name, t, "q", q)
        same_device(name, t, "q", q)
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}")
    B, H, N, D = q.shape
    if N < 1 or D < 1:
        raise ValueError(f"q must have at least one token and one channel, got shape {tuple(q.shape)}")
    attention_options(scale, bias, diagonal_mask, B=B, H=H, N=N, ref=q, mask=mask)


def _score_map(name: str, value: Tensor, *, B: int, H: int, N: int, ref: Tensor) -> None:
    """An ``[H, N, N]`` or ``[B, H, N, N]`` map over the scores (1 broadcasts for B and H)."""
    tensor(name, value, dtypes=FLOAT_DTYPES)
    same_device(name, value, "q", ref)
    if value.dim() == 3:
        ok = value.shape[0] in (1, H) and value.shape[1:] == (N, N)
    elif value.dim() == 4:
        ok = value.shape[0] in (1, B) and value.shape[1] in (1, H) and value.shape[2:] == (N, N)
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must have shape [H={H}, N={N}, N={N}] or [B={B}, H={H}, N={N}, N={N}] "
            f"(1 allowed for B and H), got {tuple(value.shape)}"
        )


def _gaussian_mixture(bias, *, H: int, N: int, ref: Tensor) -> None:
    """A ``GaussianMixture`` bias: ``weight`` and ``log_sigma`` ``[H, K]`` alike; ``N = 1 + grid_size²``."""
    grid = bias.grid_size
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"bias.grid_size must be a positive int, got {grid!r}")
    if N != 1 + grid * grid:
        raise ValueError(f"bias.grid_size={grid} needs N = 1 + grid_size² = {1 + grid * grid} tokens, got N={N}")
    for name in ("weight", "log_sigma"):
        value = tensor(f"bias.{name}", getattr(bias, name), ndim=2, dtypes=FLOAT_DTYPES)
        same_device(f"bias.{name}", value, "q", ref)
        if value.shape[0] != H or value.shape != bias.weight.shape:
            raise ValueError(f"bias.{name} must have shape [H={H}, K] as bias.weight, got {tuple(value.shape)}")
    if bias.sq_dist is not None:
        P = grid * grid
        tensor("bias.sq_dist", bias.sq_dist, ndim=2, dtypes=FLOAT_DTYPES)
        same_device("bias.sq_dist", bias.sq_dist, "q", ref)
        if bias.sq_dist.shape != (P, P):
            raise ValueError(f"bias.sq_dist must have shape [grid_size²={P}, {P}], got {tuple(bias.sq_dist.shape)}")


def attention_options(
    scale, bias, diagonal_mask, *, B: int, H: int, N: int, ref: Tensor, mask: Optional[Tensor] = None
) -> None:
    if isinstance(scale, bool) or not (scale is None or isinstance(scale, (int, float, Tensor))):
        raise TypeError(f"scale must be None, a float or a tensor, got {type(scale).__name__}")
    if isinstance(scale, Tensor):
        tensor("scale", scale, dtypes=FLOAT_DTYPES)
        same_device("scale", scale, "q", ref)
        if scale.shape not in (torch.Size([]), torch.Size([H])):
            raise ValueError(f"scale must have shape [] or [H={H}], got {tuple(scale.shape)}")
    from .reference import GaussianMixture

    if isinstance(bias, GaussianMixture):
        _gaussian_mixture(bias, H=H, N=N, ref=ref)
    elif bias is not None:
        _score_map("bias", bias, B=B, H=H, N=N, ref=ref)
    if mask is not None:
        _score_map("mask", mask, B=B, H=H, N=N, ref=ref)
    if not isinstance(diagonal_mask, bool):
        raise TypeError(f"diagonal_mask must be a bool, got {type(diagonal_mask).__name__}")
    if diagonal_mask and N < 2:
        raise ValueError("diagonal_mask=True needs at least 2 tokens: a lone token has nothing to attend to")


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_inputs(name: str, value: Tensor, *, head_dim: Optional[int] = None, head_dims=None) -> None:
    """What the Triton kernels take beyond the shared contract: fp32/fp16/bf16 tensors on a
    CUDA device (or anywhere under ``TRITON_INTERPRET=1``) and, for attention, a supported
    head dim."""
    if value.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for backend='triton', got {value.dtype}")
    if value.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{name} is on {value.device}: backend='triton' needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run the kernels on the CPU)"
        )
    if head_dims is not None and head_dim not in head_dims:
        raise ValueError(f"{name} has head dim {head_dim}; the Triton kernel supports {head_dims}")


def qkvpacked_inputs(qkv: Tensor, num_heads: int) -> int:
    """Checks ``qkv [B, N, 3·H·D]``; returns the head dim D."""
    tensor("qkv", qkv, ndim=3)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    width = qkv.shape[-1]
    if width % (3 * num_heads) != 0:
        raise ValueError(f"qkv's last dimension ({width}) must be 3 * num_heads ({num_heads}) * head_dim")
    return width // (3 * num_heads)


def loss_inputs(
    logits_primary: Tensor,
    logits_auxiliary: Tensor,
    target: Tensor,
    *,
    label_smoothing: float,
    temperature: Union[float, Tensor],
    js_weight: Union[float, Tensor],
) -> None:
    tensor("logits_primary", logits_primary, ndim=2)
    tensor("logits_auxiliary", logits_auxiliary, ndim=2)
    same_dtype("logits_auxiliary", logits_auxiliary, "logits_primary", logits_primary)
    same_device("logits_auxiliary", logits_auxiliary, "logits_primary", logits_primary)
    if logits_auxiliary.shape != logits_primary.shape:
        raise ValueError(
            f"logits_auxiliary has shape {tuple(logits_auxiliary.shape)} "
            f"but logits_primary has {tuple(logits_primary.shape)}"
        )
    B, C = logits_primary.shape
    if C < 2:
        raise ValueError(f"logits_primary must have at least 2 classes, got {C}")
    tensor("target", target, ndim=1, dtypes=LABEL_DTYPES)
    same_device("target", target, "logits_primary", logits_primary)
    if target.shape[0] != B:
        raise ValueError(f"target has {target.shape[0]} rows but the logits have {B}")
    number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    loss_scalar("temperature", temperature, ref=logits_primary)
    loss_scalar("js_weight", js_weight, ref=logits_primary)


def loss_scalar(name: str, value, *, ref: Optional[Tensor] = None) -> Union[float, Tensor]:
    """temperature (> 0) or js_weight: a finite number, or a 0-dim float32 tensor (on ref's
    device, not requiring grad) whose value is left unchecked, since reading it would
    synchronise with the device."""
    if isinstance(value, Tensor):
        if value.dtype != torch.float32:
            raise TypeError(f"{name} as a tensor must be float32, got {value.dtype}")
        if value.dim() != 0:
            raise ValueError(f"{name} as a tensor must be 0-dim, got shape {tuple(value.shape)}")
        if ref is not None:
            same_device(name, value, "logits_primary", ref)
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad: the loss treats it as a constant")
        return value
    if name == "temperature":
        return number(name, value, low=0.0, low_open=True)
    return number(name, value)


def number(name: str, value, *, low=None, high=None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def labels_in_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Host-side label check (synchronises on CUDA; the reference path only). Inside
    ``torch.compile`` it checks nothing (it would break the graph): ``invalid_labels`` counts them
    there, for the caller to check outside the compiled region."""
    if torch.compiler.is_compiling():
        return
    valid = (target == ignore_index) | ((target >= 0) & (target < num_classes))
    if not bool(valid.all()):
        bad = target[~valid][0].item()
        raise ValueError(
            f"target holds label {bad}, outside [0, {num_classes}) and not ignore_index={ignore_index}"
        )


def invalid_labels(target: Tensor, num_classes: int, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """(the number of labels outside ``[0, num_classes)`` that are not ``ignore_index``, as a
    0-dim device tensor; ``target`` with those labels set to ``ignore_index``, so nothing indexes
    outside the logits before whoever reads the count refuses the batch). No synchronisation."""
    valid = (target == ignore_index) | ((target >= 0) & (target < num_classes))
    return (~valid).sum(), torch.where(valid, target, ignore_index)
