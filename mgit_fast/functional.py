"""The fused operations, dispatched to a backend.

``backend=None`` picks ``"triton"`` for CUDA tensors and ``"torch"`` (``mgit_fast.reference``)
otherwise; the environment variable ``MGIT_FAST_BACKEND`` (``torch`` or ``triton``) overrides
that automatic choice. An explicit ``backend=`` argument always wins. ``"triton"`` on CPU
tensors runs the kernels in Triton's interpreter and needs ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _checks, reference
from .reference import GaussianMixture, MGiTLossOutput, MultiGradientStepOutput
from .reference import multi_gradient_adamw as _adamw_torch

BACKENDS = ("torch", "triton")


def resolve_backend(backend: Optional[str], device_type: str) -> str:
    """The backend a call runs on: the argument, else ``MGIT_FAST_BACKEND``, else by device."""
    if backend is None:
        backend = os.environ.get("MGIT_FAST_BACKEND") or ("triton" if device_type == "cuda" else "torch")
        source = "MGIT_FAST_BACKEND"
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def _attention_kernel():
    from .kernels import attention  # imports Triton on first use only

    return attention


def _dense(bias):
    """A ``GaussianMixture`` as its dense ``[H, N, N]`` bias (PyTorch ops, differentiable)."""
    return bias.dense() if isinstance(bias, GaussianMixture) else bias


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Union[None, float, Tensor] = None,
    bias: Union[None, Tensor, GaussianMixture] = None,
    diagonal_mask: bool = False,
    mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``(softmax(q·kᵀ·scale + bias) ⊙ mask)·v``; see ``mgit_fast.reference.attention``."""
    if resolve_backend(backend, q.device.type) == "triton":
        _checks.attention_inputs(q, k, v, scale, bias, diagonal_mask, mask)
        _checks.kernel_inputs("q", q, head_dim=q.shape[-1], head_dims=_attention_kernel().HEAD_DIMS)
        return _attention_kernel().attention(q, k, v, scale, _dense(bias), diagonal_mask, mask)
    return reference.attention(q, k, v, scale=scale, bias=bias, diagonal_mask=diagonal_mask, mask=mask)


def attention_qkvpacked(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Union[None, float, Tensor] = None,
    bias: Union[None, Tensor, GaussianMixture] = None,
    diagonal_mask: bool = False,
    mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention from a packed ``qkv [B, N, 3·H·D]`` to ``[B, N, H·D]``; see
    ``mgit_fast.reference.attention_qkvpacked``."""
    if resolve_backend(backend, qkv.device.type) == "triton":
        head_dim = _checks.qkvpacked_inputs(qkv, num_heads)
        B, N, _ = qkv.shape
        _checks.attention_options(scale, bias, diagonal_mask, B=B, H=num_heads, N=N, ref=qkv, mask=mask)
        _checks.kernel_inputs("qkv", qkv, head_dim=head_dim, head_dims=_attention_kernel().HEAD_DIMS)
        return _attention_kernel().attention_qkvpacked(qkv, num_heads, scale, _dense(bias), diagonal_mask, mask)
    return reference.attention_qkvpacked(
        qkv, num_heads, scale=scale, bias=bias, diagonal_mask=diagonal_mask, mask=mask
    )


def mgit_loss(
    logits_primary: Tensor,
    logits_auxiliary: Tensor,
    target: Tensor,
    *,
    label_smoothing: float = 0.0,
    temperature: Union[float, Tensor] = 1.0,
    js_weight: Union[float, Tensor] = 0.1,
    ignore_index: int = -100,
    backend: Optional[str] = None,
) -> MGiTLossOutput:
    """Both cross-entropies, the JS divergence and their weighted sum; see
    ``mgit_fast.reference.mgit_loss``. With ``backend="triton"`` a label outside ``[0, C)``
    does not raise here (that would synchronise): the four outputs come back NaN instead;
    ``MGiTLoss`` turns that into a ``ValueError`` at its next synchronisation point.

    ``temperature`` and ``js_weight``: floats, or 0-dim float32 tensors on the logits' device
    (not requiring grad), read by the kernels when they run, so a CUDA graph replays later
    in-place changes; a tensor's value is not validated (that would synchronise). The Triton
    path writes both logits' gradients in the forward when grad mode is on and a logit
    requires grad (the backward then only scales them), and nothing more otherwise."""
    if resolve_backend(backend, logits_primary.device.type) == "triton":
        out, _ = _mgit_loss_triton(
            logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight, ignore_index
        )
        return MGiTLossOutput(*out)
    return reference.mgit_loss(
        logits_primary, logits_auxiliary, target, label_smoothing=label_smoothing, temperature=temperature,
        js_weight=js_weight, ignore_index=ignore_index,
    )


def mgit_loss_checked(
    logits_primary: Tensor,
    logits_auxiliary: Tensor,
    target: Tensor,
    *,
    label_smoothing: float,
    temperature: Union[float, Tensor],
    js_weight: Union[float, Tensor],
    ignore_index: int,
    backend: Optional[str],
) -> Tuple[MGiTLossOutput, Optional[Tensor]]:
    """``mgit_loss`` plus, on the Triton path, a device tensor counting the invalid labels
    (None on the torch path, which raises at once; inside ``torch.compile`` the torch path
    counts them too, without raising)."""
    if resolve_backend(backend, logits_primary.device.type) == "triton":
        out, aux = _mgit_loss_triton(
            logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight, ignore_index
        )
        return MGiTLossOutput(*out), aux[1]
    invalid = None
    if torch.compiler.is_compiling():  # no host check inside a graph (labels_in_range skips it): a count
        invalid, target = _checks.invalid_labels(target, logits_primary.shape[1], ignore_index)
    out = reference.mgit_loss(
        logits_primary, logits_auxiliary, target, label_smoothing=label_smoothing, temperature=temperature,
        js_weight=js_weight, ignore_index=ignore_index,
    )
    return out, invalid


def _mgit_loss_triton(logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight,
                      ignore_index):
    """The Triton path: checks the arguments (no allocation, no synchronisation), then launches.
    Returns ((loss, ce_primary, ce_auxiliary, js), aux [4], aux[1] counting invalid labels):
    four separate tensors, so no unbind and no zeros or stack in a backward."""
    _checks.loss_inputs(
        logits_primary, logits_auxiliary, target,
        label_smoothing=label_smoothing, temperature=temperature, js_weight=js_weight,
    )
    _checks.kernel_inputs("logits_primary", logits_primary)
    from .kernels import mgit_loss as kernel  # imports Triton on first use only

    return kernel.mgit_loss(
        logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight, ignore_index
    )


def multi_gradient_adamw(*args, backend: Optional[str] = None, **kwargs) -> MultiGradientStepOutput:
    """One MGiT update of both models; the arguments of
    ``mgit_fast.reference.multi_gradient_adamw``. The Triton path copies the lists into a flat
    layout and back (``MultiGradientAdamW`` keeps one instead); it needs fp32 tensors."""
    if resolve_backend(backend, kwargs["step"].device.type) == "triton":
        for name, tensors in zip(("params_primary", "params_auxiliary"), (args[0], args[4])):
            for index, t in enumerate(tensors):
                if t.dtype != torch.float32:
                    raise TypeError(f"{name}[{index}] must be float32 for backend='triton', got {t.dtype}")
                _checks.kernel_inputs(f"{name}[{index}]", t)
        from .kernels import multi_gradient_adamw as kernel  # imports Triton on first use only

        return kernel.multi_gradient_adamw(*args, **kwargs)
    return _adamw_torch(*args, **kwargs)


__all__ = [
    "BACKENDS",
    "GaussianMixture",
    "MGiTLossOutput",
    "MultiGradientStepOutput",
    "attention",
    "attention_qkvpacked",
    "mgit_loss",
    "mgit_loss_checked",
    "multi_gradient_adamw",
    "resolve_backend",
]
