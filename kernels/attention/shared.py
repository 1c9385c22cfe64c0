"""The gradient of a bias or mask shared over the batch and/or heads, without a [B, H, N, N]
gradient: one program per (tile, group of contributing (b, h) pairs, gradient slice) recomputes
p and dp of each pair in its group (2 matmuls), sums ds (a bias) or p ⊙ dp (a mask) in registers
and adds the sum with one relaxed fp32 atomic per element (a plain store with one group, the
deterministic choice)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import on_device
from . import common
from .common import constexprs, head_scale, load, map_offset, map_tile, mm, scale_stride, scores, store, tile
from .planning import launch, shared_grad_groups


@triton.jit
def _shared_tile(Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, scale_value, scale_stride, sl_b, sl_h, RH, r_start,
                 r_end, start_m, start_n, H, N, stride_b, stride_h, stride_n, stride_ob, stride_oh, stride_on,
                 D: tl.constexpr, DIAGONAL_MASK: tl.constexpr, BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr,
                 GRAD_OF_MASK: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr, ROWS: tl.constexpr,
                 COLS: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Σ over the contributors r_start ≤ r < r_end (b = sl_b + r // RH, h = sl_h + r % RH) of the
    [rows, cols] tile of ds or p ⊙ dp, then one store or atomic per element into GRAD (the
    gradient's [N, N] slice)."""
    rows = start_m + tl.arange(0, ROWS)
    cols = start_n + tl.arange(0, COLS)
    row_ok = rows < N
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for r in range(r_start, r_end):
        b = sl_b + (r // RH).to(tl.int64)
        h = sl_h + (r % RH).to(tl.int64)
        bh = b * H + h
        scale_log2 = head_scale(SCALE, scale_value, scale_stride, h) * 1.4426950408889634
        base = b * stride_b + h * stride_h
        q = load(tile(Q + base, rows, stride_n, D), row_ok[:, None], MASK_ROWS)
        do = load(tile(DO + b * stride_ob + h * stride_oh, rows, stride_on, D), row_ok[:, None], MASK_ROWS)
        k = load(tile(K + base, cols, stride_n, D), cols[:, None] < N, MASK_COLS)
        v = load(tile(V + base, cols, stride_n, D), cols[:, None] < N, MASK_COLS)
        lse = load(LSE + bh * N + rows, row_ok, MASK_ROWS)
        bias = BIAS
        if BIAS is not None:
            bias = BIAS + map_offset(b, h, H, N, BIAS_LAYOUT)
        s = scores(mm(q, tl.trans(k), PRECISION), rows[:, None], cols[None, :], scale_log2, N, bias, DIAGONAL_MASK,
                   MASK_ROWS, MASK_COLS)
        p = tl.math.exp2(s - lse[:, None])
        if MASK_ROWS:
            p = tl.where(row_ok[:, None], p, 0.0)
        dp = mm(do, tl.trans(v), PRECISION)
        if GRAD_OF_MASK:  # dmask = p ⊙ dp
            acc += p * dp
        else:  # dbias = ds = p ⊙ (mask ⊙ dp − δ)
            delta = load(DELTA + bh * N + rows, row_ok, MASK_ROWS)
            if MASK is not None:
                dp = dp * map_tile(MASK + map_offset(b, h, H, N, MASK_LAYOUT), rows[:, None], cols[None, :], N,
                                   MASK_ROWS, MASK_COLS)
            acc += p * (dp - delta[:, None])
    ptrs = GRAD + rows[:, None] * N + cols[None, :]
    tile_ok = row_ok[:, None] & (cols[None, :] < N)
    if ATOMIC:
        if MASK_ROWS or MASK_COLS:
            tl.atomic_add(ptrs, acc, mask=tile_ok, sem="relaxed")
        else:
            tl.atomic_add(ptrs, acc, sem="relaxed")
    else:
        store(ptrs, acc, tile_ok, MASK_ROWS or MASK_COLS)


@triton.jit
def attention_bwd_shared_kernel(
    Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, scale_value, scale_stride,
    stride_b, stride_h, stride_n, stride_ob, stride_oh, stride_on, B, H, N, GROUP,
    D: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr, BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr,
    GRAD_LAYOUT: tl.constexpr, GRAD_OF_MASK: tl.constexpr, ATOMIC: tl.constexpr,
):
    """One program per (tile, group of GROUP contributing pairs, gradient slice), tiles fastest.
    The gradient, of `common.map_layout` GRAD_LAYOUT (never 3: a shared map), has a slice
    (sl_b, sl_h) per batch or per head or one; its contributors r map to b = sl_b + r // RH,
    h = sl_h + r % RH. Full tiles run unmasked, the leftover rows in a TAIL_M-row tile, the
    leftover columns in a TAIL_N-wide one."""
    RH = 1 if GRAD_LAYOUT == 1 else H  # contributors along h, R in all
    R = RH if GRAD_LAYOUT == 2 else RH * B
    groups = tl.cdiv(R, GROUP)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(N, BLOCK_M) * tiles_n
    pid = tl.program_id(0).to(tl.int64)
    t = pid % tiles
    g = pid // tiles % groups
    sl = pid // (tiles * groups)
    sl_h = sl if GRAD_LAYOUT == 1 else 0
    sl_b = sl if GRAD_LAYOUT == 2 else 0
    mi = t // tiles_n
    ni = t % tiles_n
    GRAD += sl * N * N
    r_start = g * GROUP
    r_end = tl.minimum(r_start + GROUP, R)
    args = (Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, scale_value, scale_stride, sl_b, sl_h, RH, r_start, r_end,
            mi * BLOCK_M, ni * BLOCK_N, H, N, stride_b, stride_h, stride_n, stride_ob, stride_oh, stride_on)
    full_cols = TAIL_N < BLOCK_N and ni < N // BLOCK_N
    if TAIL_M < BLOCK_M and mi < N // BLOCK_M:  # full rows
        if full_cols:
            _shared_tile(*args, D, DIAGONAL_MASK, BIAS_LAYOUT, MASK_LAYOUT, GRAD_OF_MASK, ATOMIC, PRECISION, BLOCK_M,
                         BLOCK_N, False, False)
        else:  # the leftover columns in a TAIL_N-wide tile
            _shared_tile(*args, D, DIAGONAL_MASK, BIAS_LAYOUT, MASK_LAYOUT, GRAD_OF_MASK, ATOMIC, PRECISION, BLOCK_M,
                         TAIL_N, False, True)
    else:  # the leftover rows in a TAIL_M-row tile
        if full_cols:
            _shared_tile(*args, D, DIAGONAL_MASK, BIAS_LAYOUT, MASK_LAYOUT, GRAD_OF_MASK, ATOMIC, PRECISION, TAIL_M,
                         BLOCK_N, True, False)
        else:
            _shared_tile(*args, D, DIAGONAL_MASK, BIAS_LAYOUT, MASK_LAYOUT, GRAD_OF_MASK, ATOMIC, PRECISION, TAIL_M,
                         TAIL_N, True, True)


def shared_grad(target, qkv, outs, lse, delta, plan, scale, scale_value, bias, mask, diagonal_mask,
                of_mask) -> Tensor:
    """The gradient of `target` (the bias, or the mask when `of_mask`), a score map shared over the
    batch and/or heads, summed over the (b, h) pairs that read each slice; `qkv` and `outs` (out,
    dout) as in `backward_into`. Reads the forward's lse and the dq kernel's δ."""
    B, H, N, D = qkv.shape
    kernel_plan = plan.shared
    config = kernel_plan.configs[0]
    full = target.shape if target.dim() == 4 else (1, *target.shape)
    slices_b, slices_h = full[0], full[1]
    per_b, per_h = B // slices_b, H // slices_h  # contributors per slice along b and h
    programs_per_group = triton.cdiv(N, config.block_m) * triton.cdiv(N, kernel_plan.block_n) * slices_b * slices_h
    deterministic = torch.are_deterministic_algorithms_enabled()
    group, groups = shared_grad_groups(per_b * per_h, programs_per_group, deterministic)
    atomic = groups > 1
    alloc = torch.zeros if atomic else common.new_buffer
    grad = alloc((slices_b, slices_h, N, N), device=lse.device, dtype=torch.float32)
    args = (*qkv.tensors, outs.tensors[1], lse, delta, scale, bias, mask, grad, scale_value, scale_stride(scale),
            *qkv.strides, *outs.strides, B, H, N, group)
    const = dict(constexprs(D, kernel_plan.precision, diagonal_mask, bias, mask),
                 GRAD_LAYOUT=2 * (slices_b > 1) + (slices_h > 1), GRAD_OF_MASK=of_mask, ATOMIC=atomic)
    with on_device(lse):
        launch(attention_bwd_shared_kernel, kernel_plan, lambda block_m: programs_per_group * groups, lse.device,
               args, const)
    return grad.reshape(target.shape).to(target.dtype)
