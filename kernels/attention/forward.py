"""Attention forward: one program per (query block, b·h) streams the key blocks with an online
softmax in fp32 (exp2 domain), storing `out` and the log-sum-exp; nothing N×N is written. With a
multiplicative mask the running max and denominator stay those of p; only P·V takes p ⊙ M."""
from __future__ import annotations

import triton
import triton.language as tl

from .. import on_device
from .common import constexprs, head_scale, load, map_offset, map_tile, mm, program, scale_stride, scores, store, tile
from .planning import launch


@triton.jit
def _fwd_block(q, m_i, l_i, acc, K, V, BIAS, MASK, rows, start_n, scale_log2, N, stride_n, D: tl.constexpr,
               COLS: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
               PRECISION: tl.constexpr):
    """One online-softmax step over the keys start_n + [0, COLS)."""
    cols = start_n + tl.arange(0, COLS)
    k = load(tile(K, cols, stride_n, D), cols[:, None] < N, MASK_COLS)
    v = load(tile(V, cols, stride_n, D), cols[:, None] < N, MASK_COLS)
    s = scores(mm(q, tl.trans(k), PRECISION), rows[:, None], cols[None, :], scale_log2, N, BIAS, DIAGONAL_MASK,
               MASK_ROWS, MASK_COLS)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK is not None:
        p = p * map_tile(MASK, rows[:, None], cols[None, :], N, MASK_ROWS, MASK_COLS)
    acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_rows(Q, K, V, O, LSE, BIAS, MASK, start_m, scale_log2, stride_n, stride_on, N, D: tl.constexpr,
              ROWS: tl.constexpr, MASK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
              DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Forward of the query rows start_m + [0, ROWS) of one head (every pointer at its slice)."""
    rows = start_m + tl.arange(0, ROWS)
    row_ok = rows < N
    q = load(tile(Q, rows, stride_n, D), row_ok[:, None], MASK_ROWS)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    full_n = (N // BLOCK_N) * BLOCK_N if TAIL_N < BLOCK_N else 0  # (else every block masked)
    for start_n in range(0, full_n, BLOCK_N):
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, K, V, BIAS, MASK, rows, start_n, scale_log2, N, stride_n, D,
                                   BLOCK_N, MASK_ROWS, False, DIAGONAL_MASK, PRECISION)
    if TAIL_N > 0:  # the last N mod BLOCK_N keys in masked steps
        for start_n in range(full_n, N, TAIL_N):
            m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, K, V, BIAS, MASK, rows, start_n, scale_log2, N, stride_n,
                                       D, TAIL_N, MASK_ROWS, True, DIAGONAL_MASK, PRECISION)
    store(tile(O, rows, stride_on, D), (acc / l_i[:, None]).to(O.dtype.element_ty), row_ok[:, None], MASK_ROWS)
    store(LSE + rows, m_i + tl.math.log2(l_i), row_ok, MASK_ROWS)  # log2 units


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, SCALE, BIAS, MASK, scale_value, scale_stride, stride_b, stride_h, stride_n, stride_ob,
    stride_oh, stride_on, H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr, BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr,
):
    pid_m, bh, b, h = program(N, H, BLOCK_M)
    scale_log2 = head_scale(SCALE, scale_value, scale_stride, h) * 1.4426950408889634
    base = b * stride_b + h * stride_h
    Q, K, V, O, LSE = Q + base, K + base, V + base, O + b * stride_ob + h * stride_oh, LSE + bh * N
    if BIAS is not None:
        BIAS += map_offset(b, h, H, N, BIAS_LAYOUT)
    if MASK is not None:
        MASK += map_offset(b, h, H, N, MASK_LAYOUT)
    args = (Q, K, V, O, LSE, BIAS, MASK, pid_m * BLOCK_M, scale_log2, stride_n, stride_on, N)
    if TAIL_M < BLOCK_M and pid_m < N // BLOCK_M:  # a full block of queries, unmasked
        _fwd_rows(*args, D, BLOCK_M, False, BLOCK_N, TAIL_N, DIAGONAL_MASK, PRECISION)
    else:  # the leftover queries in a TAIL_M-row tile
        _fwd_rows(*args, D, TAIL_M, True, BLOCK_N, TAIL_N, DIAGONAL_MASK, PRECISION)


def forward_into(qkv, out, lse, plan, scale, scale_value, bias, mask, diagonal_mask):
    """Writes attention of `qkv` (`common.Heads` of q, k, v) into `out` (`Heads` of one) and the
    log-sum-exp (fp32, log2 units, the unmasked softmax's) into `lse` [B, H, N]. `scale`: None or
    a contiguous tensor [] / [H]; bias, mask: None or [B|1, H|1, N, N] with contiguous [N, N]
    slices laid out as `common.map_layout` reads them."""
    B, H, N, D = qkv.shape
    args = (*qkv.tensors, *out.tensors, lse, scale, bias, mask, scale_value, scale_stride(scale), *qkv.strides,
            *out.strides, H, N)
    with on_device(lse):
        launch(attention_fwd_kernel, plan.fwd, lambda block_m: triton.cdiv(N, block_m) * B * H, lse.device, args,
               constexprs(D, plan.fwd.precision, diagonal_mask, bias, mask))
