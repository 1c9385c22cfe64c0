"""The attention op: the entry points, their autograd, and the custom ops torch.compile sees.

In eager mode a `torch.autograd.Function` launches the kernels directly (the custom-op dispatch
cost about 0.5 ms of host time per call on the first GPU run); under `torch.compile` the same
work runs as the custom ops `mgit_fast::attention_*`, which have fake kernels and autograd
registrations, so a compiled graph holds them without a break. Either way the inputs are first
brought to what the kernels read (`_canonical`): q, k, v with one set of strides and unit
stride on D, a scale tensor contiguous, bias and mask with contiguous [N, N] slices.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import common
from .backward import backward_into
from .forward import forward_into
from .gmm import gaussian_mixture_bias
from .planning import plan
from .shared import shared_grad


def heads(t: Tensor, num_heads: int, parts: int):
    """[B, N, parts·H·D] → `parts` [B, H, N, D] views sharing one set of strides."""
    B, N, width = t.shape
    return t.view(B, N, parts, num_heads, width // (parts * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _map(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or (t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]):
        return t
    return t.contiguous()


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """`t` with `ref`'s strides (both contiguous-compatible layouts of one shape)."""
    return t if t.stride() == ref.stride() else t.contiguous()


def _shared(t: Tensor) -> bool:
    """Whether a [H, N, N] / [B, H, N, N] score map is shared over the batch or heads."""
    return t.dim() == 3 or t.shape[0] == 1 or t.shape[1] == 1


def forward(q, k, v, out, scale, scale_value, bias, mask, diagonal_mask) -> Tensor:
    B, H, N, D = q.shape
    lse = common.new_buffer((B, H, N), device=q.device, dtype=torch.float32)
    forward_into(q, k, v, out, lse, plan(q.shape, q.dtype, q.device, mask=mask is not None), scale, scale_value,
                 _map(bias), _map(mask), diagonal_mask)
    return lse


def backward(dout, q, k, v, out, lse, dq, dk, dv, scale, scale_value, bias, mask, diagonal_mask,
              need_dscale: bool, need_dbias: bool, need_dmask: bool, gmm=None):
    """Writes dq, dk, dv; returns (dscale, dbias, dmask), each when asked. With `gmm` (the bias is
    that Gaussian mixture) dbias is [2, H, K]: the gradients of its weight and log_sigma."""
    B, H, N, D = q.shape
    bias, mask = _map(bias), _map(mask)
    per_batch_dbias = need_dbias and gmm is None and not _shared(bias)
    per_batch_dmask = need_dmask and not _shared(mask)
    p = plan(q.shape, q.dtype, q.device, mask=mask is not None, stores_map_grad=per_batch_dbias or per_batch_dmask)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = common.new_buffer((B, H, N), **f32)
    dscale_rows = common.new_buffer((B, H, N), **f32) if need_dscale else None
    dbias = common.new_buffer(bias.shape, **f32) if per_batch_dbias else None
    dmask = common.new_buffer(mask.shape, **f32) if per_batch_dmask else None
    backward_into(dout, q, k, v, out, lse, dq, dk, dv, delta, p, scale, scale_value, bias, mask, diagonal_mask,
                  dscale_rows, dbias, dmask)
    dscale = None
    if need_dscale:  # the row sums, summed in a fixed order
        dscale = dscale_rows.sum(dim=(0, 2)) if scale.dim() == 1 else dscale_rows.sum()
        dscale = dscale.to(scale.dtype)
    shared = (dout, q, k, v, out, lse, delta, p, scale, scale_value, bias, mask, diagonal_mask)
    if need_dbias:
        dbias = shared_grad(bias, *shared, False, gmm) if dbias is None else dbias.to(bias.dtype)
    if need_dmask:
        dmask = shared_grad(mask, *shared, True) if dmask is None else dmask.to(mask.dtype)
    return dscale, dbias, dmask


# --------------------------------------------------------------------------------------------
# eager: autograd.Function, launching directly
# --------------------------------------------------------------------------------------------
class _Attention(torch.autograd.Function):
    """Inputs: q, k, v ([B, H, N, D], one set of strides) or qkv ([B, N, 3·H·D]; `num_heads` > 0)."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads, scale, scale_value, bias, mask, diagonal_mask, gmm_weight, gmm_log_sigma,
                grid_size):
        packed = num_heads > 0
        if packed:
            qkv = q
            B, N, width = qkv.shape
            out = common.new_buffer((B, N, width // 3), device=qkv.device, dtype=qkv.dtype)
            q, k, v = heads(qkv, num_heads, 3)
            (out_h,) = heads(out, num_heads, 1)
        else:
            out = out_h = common.new_buffer(q.shape, device=q.device, dtype=q.dtype)
        if gmm_weight is not None:
            bias = gaussian_mixture_bias(gmm_weight.detach(), gmm_log_sigma.detach(), grid_size)
        lse = forward(q, k, v, out_h, scale, scale_value, bias, mask, diagonal_mask)
        ctx.save_for_backward(qkv if packed else None, q, k, v, out, lse, scale, bias, mask, gmm_weight,
                              gmm_log_sigma)
        ctx.num_heads, ctx.scale_value, ctx.diagonal_mask, ctx.grid_size = num_heads, scale_value, diagonal_mask, grid_size
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, q, k, v, out, lse, scale, bias, mask, gmm_weight, gmm_log_sigma = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dbias = (need[9] or need[10]) if gmm_weight is not None else (bias is not None and need[6])
        need_dscale, need_dmask = scale is not None and need[4], mask is not None and need[7]
        H = ctx.num_heads
        if H:
            dqkv = common.new_buffer(qkv.shape, device=qkv.device, dtype=qkv.dtype)
            dq, dk, dv = heads(dqkv, H, 3)
            (out_h,) = heads(out, H, 1)
            (dout_h,) = heads(_like(dout, out), H, 1)
        else:
            dq, dk, dv = (common.new_buffer(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
            out_h, dout_h = out, _like(dout, out)
        gmm = None if gmm_weight is None else (gmm_weight, gmm_log_sigma, ctx.grid_size)
        dscale, dbias, dmask = backward(dout_h, q, k, v, out_h, lse, dq, dk, dv, scale, ctx.scale_value, bias, mask,
                                         ctx.diagonal_mask, need_dscale, need_dbias, need_dmask, gmm)
        dweight = dlog_sigma = None
        if gmm is not None and need_dbias:
            dweight, dlog_sigma, dbias = dbias[0].to(gmm_weight.dtype), dbias[1].to(gmm_log_sigma.dtype), None
        grads = (dqkv, None, None) if H else (dq, dk, dv)
        return (*grads, None, dscale, None, dbias, dmask, None, dweight, dlog_sigma, None)


# --------------------------------------------------------------------------------------------
# torch.compile: custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("mgit_fast::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor],
    diagonal_mask: bool, mask: Optional[Tensor] = None, gmm_weight: Optional[Tensor] = None,
    gmm_log_sigma: Optional[Tensor] = None, grid_size: int = 0,
) -> Tuple[Tensor, Tensor]:
    # gmm_*: the Gaussian mixture `bias` was built from, for the backward (its gradients go there)
    out = common.new_buffer(q.shape, device=q.device, dtype=q.dtype)
    q, k, v = _qkv(q, k, v)
    return out, forward(q, k, v, out, scale, scale_value, bias, mask, diagonal_mask)


@attention_fwd.register_fake
def _(q, k, v, scale, scale_value, bias, diagonal_mask, mask=None, gmm_weight=None, gmm_log_sigma=None, grid_size=0):
    B, H, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("mgit_fast::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: Optional[Tensor],
    scale_value: float, bias: Optional[Tensor], diagonal_mask: bool, need_dscale: bool, need_dbias: bool,
    mask: Optional[Tensor] = None, need_dmask: bool = False, gmm_weight: Optional[Tensor] = None,
    gmm_log_sigma: Optional[Tensor] = None, grid_size: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = (common.new_buffer(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    q, k, v = _qkv(q, k, v)
    grads = backward(_like(dout, out), q, k, v, out, lse, dq, dk, dv, scale, scale_value, bias, mask, diagonal_mask,
                      need_dscale, need_dbias, need_dmask, _gmm(gmm_weight, gmm_log_sigma, grid_size))
    return (dq, dk, dv, *(_or_empty(g, q) for g in grads))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias, mask=None,
      need_dmask=False, gmm_weight=None, gmm_log_sigma=None, grid_size=0):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    return (*grads, _fake_grad(scale, need_dscale, q), _fake_dbias(bias, need_dbias, gmm_weight, q),
            _fake_grad(mask, need_dmask, q))


@torch.library.custom_op("mgit_fast::attention_qkvpacked_fwd", mutates_args=())
def attention_qkvpacked_fwd(
    qkv: Tensor, num_heads: int, scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor],
    diagonal_mask: bool, mask: Optional[Tensor] = None, gmm_weight: Optional[Tensor] = None,
    gmm_log_sigma: Optional[Tensor] = None, grid_size: int = 0,
) -> Tuple[Tensor, Tensor]:
    B, N, width = qkv.shape
    out = common.new_buffer((B, N, width // 3), device=qkv.device, dtype=qkv.dtype)
    (out_h,) = heads(out, num_heads, 1)
    return out, forward(*heads(qkv, num_heads, 3), out_h, scale, scale_value, bias, mask, diagonal_mask)


@attention_qkvpacked_fwd.register_fake
def _(qkv, num_heads, scale, scale_value, bias, diagonal_mask, mask=None, gmm_weight=None, gmm_log_sigma=None,
      grid_size=0):
    B, N, width = qkv.shape
    return qkv.new_empty((B, N, width // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("mgit_fast::attention_qkvpacked_bwd", mutates_args=())
def attention_qkvpacked_bwd(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: Optional[Tensor],
    scale_value: float, bias: Optional[Tensor], diagonal_mask: bool, need_dscale: bool, need_dbias: bool,
    mask: Optional[Tensor] = None, need_dmask: bool = False, gmm_weight: Optional[Tensor] = None,
    gmm_log_sigma: Optional[Tensor] = None, grid_size: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dqkv = common.new_buffer(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    (dout_h,) = heads(_like(dout, out), num_heads, 1)
    (out_h,) = heads(out, num_heads, 1)
    grads = backward(dout_h, *heads(qkv, num_heads, 3), out_h, lse, *heads(dqkv, num_heads, 3), scale, scale_value,
                      bias, mask, diagonal_mask, need_dscale, need_dbias, need_dmask,
                      _gmm(gmm_weight, gmm_log_sigma, grid_size))
    return (dqkv, *(_or_empty(g, qkv) for g in grads))


@attention_qkvpacked_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias, mask=None,
      need_dmask=False, gmm_weight=None, gmm_log_sigma=None, grid_size=0):
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format), _fake_grad(scale, need_dscale, qkv),
            _fake_dbias(bias, need_dbias, gmm_weight, qkv), _fake_grad(mask, need_dmask, qkv))


@torch.library.custom_op("mgit_fast::gaussian_mixture_bias", mutates_args=())
def gaussian_mixture_bias_op(weight: Tensor, log_sigma: Tensor, grid_size: int) -> Tensor:
    return gaussian_mixture_bias(weight, log_sigma, grid_size)


@gaussian_mixture_bias_op.register_fake
def _(weight, log_sigma, grid_size):
    N = 1 + grid_size * grid_size
    return weight.new_empty((weight.shape[0], N, N), dtype=torch.float32)


def _qkv(q, k, v):
    """q, k, v with one set of strides, unit stride on D (copies only when they differ)."""
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _gmm(weight, log_sigma, grid_size):
    return None if weight is None else (weight, log_sigma, grid_size)


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return grad if grad is not None else like.new_empty(0)


def _fake_grad(param: Optional[Tensor], needed: bool, like: Tensor) -> Tensor:
    return torch.empty_like(param) if (needed and param is not None) else like.new_empty(0)


def _fake_dbias(bias: Optional[Tensor], needed: bool, gmm_weight: Optional[Tensor], like: Tensor) -> Tensor:
    if needed and gmm_weight is not None:
        return gmm_weight.new_empty((2, *gmm_weight.shape), dtype=torch.float32)
    return _fake_grad(bias, needed, like)


def _setup(ctx, inputs, output):
    packed = isinstance(inputs[1], int)
    if packed:
        qkv, num_heads, scale, scale_value, bias, diagonal_mask, mask, gmm_weight, gmm_log_sigma, grid_size = inputs
        tensors = (qkv,)
    else:
        q, k, v, scale, scale_value, bias, diagonal_mask, mask, gmm_weight, gmm_log_sigma, grid_size = inputs
        tensors, num_heads = (q, k, v), 0
    ctx.save_for_backward(*tensors, *output, scale, bias, mask, gmm_weight, gmm_log_sigma)
    ctx.num_heads, ctx.scale_value, ctx.diagonal_mask, ctx.grid_size = num_heads, scale_value, diagonal_mask, grid_size
    ctx.set_materialize_grads(False)  # no zeros for lse's gradient (never used)


def _op_backward(ctx, dout, _dlse):
    *tensors, out, lse, scale, bias, mask, gmm_weight, gmm_log_sigma = ctx.saved_tensors
    first = 2 if ctx.num_heads else 3  # index of `scale` among the op's inputs
    need = ctx.needs_input_grad
    need_dscale = scale is not None and need[first]
    need_dbias = (need[first + 5] or need[first + 6]) if gmm_weight is not None else (
        bias is not None and need[first + 2])
    need_dmask = mask is not None and need[first + 4]
    dout = torch.zeros_like(out) if dout is None else dout
    options = (scale, ctx.scale_value, bias, ctx.diagonal_mask, need_dscale, need_dbias, mask, need_dmask,
               gmm_weight, gmm_log_sigma, ctx.grid_size)
    if ctx.num_heads:
        grads, dscale, dbias, dmask = attention_qkvpacked_bwd(dout, *tensors, out, lse, ctx.num_heads, *options)
        grads = (grads, None)
    else:
        *grads, dscale, dbias, dmask = attention_bwd(dout, *tensors, out, lse, *options)
    dweight = dlog_sigma = None
    if gmm_weight is not None and need_dbias:
        dweight, dlog_sigma, dbias = dbias[0].to(gmm_weight.dtype), dbias[1].to(gmm_log_sigma.dtype), None
    elif need_dbias:
        dbias = dbias.to(bias.dtype)
    return (*grads, dscale if need_dscale else None, None, dbias if need_dbias and gmm_weight is None else None,
            None, dmask if need_dmask else None, dweight, dlog_sigma, None)


attention_fwd.register_autograd(_op_backward, setup_context=_setup)
attention_qkvpacked_fwd.register_autograd(_op_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# entry points (arguments already checked by mgit_fast.functional)
# --------------------------------------------------------------------------------------------
def _scale(scale, head_dim: int) -> Tuple[Optional[Tensor], float]:
    if scale is None:
        return None, head_dim**-0.5
    if isinstance(scale, Tensor):
        return (scale if scale.is_contiguous() else scale.contiguous()), 1.0
    return None, float(scale)


def _gmm_args(bias, gmm) -> tuple:
    """(bias, gmm_weight, gmm_log_sigma, grid_size): a Gaussian mixture goes by its parameters."""
    if gmm is None:
        return bias, None, None, 0
    return (None, *gmm)


def attention(q, k, v, scale=None, bias=None, diagonal_mask=False, mask=None, gmm=None) -> Tensor:
    """``(softmax(q·kᵀ·scale + bias) ⊙ mask)·v`` for q, k, v ``[B, H, N, D]``.

    ``scale``: None (``D**-0.5``), a float, or a learnable tensor ``[]`` / ``[H]``; ``bias`` and
    ``mask`` (IBiT's multiplicative mask, applied to the probabilities with no renormalisation):
    ``[H, N, N]`` or ``[B, H, N, N]`` (1 broadcasts over B and H), learnable; ``gmm``, instead of
    ``bias``: ``(weight, log_sigma, grid_size)`` of a Gaussian-mixture bias (``weight`` and
    ``log_sigma`` learnable ``[H, K]``, N = 1 + grid_size²); ``diagonal_mask``: a token does not
    attend to itself. Gradients reach q, k, v, scale, bias (or weight and log_sigma) and mask."""
    scale_t, scale_v = _scale(scale, q.shape[-1])
    bias, *gmm_args = _gmm_args(bias, gmm)
    if torch.compiler.is_compiling():
        if gmm is not None:
            bias = gaussian_mixture_bias_op(gmm_args[0].detach(), gmm_args[1].detach(), gmm_args[2])
        return attention_fwd(q, k, v, scale_t, scale_v, bias, diagonal_mask, mask, *gmm_args)[0]
    q, k, v = _qkv(q, k, v)
    return _Attention.apply(q, k, v, 0, scale_t, scale_v, bias, mask, diagonal_mask, *gmm_args)


def attention_qkvpacked(qkv, num_heads, scale=None, bias=None, diagonal_mask=False, mask=None, gmm=None) -> Tensor:
    """Attention from a packed ``qkv [B, N, 3·H·D]`` (read in place) to ``[B, N, H·D]``; the
    options as in `attention`."""
    qkv = qkv if qkv.is_contiguous() else qkv.contiguous()
    scale_t, scale_v = _scale(scale, qkv.shape[-1] // (3 * num_heads))
    bias, *gmm_args = _gmm_args(bias, gmm)
    if torch.compiler.is_compiling():
        if gmm is not None:
            bias = gaussian_mixture_bias_op(gmm_args[0].detach(), gmm_args[1].detach(), gmm_args[2])
        return attention_qkvpacked_fwd(qkv, num_heads, scale_t, scale_v, bias, diagonal_mask, mask, *gmm_args)[0]
    return _Attention.apply(qkv, None, None, num_heads, scale_t, scale_v, bias, mask, diagonal_mask, *gmm_args)
