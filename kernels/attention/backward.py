"""Attention backward: two kernels that recompute p from the saved log-sum-exp.

With dp = dout·vᵀ, δ_m = dout_m·out_m and ds = p ⊙ (M ⊙ dp − δ) (M ≡ 1 without a mask):
the dq kernel, one program per query block, writes δ, dq = scale·ds·k, a per-batch bias or mask
gradient (ds, p ⊙ dp) and each row's share of dscale (Σ_n ds·q·k); the dk/dv kernel, one program
per key block, reads δ and writes dv = (p ⊙ M)ᵀ·dout and dk = scale·dsᵀ·q. It works in the
transposed form, sᵀ = k·qᵀ, so pᵀ and dsᵀ are born in the [keys, queries] layout their matmuls
take (no transpose through shared memory). A bias or mask
shared over the batch or heads gets its gradient from the shared-gradient pass (`shared.py`).
This pair measured 2.5-2.8× faster on an H200 than a one-launch fused backward (5 matmuls
instead of 7), which was removed for it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import on_device
from .common import constexprs, head_scale, load, map_offset, map_tile, mm, program, scale_stride, scores, store, tile
from .planning import launch


@triton.jit
def _dq_block(q, do, lse, delta, dq, dscale, K, V, BIAS, MASK, DSCALE, DBIAS, DMASK, rows, start_n, scale_log2, N,
              stride_n, D: tl.constexpr, COLS: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
              DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dscale and the stored map gradients of the keys start_n + [0, COLS)."""
    cols = start_n + tl.arange(0, COLS)
    k = load(tile(K, cols, stride_n, D), cols[:, None] < N, MASK_COLS)
    v = load(tile(V, cols, stride_n, D), cols[:, None] < N, MASK_COLS)
    qk = mm(q, tl.trans(k), PRECISION)
    s = scores(qk, rows[:, None], cols[None, :], scale_log2, N, BIAS, DIAGONAL_MASK, MASK_ROWS, MASK_COLS)
    p = tl.math.exp2(s - lse[:, None])
    if MASK_ROWS:
        p = tl.where(rows[:, None] < N, p, 0.0)
    dp = mm(do, tl.trans(v), PRECISION)
    if MASK is not None:
        ds = p * (map_tile(MASK, rows[:, None], cols[None, :], N, MASK_ROWS, MASK_COLS) * dp - delta[:, None])
    else:
        ds = p * (dp - delta[:, None])
    dq += mm(ds.to(k.dtype), k, PRECISION)
    if DSCALE is not None:
        dscale += tl.sum(tl.where(ds != 0.0, ds * qk, 0.0), 1)
    ok = (rows[:, None] < N) & (cols[None, :] < N)  # per-batch gradients: contiguous [B, H, N, N]
    if DBIAS is not None:
        store(DBIAS + rows[:, None] * N + cols[None, :], ds, ok, MASK_ROWS or MASK_COLS)
    if DMASK is not None:
        store(DMASK + rows[:, None] * N + cols[None, :], p * dp, ok, MASK_ROWS or MASK_COLS)
    return dq, dscale


@triton.jit
def _dq_rows(Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE, DBIAS, DMASK, BIAS, MASK, start_m, scale, stride_n, stride_on,
             N, D: tl.constexpr, ROWS: tl.constexpr, MASK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
             TAIL_N: tl.constexpr, DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """δ, dq, the stored map gradients and the dscale row sums of the queries start_m + [0, ROWS)
    of one head (every pointer at its slice)."""
    rows = start_m + tl.arange(0, ROWS)
    row_ok = rows < N
    q = load(tile(Q, rows, stride_n, D), row_ok[:, None], MASK_ROWS)
    do = load(tile(DO, rows, stride_on, D), row_ok[:, None], MASK_ROWS)
    o = load(tile(O, rows, stride_on, D), row_ok[:, None], MASK_ROWS)
    lse = load(LSE + rows, row_ok, MASK_ROWS)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    store(DELTA + rows, delta, row_ok, MASK_ROWS)  # for the dk/dv kernel, launched next
    scale_log2 = scale * 1.4426950408889634
    dq = tl.zeros([ROWS, D], dtype=tl.float32)
    if DSCALE is not None:
        dscale = tl.zeros([ROWS], dtype=tl.float32)
    else:  # a constant through the loop, not a vector
        dscale = 0.0
    full_n = (N // BLOCK_N) * BLOCK_N if TAIL_N < BLOCK_N else 0  # (else every block masked)
    for start_n in range(0, full_n, BLOCK_N):
        dq, dscale = _dq_block(q, do, lse, delta, dq, dscale, K, V, BIAS, MASK, DSCALE, DBIAS, DMASK, rows, start_n,
                               scale_log2, N, stride_n, D, BLOCK_N, MASK_ROWS, False, DIAGONAL_MASK, PRECISION)
    if TAIL_N > 0:  # the last N mod BLOCK_N keys in masked steps
        for start_n in range(full_n, N, TAIL_N):
            dq, dscale = _dq_block(q, do, lse, delta, dq, dscale, K, V, BIAS, MASK, DSCALE, DBIAS, DMASK, rows,
                                   start_n, scale_log2, N, stride_n, D, TAIL_N, MASK_ROWS, True, DIAGONAL_MASK,
                                   PRECISION)
    if DSCALE is not None:  # per row, summed afterwards in a fixed order
        store(DSCALE + rows, dscale, row_ok, MASK_ROWS)
    store(tile(DQ, rows, stride_n, D), (dq * scale).to(DQ.dtype.element_ty), row_ok[:, None], MASK_ROWS)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE, DBIAS, DMASK, SCALE, BIAS, MASK, scale_value, scale_stride,
    stride_b, stride_h, stride_n, stride_ob, stride_oh, stride_on, H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr, BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr,
):
    """One program per block of BLOCK_M queries, streaming the keys (blocks as in the forward)."""
    pid_m, bh, b, h = program(N, H, BLOCK_M)
    scale = head_scale(SCALE, scale_value, scale_stride, h)
    base, o_base = b * stride_b + h * stride_h, b * stride_ob + h * stride_oh
    Q, K, V, O, DO, DQ = Q + base, K + base, V + base, O + o_base, DO + o_base, DQ + base
    LSE, DELTA = LSE + bh * N, DELTA + bh * N
    if DSCALE is not None:
        DSCALE += bh * N
    if DBIAS is not None:
        DBIAS += bh * N * N
    if DMASK is not None:
        DMASK += bh * N * N
    if BIAS is not None:
        BIAS += map_offset(b, h, H, N, BIAS_LAYOUT)
    if MASK is not None:
        MASK += map_offset(b, h, H, N, MASK_LAYOUT)
    args = (Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE, DBIAS, DMASK, BIAS, MASK, pid_m * BLOCK_M, scale, stride_n,
            stride_on, N)
    if TAIL_M < BLOCK_M and pid_m < N // BLOCK_M:
        _dq_rows(*args, D, BLOCK_M, False, BLOCK_N, TAIL_N, DIAGONAL_MASK, PRECISION)
    else:
        _dq_rows(*args, D, TAIL_M, True, BLOCK_N, TAIL_N, DIAGONAL_MASK, PRECISION)


@triton.jit
def _dkdv_block(k, v, dk, dv, Q, DO, LSE, DELTA, BIAS, MASK, keys, start_m, scale_log2, N, stride_n, stride_on,
                D: tl.constexpr, QUERIES: tl.constexpr, MASK_KEYS: tl.constexpr, MASK_QUERIES: tl.constexpr,
                DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of the owned keys from the queries start_m + [0, QUERIES), in the [keys, queries]
    form: sᵀ = k·qᵀ, so pᵀ and dsᵀ are born in the layout their matmuls take."""
    qs = start_m + tl.arange(0, QUERIES)
    q_ok = qs < N
    q = load(tile(Q, qs, stride_n, D), q_ok[:, None], MASK_QUERIES)
    do = load(tile(DO, qs, stride_on, D), q_ok[:, None], MASK_QUERIES)
    lse = load(LSE + qs, q_ok, MASK_QUERIES)
    delta = load(DELTA + qs, q_ok, MASK_QUERIES)
    st = scores(mm(k, tl.trans(q), PRECISION), qs[None, :], keys[:, None], scale_log2, N, BIAS, DIAGONAL_MASK,
                MASK_QUERIES, MASK_KEYS)
    pt = tl.math.exp2(st - lse[None, :])
    if MASK_QUERIES:
        pt = tl.where(q_ok[None, :], pt, 0.0)
    dpt = mm(v, tl.trans(do), PRECISION)
    if MASK is not None:  # dv = (pᵀ ⊙ Mᵀ)·dout; dsᵀ = pᵀ ⊙ (Mᵀ ⊙ dpᵀ − δ), Mᵀ loaded by index
        mkt = map_tile(MASK, qs[None, :], keys[:, None], N, MASK_QUERIES, MASK_KEYS)
        dv += mm((pt * mkt).to(do.dtype), do, PRECISION)
        dpt = dpt * mkt
    else:
        dv += mm(pt.to(do.dtype), do, PRECISION)
    dk += mm((pt * (dpt - delta[None, :])).to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_keys(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, start_n, scale, stride_n, stride_on, N,
               D: tl.constexpr, KEYS: tl.constexpr, MASK_KEYS: tl.constexpr, BLOCK_N: tl.constexpr,
               TAIL_N: tl.constexpr, DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of the keys start_n + [0, KEYS) of one head (every pointer at its slice)."""
    keys = start_n + tl.arange(0, KEYS)
    key_ok = keys[:, None] < N
    k = load(tile(K, keys, stride_n, D), key_ok, MASK_KEYS)
    v = load(tile(V, keys, stride_n, D), key_ok, MASK_KEYS)
    scale_log2 = scale * 1.4426950408889634
    dk = tl.zeros([KEYS, D], dtype=tl.float32)
    dv = tl.zeros([KEYS, D], dtype=tl.float32)
    full_m = (N // BLOCK_N) * BLOCK_N if TAIL_N < BLOCK_N else 0
    for start_m in range(0, full_m, BLOCK_N):
        dk, dv = _dkdv_block(k, v, dk, dv, Q, DO, LSE, DELTA, BIAS, MASK, keys, start_m, scale_log2, N, stride_n,
                             stride_on, D, BLOCK_N, MASK_KEYS, False, DIAGONAL_MASK, PRECISION)
    if TAIL_N > 0:  # the last N mod BLOCK_N queries in masked steps
        for start_m in range(full_m, N, TAIL_N):
            dk, dv = _dkdv_block(k, v, dk, dv, Q, DO, LSE, DELTA, BIAS, MASK, keys, start_m, scale_log2, N, stride_n,
                                 stride_on, D, TAIL_N, MASK_KEYS, True, DIAGONAL_MASK, PRECISION)
    store(tile(DK, keys, stride_n, D), (dk * scale).to(DK.dtype.element_ty), key_ok, MASK_KEYS)
    store(tile(DV, keys, stride_n, D), dv.to(DV.dtype.element_ty), key_ok, MASK_KEYS)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SCALE, BIAS, MASK, scale_value, scale_stride,
    stride_b, stride_h, stride_n, stride_ob, stride_oh, stride_on, H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr, BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr,
):
    """One program per block of BLOCK_M keys, streaming the queries."""
    pid_n, bh, b, h = program(N, H, BLOCK_M)
    scale = head_scale(SCALE, scale_value, scale_stride, h)
    base = b * stride_b + h * stride_h
    Q, K, V, DO, DK, DV = Q + base, K + base, V + base, DO + b * stride_ob + h * stride_oh, DK + base, DV + base
    LSE, DELTA = LSE + bh * N, DELTA + bh * N
    if BIAS is not None:
        BIAS += map_offset(b, h, H, N, BIAS_LAYOUT)
    if MASK is not None:
        MASK += map_offset(b, h, H, N, MASK_LAYOUT)
    args = (Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, pid_n * BLOCK_M, scale, stride_n, stride_on, N)
    if TAIL_M < BLOCK_M and pid_n < N // BLOCK_M:
        _dkdv_keys(*args, D, BLOCK_M, False, BLOCK_N, TAIL_N, DIAGONAL_MASK, PRECISION)
    else:
        _dkdv_keys(*args, D, TAIL_M, True, BLOCK_N, TAIL_N, DIAGONAL_MASK, PRECISION)


def backward_into(qkv, outs, lse, grads, delta, plan, scale, scale_value, bias, mask, diagonal_mask, dscale=None,
                  dbias=None, dmask=None):
    """Writes the gradients `grads` (dq, dk, dv, with the strides of `qkv`, the `common.Heads` of
    q, k, v) from `outs` (`Heads` of out and dout) and δ into `delta` [B, H, N] fp32; when given,
    dscale's row sums into `dscale` [B, H, N] fp32 and the per-batch gradients into `dbias` /
    `dmask` (contiguous fp32 [B, H, N, N]). scale, bias and mask as in `forward_into`."""
    B, H, N, D = qkv.shape
    programs = lambda block_m: triton.cdiv(N, block_m) * B * H  # noqa: E731
    rest = (scale, bias, mask, scale_value, scale_stride(scale), *qkv.strides, *outs.strides, H, N)
    const = constexprs(D, plan.dq.precision, diagonal_mask, bias, mask)  # (dk/dv's too)
    dq, dk, dv = grads
    with on_device(lse):
        launch(attention_bwd_dq_kernel, plan.dq, programs, lse.device,
               (*qkv.tensors, *outs.tensors, lse, delta, dq, dscale, dbias, dmask, *rest), const)
        launch(attention_bwd_dkdv_kernel, plan.dkdv, programs, lse.device,
               (*qkv.tensors, outs.tensors[1], lse, delta, dk, dv, *rest), const)
