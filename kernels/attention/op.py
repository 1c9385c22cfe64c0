"""The attention op: the entry points, their autograd, and the custom ops torch.compile sees.

In eager mode a `torch.autograd.Function` launches the kernels directly (the custom-op dispatch
cost about 0.5 ms of host time per call on the first GPU run); under `torch.compile` the same
work runs as the custom ops `mgit_fast::attention_*`, which have fake kernels and autograd
registrations, so a compiled graph holds them without a break. Either way the inputs are first
brought to what the kernels read: q, k, v with one set of strides and unit stride on D (`_qkv`),
a scale tensor contiguous, bias and mask as `_map` says.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import common
from .backward import backward_into
from .forward import forward_into
from .planning import plan
from .shared import shared_grad


def _map(t: Optional[Tensor]) -> Optional[Tensor]:
    """A bias or mask as the kernels read it (`common.map_layout`): [N, N] slices contiguous, one
    after another over the heads it varies over, then over the batch (else a contiguous copy)."""
    if t is None:
        return t
    full = t if t.dim() == 4 else t.unsqueeze(0)
    layout, H, N = common.map_layout(t), full.shape[1], full.shape[-1]
    if (full.stride(-1) == 1 and full.stride(-2) == N and (layout % 2 == 0 or full.stride(1) == N * N)
            and (layout < 2 or full.stride(0) == (H if layout == 3 else 1) * N * N)):
        return t
    return t.contiguous()


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """`t` with `ref`'s strides (both contiguous-compatible layouts of one shape)."""
    return t if t.stride() == ref.stride() else t.contiguous()


def _shared(t: Tensor) -> bool:
    """Whether a [H, N, N] / [B, H, N, N] score map is shared over the batch or heads."""
    return t.dim() == 3 or t.shape[0] == 1 or t.shape[1] == 1


def _dense(t: Tensor) -> bool:
    """Whether `t` fills its memory span without gaps (a permuted contiguous tensor)."""
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride != span:
            return False
        span *= size
    return True


def run_forward(q, k, v, num_heads, scale, scale_value, bias, mask, diagonal_mask):
    """(out, lse [B, H, N] fp32 in log2 units): q, k, v [B, H, N, D], or q a packed qkv
    [B, N, 3·H·D] when num_heads > 0 (k, v None)."""
    if num_heads:
        B, N, width = q.shape
        out = common.new_buffer((B, N, width // 3), device=q.device, dtype=q.dtype)
        qkv, outs = common.packed(q, num_heads, 3), common.packed(out, num_heads, 1)
    else:
        out = common.new_buffer(q.shape, device=q.device, dtype=q.dtype)
        qkv, outs = common.unpacked(*_qkv(q, k, v)), common.unpacked(out)
    B, H, N, D = qkv.shape
    lse = common.new_buffer((B, H, N), device=q.device, dtype=torch.float32)
    forward_into(qkv, outs, lse, plan(qkv.shape, q.dtype, q.device, mask=mask is not None), scale, scale_value,
                 _map(bias), _map(mask), diagonal_mask)
    return out, lse


def run_backward(dout, q, k, v, out, lse, num_heads, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias,
             mask, need_dmask):
    """(dq, dk, dv, dscale, dbias, dmask), the last three when asked; packed (num_heads > 0):
    (dqkv, None, None, ...). dq, dk, dv take the strides of q, k, v (copied first when those
    leave gaps, e.g. views into a packed qkv)."""
    dout = _like(dout, out)
    if num_heads:
        dqkv = common.new_buffer(q.shape, device=q.device, dtype=q.dtype)
        qkv, outs, grads = common.packed(q, num_heads, 3), common.packed(out, num_heads, 1), (dqkv, None, None)
        grad_ptrs = common.packed(dqkv, num_heads, 3).tensors
    else:
        q, k, v = _qkv(q, k, v)
        if not _dense(q):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qkv, outs = common.unpacked(q, k, v), common.unpacked(out)
        grads = grad_ptrs = tuple(common.new_buffer(q.shape, device=q.device, dtype=q.dtype, strides=q.stride())
                                  for _ in range(3))
    outs = outs._replace(tensors=(out, dout))  # dout shares out's strides
    B, H, N, D = qkv.shape
    bias, mask = _map(bias), _map(mask)
    per_batch_dbias = need_dbias and not _shared(bias)
    per_batch_dmask = need_dmask and not _shared(mask)
    p = plan(qkv.shape, q.dtype, q.device, mask=mask is not None, stores_map_grad=per_batch_dbias or per_batch_dmask)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = common.new_buffer((B, H, N), **f32)
    dscale_rows = common.new_buffer((B, H, N), **f32) if need_dscale else None
    dbias = common.new_buffer(bias.shape, **f32) if per_batch_dbias else None
    dmask = common.new_buffer(mask.shape, **f32) if per_batch_dmask else None
    backward_into(qkv, outs, lse, grad_ptrs, delta, p, scale, scale_value, bias, mask, diagonal_mask, dscale_rows,
                  dbias, dmask)
    dscale = None
    if need_dscale:  # the row sums, summed in a fixed order
        dscale = dscale_rows.sum(dim=(0, 2)) if scale.dim() == 1 else dscale_rows.sum()
        dscale = dscale.to(scale.dtype)
    shared = (qkv, outs, lse, delta, p, scale, scale_value, bias, mask, diagonal_mask)
    if need_dbias:
        dbias = shared_grad(bias, *shared, False) if dbias is None else dbias.to(bias.dtype)
    if need_dmask:
        dmask = shared_grad(mask, *shared, True) if dmask is None else dmask.to(mask.dtype)
    return (*grads, dscale, dbias, dmask)


# the inputs of both paths, in order
SCALE, BIAS, MASK = 4, 6, 7


def _save(ctx, inputs, output):
    q, k, v, num_heads, scale, scale_value, bias, mask, diagonal_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, scale, bias, mask)
    ctx.num_heads, ctx.scale_value, ctx.diagonal_mask = num_heads, scale_value, diagonal_mask
    ctx.set_materialize_grads(False)


def _grads(ctx, dout, bwd):
    """The inputs' gradients (None where not asked) from `bwd` (`run_backward` or the custom op)."""
    q, k, v, out, lse, scale, bias, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dscale = scale is not None and need[SCALE]
    need_dbias = bias is not None and need[BIAS]
    need_dmask = mask is not None and need[MASK]
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv, dscale, dbias, dmask = bwd(
        dout, q, k, v, out, lse, ctx.num_heads, scale, ctx.scale_value, bias, ctx.diagonal_mask, need_dscale,
        need_dbias, mask, need_dmask)
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None,
            dscale if need_dscale else None, None, dbias if need_dbias else None, dmask if need_dmask else None, None)


class _Attention(torch.autograd.Function):
    """Eager: the kernels launched directly."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = run_forward(*inputs)
        _save(ctx, inputs, (out, lse))
        return out

    @staticmethod
    def backward(ctx, dout):
        return _grads(ctx, dout, run_backward)


@torch.library.custom_op("mgit_fast::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Optional[Tensor], v: Optional[Tensor], num_heads: int, scale: Optional[Tensor], scale_value: float,
    bias: Optional[Tensor], mask: Optional[Tensor], diagonal_mask: bool,
) -> Tuple[Tensor, Tensor]:
    """Under torch.compile."""
    return run_forward(q, k, v, num_heads, scale, scale_value, bias, mask, diagonal_mask)


@attention_fwd.register_fake
def _(q, k, v, num_heads, scale, scale_value, bias, mask, diagonal_mask):
    if num_heads:
        B, N, width = q.shape
        return q.new_empty((B, N, width // 3)), q.new_empty((B, num_heads, N), dtype=torch.float32)
    B, H, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("mgit_fast::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], out: Tensor, lse: Tensor, num_heads: int,
    scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor], diagonal_mask: bool, need_dscale: bool,
    need_dbias: bool, mask: Optional[Tensor], need_dmask: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = run_backward(dout, q, k, v, out, lse, num_heads, scale, scale_value, bias, diagonal_mask, need_dscale,
                          need_dbias, mask, need_dmask)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, num_heads, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias, mask,
      need_dmask):
    like = lambda t, needed: torch.empty_like(t) if needed else q.new_empty(0)  # noqa: E731
    dqkv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v) if t is not None]
    return (*dqkv, *[q.new_empty(0)] * (3 - len(dqkv)), like(scale, need_dscale), like(bias, need_dbias),
            like(mask, need_dmask))


attention_fwd.register_autograd(lambda ctx, dout, _dlse: _grads(ctx, dout, attention_bwd), setup_context=_save)


def _qkv(q, k, v):
    """q, k, v with one set of strides, unit stride on D (copies only when they differ)."""
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


# --------------------------------------------------------------------------------------------
# entry points (arguments already checked by mgit_fast.functional)
# --------------------------------------------------------------------------------------------
def _apply(q, k, v, num_heads, scale, bias, mask, diagonal_mask) -> Tensor:
    head_dim = q.shape[-1] // (3 * num_heads) if num_heads else q.shape[-1]
    if scale is None:
        scale, scale_value = None, head_dim**-0.5
    elif isinstance(scale, Tensor):
        scale, scale_value = (scale if scale.is_contiguous() else scale.contiguous()), 1.0
    else:
        scale, scale_value = None, float(scale)
    if torch.compiler.is_compiling():
        return attention_fwd(q, k, v, num_heads, scale, scale_value, bias, mask, diagonal_mask)[0]
    return _Attention.apply(q, k, v, num_heads, scale, scale_value, bias, mask, diagonal_mask)


def attention(q, k, v, scale=None, bias=None, diagonal_mask=False, mask=None) -> Tensor:
    """``(softmax(q·kᵀ·scale + bias) ⊙ mask)·v`` for q, k, v ``[B, H, N, D]``.

    ``scale``: None (``D**-0.5``), a float, or a learnable tensor ``[]`` / ``[H]``; ``bias`` and
    ``mask`` (IBiT's multiplicative mask, applied to the probabilities with no renormalisation):
    ``[H, N, N]`` or ``[B, H, N, N]`` (1 broadcasts over B and H), learnable; ``diagonal_mask``: a
    token does not attend to itself. Gradients reach q, k, v, scale, bias and mask."""
    return _apply(q, k, v, 0, scale, bias, mask, diagonal_mask)


def attention_qkvpacked(qkv, num_heads, scale=None, bias=None, diagonal_mask=False, mask=None) -> Tensor:
    """Attention from a packed ``qkv [B, N, 3·H·D]`` (read in place) to ``[B, N, H·D]``; the
    options as in `attention`."""
    return _apply(qkv if qkv.is_contiguous() else qkv.contiguous(), None, None, num_heads, scale, bias, mask,
                  diagonal_mask)
