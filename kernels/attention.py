"""Fused attention, forward and backward (flash-style), with the small-data variants.

Math, per batch b and head h, for queries m and keys n of a sequence of N tokens, with M the
multiplicative mask (IBiT; M ≡ 1 without one):

    s[m, n] = scale_h · (q_m · k_n) + bias[b, h, m, n]        (−∞ where m = n if diagonal_mask)
    p[m, :] = softmax(s[m, :]),   a[m, n] = p[m, n] · M[b, h, m, n]   (no renormalisation)
    out_m = Σ_n a[m, n] · v_n,    lse_m = log Σ_n exp s[m, n]          (the unmasked softmax's)

Forward: one program per (query block, b·h) streams the key blocks with an online softmax in
fp32 (exp2 domain), so nothing of size N×N is written; it stores `out` and `lse`. With a mask,
the running max and denominator stay those of p; only the P·V product takes p ⊙ M.

Backward, with dp = dout · vᵀ, δ_m = dout_m · out_m (= Σ_n p M dp, so still the row term) and
ds[m, n] = p[m, n] · (M[m, n] · dp[m, n] − δ_m):

    dv_n = Σ_m p[m, n] · M[m, n] · dout_m    dk_n = scale_h · Σ_m ds[m, n] · q_m
    dq_m = scale_h · Σ_n ds[m, n] · k_n      dbias[b, h, m, n] = ds[m, n]
    dscale_h = Σ_{b, m, n} ds[m, n] · (q_m · k_n)    dM[b, h, m, n] = p[m, n] · dp[m, n]

The fused backward (`_attention_bwd_fused_kernel`: fp16/bf16 at D = 32 and 64 with no
per-batch bias or mask gradient, a mask at D = 64 on sm_90 only, when the GPU has ≥ 2 (b, h)
pairs per SM) is one
launch of 5 N²D matmuls per pair: a persistent grid of one program per SM, each taking a whole
pair at a time (δ, then every key block in the dk/dv kernel's form, also adding dqᵀ = kᵀ·dsᵀ
into an fp32 [D, N] scratch that only it touches, then dq from the scratch). Otherwise two
kernels (7 matmuls) recompute p from the saved lse: one program per query block (δ, dq, dbias,
dM, and per-block partial sums of dscale reduced afterwards in a fixed order), then one per key
block (dk, dv), which reads the δ the first wrote. The dk/dv kernel works in the transposed form,
sᵀ = k·qᵀ, pᵀ = exp2(sᵀ − lse), dsᵀ = pᵀ ⊙ (Mᵀ ⊙ v·doutᵀ − δ), dv = (pᵀ ⊙ Mᵀ)·dout, so pᵀ
and dsᵀ are born in the [keys, queries] layout their matmuls (pᵀ·dout, dsᵀ·q) take, with no
transpose through shared memory (the Mᵀ tile is loaded transposed by index). HAS_MASK is a
constexpr: without a mask the kernels compile as they do with no mask argument at all.

A per-batch bias or mask [B, H, N, N] has its gradient (ds, or p ⊙ dp) written by the dq
kernel. One shared over the batch (or heads) has it summed by a third pass (`shared_grad`): one
program per (tile, group of (b, h) pairs), which recomputes p and dp for each pair of its group
(2 matmuls), sums the gradient in registers and adds the sum with one relaxed fp32 atomic per
element, instead of one atomic per element per (b, h): 256-way contention on every element at
B = 256 becomes 7-way at ViT-S/16 (`shared_grad_groups`). Under
`torch.use_deterministic_algorithms(True)`, or when the tiles alone fill the GPU, one group
takes every pair and stores in a fixed order. A Gaussian-mixture bias (`gmm`: bias[h] =
Σ_k w[h, k] · exp(−d² / (2σ[h, k]²)) over the patch grid, built dense by one launch,
`gaussian_mixture_bias`) has the same pass reduce each tile of the summed ds against its K
Gaussians: 2K partial sums per program (Σ ds·G for w, w/σ² · Σ ds·G·d² for log σ), summed after
in a fixed order, so no [H, N, N] gradient and no atomics.

Launch geometry (`tiling`): a 1-D grid of (sequence block, b·h) pairs, sequence blocks fastest,
so any batch fits CUDA's grid limits; head indices are int64, so offsets past 2³¹ do not wrap.
Each program owns BLOCK_M positions (the M side of its matmuls, 64 for fp16/bf16 so that they
run as Hopper warpgroup MMAs); the last one takes the N mod BLOCK_M leftover positions in a
TAIL_M-row tile (≥ 16 rows; below 64 it runs as mma.sync). The other side streams in full
BLOCK_N blocks with no mask, then the N mod BLOCK_N last positions in one masked TAIL_N-wide
tile (≥ 16), or, when exactly one is left (N = 65, 257, 577: a class token after a multiple of
the block), as a rank-1 update on CUDA cores. That split geometry serves fp16/bf16 at D = 32
and 64 from N ≥ BLOCK_M (`SPLIT_TILES`); the other paths (FMA fp32, tf32, D = 16 and 128, short
sequences) stream every block through one masked loop, their dk/dv programs owning BLOCK_N keys
in the [queries, keys] form. Tiles come from `TILES` by dot precision and head dim, with a mask
amended by `MASK_TILES` (no kernel spills on sm_80 or sm_90a).

Layouts: q, k, v, out are [B, H, N, D] views with unit stride on D and any other strides, so a
packed qkv [B, N, 3·H·D] is read in place and the packed output [B, N, H·D] is written in place.
bias and mask are [H, N, N] or [B, H, N, N] (1 broadcasts over B and H), any float dtype and
strides (read as fp32), gradients in their own dtype. Forward and backward are custom ops.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import on_device

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. PRECISION: "half" for fp16/bf16 operands, "tf32" or "ieee"
    for fp32 ones, "upcast" multiplies bf16 in fp32 (Triton's CPU interpreter mis-multiplies
    bfloat16 operands, so the launcher picks it there)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "half":
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _bias_tile(BIAS, b, h, qi, ki, stride_bb, stride_bh, stride_bm, stride_bn, ok, MASKED: tl.constexpr):
    """bias[b, h, qi, ki] in log2 units, for broadcastable query / key index tensors; `ok` masks
    the load when MASKED (indices past the sequence read 0)."""
    ptrs = BIAS + b * stride_bb + h * stride_bh + qi * stride_bm + ki * stride_bn
    if MASKED:
        return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        return tl.load(ptrs).to(tl.float32) * 1.4426950408889634


@triton.jit
def _mask_tile(
    MASK, b, h, qi, ki, N, stride_mb, stride_mh, stride_mm, stride_mn,
    HAS_MASK: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
):
    """mask[b, h, qi, ki] in fp32 (the multiplicative mask) for broadcastable query / key index
    tensors, loaded under the same masks as `_scores`' bias (indices past the sequence read 0);
    1.0, never read, without a mask."""
    if HAS_MASK:
        ptrs = MASK + b * stride_mb + h * stride_mh + qi * stride_mm + ki * stride_mn
        if MASK_Q:
            return tl.load(ptrs, mask=(qi < N) & (ki < N), other=0.0).to(tl.float32)
        elif MASK_K:
            return tl.load(ptrs, mask=ki < N, other=0.0).to(tl.float32)
        else:
            return tl.load(ptrs).to(tl.float32)
    else:
        return 1.0


@triton.jit
def _scores(
    qk, qi, ki, scale_log2, b, h, N,
    BIAS, stride_bb, stride_bh, stride_bm, stride_bn,
    HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
):
    """Scores s = scale·q·k + bias in log2 units for query / key indices qi, ki (broadcastable
    to qk's shape): −∞ for keys past the sequence (when MASK_K) and on the masked diagonal.
    MASK_Q / MASK_K say whether qi / ki may run past the sequence (a tail tile); full tiles
    skip every mask."""
    s = qk * scale_log2
    if HAS_BIAS:
        if MASK_Q:
            s += _bias_tile(BIAS, b, h, qi, ki, stride_bb, stride_bh, stride_bm, stride_bn, (qi < N) & (ki < N), True)
        elif MASK_K:
            s += _bias_tile(BIAS, b, h, qi, ki, stride_bb, stride_bh, stride_bm, stride_bn, ki < N, True)
        else:
            s += _bias_tile(BIAS, b, h, qi, ki, stride_bb, stride_bh, stride_bm, stride_bn, ki < N, False)
    if MASK_K:
        s = tl.where(ki < N, s, float("-inf"))
    if DIAGONAL_MASK:
        s = tl.where(qi != ki, s, float("-inf"))
    return s


@triton.jit
def _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR: tl.constexpr):
    if HAS_SCALE_TENSOR:
        return tl.load(SCALE + h * stride_sh).to(tl.float32)
    else:
        return scale_value


@triton.jit
def _program(N, H, BLOCK: tl.constexpr):
    """(block index along the sequence, b·h, b, h) of this program. The grid is 1-D, sequence
    blocks fastest (so a head's programs run together and share its K/V in L2), and the head
    indices are int64, so offsets such as b·stride_b cannot wrap at large batches."""
    blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    bh = (pid // blocks).to(tl.int64)
    return pid % blocks, bh, bh // H, bh % H


@triton.jit
def _tile(X, b, h, tokens, offs_d, stride_b, stride_h, stride_n):
    """Pointers to the rows ``tokens`` of head (b, h) of a [B, H, N, D] view (unit stride on D)."""
    return X + b * stride_b + h * stride_h + tokens[:, None] * stride_n + offs_d[None, :]


@triton.jit
def _load_rows(ptrs, ok, MASKED: tl.constexpr):
    """A [rows, D] tile; rows past the sequence read 0 when MASKED."""
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_vec(ptrs, ok, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store_rows(ptrs, x, ok, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=ok[:, None])
    else:
        tl.store(ptrs, x)


@triton.jit
def _rescale(m_i, m_block):
    """Online softmax: the new running row max, its finite stand-in (0 for a row with nothing to
    attend to yet) and the factor that rescales what was accumulated (log2 units)."""
    m_new = tl.maximum(m_i, m_block)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_safe, tl.math.exp2(m_i - m_safe)


@triton.jit
def _fwd_step(m_i, l_i, acc, s, v, mk, PRECISION: tl.constexpr, HAS_MASK: tl.constexpr):
    """One online-softmax step over a [rows, keys] score tile s (log2 units) and its values v;
    with a mask, the denominator l_i keeps the unmasked p and only p ⊙ mk meets v."""
    m_new, m_safe, alpha = _rescale(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_MASK:
        p = p * mk
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_rows(
    Q, K, V, O, LSE, BIAS, MASK, b, h, bh, start_m, scale_log2,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn, N,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, MASK_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Forward of the query rows start_m + [0, ROWS) of head (b, h)."""
    rows = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    row_ok = rows < N
    q = _load_rows(_tile(Q, b, h, rows, offs_d, stride_qb, stride_qh, stride_qn), row_ok, MASK_ROWS)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    if SPLIT:
        full_n = (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_n, BLOCK_N):  # full key blocks: no key mask
            cols = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K_bh + cols[:, None] * stride_kn + offs_d[None, :])
            s = _scores(_mm(q, tl.trans(k), PRECISION), rows[:, None], cols[None, :], scale_log2, b, h, N,
                        BIAS, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, MASK_ROWS, False)
            v = tl.load(V_bh + cols[:, None] * stride_vn + offs_d[None, :])
            mk = _mask_tile(MASK, b, h, rows[:, None], cols[None, :], N, stride_mb, stride_mh, stride_mm, stride_mn,
                            HAS_MASK, MASK_ROWS, False)
            m_i, l_i, acc = _fwd_step(m_i, l_i, acc, s, v, mk, PRECISION, HAS_MASK)
    else:
        full_n = 0
    if TAIL_N > 1:  # SPLIT: the last N mod BLOCK_N keys in one narrow masked tile; else every block, masked
        for start_n in range(full_n, N, TAIL_N):
            cols = start_n + tl.arange(0, TAIL_N)
            col_ok = cols[:, None] < N
            k = tl.load(K_bh + cols[:, None] * stride_kn + offs_d[None, :], mask=col_ok, other=0.0)
            s = _scores(_mm(q, tl.trans(k), PRECISION), rows[:, None], cols[None, :], scale_log2, b, h, N,
                        BIAS, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, MASK_ROWS, True)
            v = tl.load(V_bh + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok, other=0.0)
            mk = _mask_tile(MASK, b, h, rows[:, None], cols[None, :], N, stride_mb, stride_mh, stride_mm, stride_mn,
                            HAS_MASK, MASK_ROWS, True)
            m_i, l_i, acc = _fwd_step(m_i, l_i, acc, s, v, mk, PRECISION, HAS_MASK)
    if TAIL_N == 1:  # one last key (N = BLOCK_N·n + 1, a class token): a rank-1 update on CUDA cores
        c = N - 1
        c_rows = c + 0 * rows  # per row: the interpreter turns a scalar c < N & a row mask into an int32 mask
        k_c = tl.load(K_bh + c * stride_kn + offs_d).to(tl.float32)
        v_c = tl.load(V_bh + c * stride_vn + offs_d).to(tl.float32)
        s_c = _scores(tl.sum(q.to(tl.float32) * k_c[None, :], 1), rows, c_rows, scale_log2, b, h, N,
                      BIAS, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, MASK_ROWS, False)
        m_new, m_safe, alpha = _rescale(m_i, s_c)
        p_c = tl.math.exp2(s_c - m_safe)
        l_i = l_i * alpha + p_c
        if HAS_MASK:
            p_c = p_c * _mask_tile(MASK, b, h, rows, c_rows, N, stride_mb, stride_mh, stride_mm, stride_mn,
                                   HAS_MASK, MASK_ROWS, False)
        acc = acc * alpha[:, None] + p_c[:, None] * v_c[None, :]
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_rows(_tile(O, b, h, rows, offs_d, stride_ob, stride_oh, stride_on), acc.to(O.dtype.element_ty),
                row_ok, MASK_ROWS)
    if MASK_ROWS:
        tl.store(LSE + bh * N + rows, m_i + tl.math.log2(l_i), mask=row_ok)  # log2 units
    else:
        tl.store(LSE + bh * N + rows, m_i + tl.math.log2(l_i))


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, SCALE, BIAS, MASK, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    pid_m, bh, b, h = _program(N, H, BLOCK_M)
    scale_log2 = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR) * 1.4426950408889634
    # programs below N // BLOCK_M take full BLOCK_M-row tiles, the last one the N mod BLOCK_M
    # leftover rows in a TAIL_M-row tile (TAIL_M = BLOCK_M, never taken, when N divides)
    if SPLIT:
        if pid_m < N // BLOCK_M:
            _fwd_rows(Q, K, V, O, LSE, BIAS, MASK, b, h, bh, pid_m * BLOCK_M, scale_log2,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_on, stride_bb, stride_bh, stride_bm, stride_bn,
                      stride_mb, stride_mh, stride_mm, stride_mn, N,
                      D, BLOCK_M, BLOCK_N, TAIL_N, False, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK)
        else:
            _fwd_rows(Q, K, V, O, LSE, BIAS, MASK, b, h, bh, pid_m * BLOCK_M, scale_log2,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_on, stride_bb, stride_bh, stride_bm, stride_bn,
                      stride_mb, stride_mh, stride_mm, stride_mn, N,
                      D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK)
    else:  # one masked geometry (TAIL_M = BLOCK_M, every key block masked)
        _fwd_rows(Q, K, V, O, LSE, BIAS, MASK, b, h, bh, pid_m * BLOCK_M, scale_log2,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_ob, stride_oh, stride_on, stride_bb, stride_bh, stride_bm, stride_bn,
                  stride_mb, stride_mh, stride_mm, stride_mn, N,
                  D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK)


@triton.jit
def _dbias_write(DBIAS, b, h, qi, ki, ds, stride_gb, stride_gh, stride_gm, stride_gn, ok, MASKED: tl.constexpr):
    """dbias[b, h, qi, ki] = ds (or dmask = p ⊙ dp) of a per-batch map: one program per element."""
    ptrs = DBIAS + b * stride_gb + h * stride_gh + qi * stride_gm + ki * stride_gn
    if MASKED:
        tl.store(ptrs, ds, mask=ok)
    else:
        tl.store(ptrs, ds)


@triton.jit
def _dq_rows(
    Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE_PARTIAL, DBIAS, BIAS, MASK, DMASK, b, h, bh, slot, start_m, scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_gb, stride_gh, stride_gm, stride_gn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dmb, stride_dmh, stride_dmm, stride_dmn, N,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, MASK_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DBIAS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_DMASK: tl.constexpr,
):
    """δ, dq, dbias, dmask and the dscale partial (stored at `slot`) of the query rows
    start_m + [0, ROWS) of head (b, h)."""
    rows = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    row_ok = rows < N
    q = _load_rows(_tile(Q, b, h, rows, offs_d, stride_qb, stride_qh, stride_qn), row_ok, MASK_ROWS)
    do = _load_rows(_tile(DO, b, h, rows, offs_d, stride_dob, stride_doh, stride_don), row_ok, MASK_ROWS)
    o = _load_rows(_tile(O, b, h, rows, offs_d, stride_ob, stride_oh, stride_on), row_ok, MASK_ROWS)
    lse = _load_vec(LSE + bh * N + rows, row_ok, MASK_ROWS)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # δ_m = dout_m · out_m
    if MASK_ROWS:  # for the dk/dv kernel, launched next
        tl.store(DELTA + bh * N + rows, delta, mask=row_ok)
    else:
        tl.store(DELTA + bh * N + rows, delta)
    scale_log2 = scale * 1.4426950408889634
    dq = tl.zeros([ROWS, D], dtype=tl.float32)
    dscale = tl.zeros([ROWS], dtype=tl.float32)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    if SPLIT:
        full_n = (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_n, BLOCK_N):  # full key blocks: no key mask
            cols = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K_bh + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(V_bh + cols[:, None] * stride_vn + offs_d[None, :])
            qk = _mm(q, tl.trans(k), PRECISION)
            s = _scores(qk, rows[:, None], cols[None, :], scale_log2, b, h, N, BIAS,
                        stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, MASK_ROWS, False)
            p = tl.math.exp2(s - lse[:, None])
            if MASK_ROWS:
                p = tl.where(row_ok[:, None], p, 0.0)
            dp = _mm(do, tl.trans(v), PRECISION)
            if HAS_MASK:  # ds = p ⊙ (mask ⊙ dp − δ)
                mk = _mask_tile(MASK, b, h, rows[:, None], cols[None, :], N, stride_mb, stride_mh, stride_mm,
                                stride_mn, HAS_MASK, MASK_ROWS, False)
                ds = p * (mk * dp - delta[:, None])
            else:
                ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PRECISION)
            if NEED_DSCALE:
                dscale += tl.sum(tl.where(ds != 0.0, ds * qk, 0.0), 1)
            if NEED_DBIAS:
                _dbias_write(DBIAS, b, h, rows[:, None], cols[None, :], ds, stride_gb, stride_gh, stride_gm,
                             stride_gn, row_ok[:, None], MASK_ROWS)
            if NEED_DMASK:  # dmask = p ⊙ dp
                _dbias_write(DMASK, b, h, rows[:, None], cols[None, :], p * dp, stride_dmb, stride_dmh, stride_dmm,
                             stride_dmn, row_ok[:, None], MASK_ROWS)
    else:
        full_n = 0
    if TAIL_N > 1:  # SPLIT: the last N mod BLOCK_N keys in one narrow masked tile; else every block, masked
        for start_n in range(full_n, N, TAIL_N):
            cols = start_n + tl.arange(0, TAIL_N)
            col_ok = cols < N
            k = tl.load(K_bh + cols[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V_bh + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            qk = _mm(q, tl.trans(k), PRECISION)
            s = _scores(qk, rows[:, None], cols[None, :], scale_log2, b, h, N, BIAS,
                        stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, MASK_ROWS, True)
            p = tl.where(row_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = _mm(do, tl.trans(v), PRECISION)
            if HAS_MASK:
                mk = _mask_tile(MASK, b, h, rows[:, None], cols[None, :], N, stride_mb, stride_mh, stride_mm,
                                stride_mn, HAS_MASK, MASK_ROWS, True)
                ds = p * (mk * dp - delta[:, None])
            else:
                ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PRECISION)
            if NEED_DSCALE:
                dscale += tl.sum(tl.where(ds != 0.0, ds * qk, 0.0), 1)
            if NEED_DBIAS:
                _dbias_write(DBIAS, b, h, rows[:, None], cols[None, :], ds, stride_gb, stride_gh, stride_gm,
                             stride_gn, row_ok[:, None] & col_ok[None, :], True)
            if NEED_DMASK:
                _dbias_write(DMASK, b, h, rows[:, None], cols[None, :], p * dp, stride_dmb, stride_dmh, stride_dmm,
                             stride_dmn, row_ok[:, None] & col_ok[None, :], True)
    if TAIL_N == 1:  # one last key: rank-1 on CUDA cores
        c = N - 1
        c_rows = c + 0 * rows  # per row: the interpreter turns a scalar c < N & a row mask into an int32 mask
        k_c = tl.load(K_bh + c * stride_kn + offs_d).to(tl.float32)
        v_c = tl.load(V_bh + c * stride_vn + offs_d).to(tl.float32)
        qk_c = tl.sum(q.to(tl.float32) * k_c[None, :], 1)
        s_c = _scores(qk_c, rows, c_rows, scale_log2, b, h, N, BIAS,
                      stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, MASK_ROWS, False)
        p_c = tl.math.exp2(s_c - lse)
        if MASK_ROWS:
            p_c = tl.where(row_ok, p_c, 0.0)
        dp_c = tl.sum(do.to(tl.float32) * v_c[None, :], 1)
        if HAS_MASK:
            m_c = _mask_tile(MASK, b, h, rows, c_rows, N, stride_mb, stride_mh, stride_mm, stride_mn,
                             HAS_MASK, MASK_ROWS, False)
            ds_c = p_c * (m_c * dp_c - delta)
        else:
            ds_c = p_c * (dp_c - delta)
        dq += ds_c[:, None] * k_c[None, :]
        if NEED_DSCALE:
            dscale += tl.where(ds_c != 0.0, ds_c * qk_c, 0.0)
        if NEED_DBIAS:
            _dbias_write(DBIAS, b, h, rows, c, ds_c, stride_gb, stride_gh, stride_gm, stride_gn, row_ok,
                         MASK_ROWS)
        if NEED_DMASK:
            _dbias_write(DMASK, b, h, rows, c, p_c * dp_c, stride_dmb, stride_dmh, stride_dmm, stride_dmn, row_ok,
                         MASK_ROWS)
    if NEED_DSCALE:  # Σ_{m, n} ds[m, n] · (q_m · k_n) over this block's rows, from fp32 ds
        tl.store(DSCALE_PARTIAL + slot, tl.sum(dscale, 0))
    dq = dq * scale
    _store_rows(_tile(DQ, b, h, rows, offs_d, stride_dqb, stride_dqh, stride_dqn), dq.to(DQ.dtype.element_ty),
                row_ok, MASK_ROWS)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE_PARTIAL, DBIAS, SCALE, BIAS, MASK, DMASK, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_gb, stride_gh, stride_gm, stride_gn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DBIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_DMASK: tl.constexpr,
):
    pid_m, bh, b, h = _program(N, H, BLOCK_M)
    scale = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR)
    slot = bh * tl.cdiv(N, BLOCK_M) + pid_m
    if SPLIT:
        if pid_m < N // BLOCK_M:  # full query blocks, then the leftover rows in a TAIL_M-row tile
            _dq_rows(Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE_PARTIAL, DBIAS, BIAS, MASK, DMASK, b, h, bh, slot, pid_m * BLOCK_M, scale,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh,
                     stride_dqn, stride_bb, stride_bh, stride_bm, stride_bn, stride_gb, stride_gh, stride_gm, stride_gn,
                     stride_mb, stride_mh, stride_mm, stride_mn, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                     N, D, BLOCK_M, BLOCK_N, TAIL_N, False, HAS_BIAS, DIAGONAL_MASK, PRECISION,
                     NEED_DSCALE, NEED_DBIAS, SPLIT, HAS_MASK, NEED_DMASK)
        else:
            _dq_rows(Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE_PARTIAL, DBIAS, BIAS, MASK, DMASK, b, h, bh, slot, pid_m * BLOCK_M, scale,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh,
                     stride_dqn, stride_bb, stride_bh, stride_bm, stride_bn, stride_gb, stride_gh, stride_gm, stride_gn,
                     stride_mb, stride_mh, stride_mm, stride_mn, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                     N, D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_BIAS, DIAGONAL_MASK, PRECISION,
                     NEED_DSCALE, NEED_DBIAS, SPLIT, HAS_MASK, NEED_DMASK)
    else:  # one masked geometry (TAIL_M = BLOCK_M, every key block masked)
        _dq_rows(Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE_PARTIAL, DBIAS, BIAS, MASK, DMASK, b, h, bh, slot, pid_m * BLOCK_M, scale,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh,
                 stride_dqn, stride_bb, stride_bh, stride_bm, stride_bn, stride_gb, stride_gh, stride_gm, stride_gn,
                 stride_mb, stride_mh, stride_mm, stride_mn, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                 N, D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_BIAS, DIAGONAL_MASK, PRECISION,
                 NEED_DSCALE, NEED_DBIAS, SPLIT, HAS_MASK, NEED_DMASK)


@triton.jit
def _add_dq(ACC, kt, dst, dst_in, qkt, dscale, offs_d, qs, q_ok, N, PRECISION: tl.constexpr, MASK_Q: tl.constexpr,
            NEED_DSCALE: tl.constexpr):
    """The fused backward's share of one [keys, queries] tile: dqᵀ = kᵀ·dsᵀ added into the [D, N]
    scratch ACC (queries past N masked when MASK_Q), and Σ dsᵀ ⊙ (k·qᵀ) into the per-key dscale."""
    ptrs = ACC + offs_d[:, None] * N + qs[None, :]
    if MASK_Q:
        tl.atomic_add(ptrs, _mm(kt, dst_in, PRECISION), mask=q_ok[None, :], sem="relaxed")
    else:
        tl.atomic_add(ptrs, _mm(kt, dst_in, PRECISION), sem="relaxed")
    if NEED_DSCALE:
        dscale += tl.sum(tl.where(dst != 0.0, dst * qkt, 0.0), 1)
    return dscale


@triton.jit
def _dkdv_keys(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, ACC, b, h, bh, start_n, scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn, N,
    D: tl.constexpr, KEYS: tl.constexpr, BLOCK_Q: tl.constexpr, TAIL_Q: tl.constexpr, MASK_KEYS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr, FUSED: tl.constexpr = False, NEED_DSCALE: tl.constexpr = False,
):
    """dk, dv of the keys start_n + [0, KEYS) of head (b, h). SPLIT: in the transposed form,
    sᵀ = k·qᵀ, pᵀ, dsᵀ are born [keys, queries], the layout their matmuls with dout and q need
    (the mask tile is loaded as maskᵀ by index, [keys, queries]); else one masked loop in the
    [queries, keys] form. FUSED (SPLIT only): also adds these keys' share of dq / scale, as
    dqᵀ = kᵀ·dsᵀ ([D, queries], dsᵀ as the B operand it is born as), into the [D, N] fp32
    scratch ACC, and returns their share of the dscale sum (0 unless NEED_DSCALE)."""
    keys = start_n + tl.arange(0, KEYS)
    offs_d = tl.arange(0, D)
    key_ok = keys < N
    scale_log2 = scale * 1.4426950408889634
    dk = tl.zeros([KEYS, D], dtype=tl.float32)
    dv = tl.zeros([KEYS, D], dtype=tl.float32)
    dscale = tl.zeros([KEYS], dtype=tl.float32)
    Q_bh = Q + b * stride_qb + h * stride_qh
    DO_bh = DO + b * stride_dob + h * stride_doh
    if TAIL_Q == 1:  # one last query (N mod BLOCK_Q = 1): rank-1 on CUDA cores, first, with its own
        r = N - 1  # loads of k and v (after the query loop, reusing its tiles, the fused backward spilled)
        k_r = _load_rows(_tile(K, b, h, keys, offs_d, stride_kb, stride_kh, stride_kn), key_ok, MASK_KEYS)
        v_r = _load_rows(_tile(V, b, h, keys, offs_d, stride_vb, stride_vh, stride_vn), key_ok, MASK_KEYS)
        q_r = tl.load(Q_bh + r * stride_qn + offs_d).to(tl.float32)
        do_r = tl.load(DO_bh + r * stride_don + offs_d).to(tl.float32)
        lse_r = tl.load(LSE + bh * N + r)
        delta_r = tl.load(DELTA + bh * N + r)
        qk_r = tl.sum(k_r.to(tl.float32) * q_r[None, :], 1)
        st_r = _scores(qk_r, r, keys, scale_log2, b, h, N, BIAS,
                       stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, False, MASK_KEYS)
        pt_r = tl.math.exp2(st_r - lse_r)
        dp_r = tl.sum(v_r.to(tl.float32) * do_r[None, :], 1)
        if HAS_MASK:
            m_r = _mask_tile(MASK, b, h, r, keys, N, stride_mb, stride_mh, stride_mm, stride_mn,
                             HAS_MASK, False, MASK_KEYS)
            dst_r = pt_r * (m_r * dp_r - delta_r)
            pt_r = pt_r * m_r
        else:
            dst_r = pt_r * (dp_r - delta_r)
        dv += pt_r[:, None] * do_r[None, :]
        dk += dst_r[:, None] * q_r[None, :]
        if FUSED:
            tl.atomic_add(ACC + offs_d * N + r, tl.sum(dst_r[:, None] * k_r.to(tl.float32), 0), sem="relaxed")
            if NEED_DSCALE:
                dscale += tl.where(dst_r != 0.0, dst_r * qk_r, 0.0)
    k = _load_rows(_tile(K, b, h, keys, offs_d, stride_kb, stride_kh, stride_kn), key_ok, MASK_KEYS)
    v = _load_rows(_tile(V, b, h, keys, offs_d, stride_vb, stride_vh, stride_vn), key_ok, MASK_KEYS)
    if FUSED:
        kt = tl.trans(k)  # [D, keys], the A operand of dqᵀ = kᵀ·dsᵀ
    if SPLIT:
        full_m = (N // BLOCK_Q) * BLOCK_Q
        for start_m in range(0, full_m, BLOCK_Q):  # full query blocks: no query mask
            qs = start_m + tl.arange(0, BLOCK_Q)
            q = tl.load(Q_bh + qs[:, None] * stride_qn + offs_d[None, :])
            do = tl.load(DO_bh + qs[:, None] * stride_don + offs_d[None, :])
            lse = tl.load(LSE + bh * N + qs)
            delta = tl.load(DELTA + bh * N + qs)
            qkt = _mm(k, tl.trans(q), PRECISION)
            st = _scores(qkt, qs[None, :], keys[:, None], scale_log2, b, h, N, BIAS,
                         stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, False, MASK_KEYS)
            pt = tl.math.exp2(st - lse[None, :])
            if HAS_MASK:  # dvᵀ-side: (pᵀ ⊙ maskᵀ)·dout; dsᵀ = pᵀ ⊙ (maskᵀ ⊙ dpᵀ − δ)
                mkt = _mask_tile(MASK, b, h, qs[None, :], keys[:, None], N, stride_mb, stride_mh, stride_mm,
                                 stride_mn, HAS_MASK, False, MASK_KEYS)
                dv += _mm((pt * mkt).to(do.dtype), do, PRECISION)
                dst = pt * (mkt * _mm(v, tl.trans(do), PRECISION) - delta[None, :])
            else:
                dv += _mm(pt.to(do.dtype), do, PRECISION)
                dst = pt * (_mm(v, tl.trans(do), PRECISION) - delta[None, :])
            dst_in = dst.to(q.dtype)
            dk += _mm(dst_in, q, PRECISION)
            if FUSED:
                dscale = _add_dq(ACC, kt, dst, dst_in, qkt, dscale, offs_d, qs, qs < N, N, PRECISION, False,
                                 NEED_DSCALE)
    else:
        full_m = 0
    if not SPLIT:  # one masked loop in the [queries, keys] form (the transposed one spills on these paths)
        for start_m in range(0, N, BLOCK_Q):
            qs = start_m + tl.arange(0, BLOCK_Q)
            q_ok = qs < N
            q = tl.load(Q_bh + qs[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            do = tl.load(DO_bh + qs[:, None] * stride_don + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh * N + qs, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + bh * N + qs, mask=q_ok, other=0.0)
            s = _scores(_mm(q, tl.trans(k), PRECISION), qs[:, None], keys[None, :], scale_log2, b, h, N, BIAS,
                        stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, True, MASK_KEYS)
            p = tl.where(q_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            if HAS_MASK:
                mk = _mask_tile(MASK, b, h, qs[:, None], keys[None, :], N, stride_mb, stride_mh, stride_mm,
                                stride_mn, HAS_MASK, True, MASK_KEYS)
                dv += _mm(tl.trans((p * mk).to(do.dtype)), do, PRECISION)
                ds = p * (mk * _mm(do, tl.trans(v), PRECISION) - delta[:, None])
            else:
                dv += _mm(tl.trans(p.to(do.dtype)), do, PRECISION)
                ds = p * (_mm(do, tl.trans(v), PRECISION) - delta[:, None])
            dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION)
    elif TAIL_Q > 1:  # the last N mod BLOCK_Q queries in one narrow masked tile
        for start_m in range(full_m, N, TAIL_Q):
            qs = start_m + tl.arange(0, TAIL_Q)
            q_ok = qs < N
            q = tl.load(Q_bh + qs[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            do = tl.load(DO_bh + qs[:, None] * stride_don + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh * N + qs, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + bh * N + qs, mask=q_ok, other=0.0)
            qkt = _mm(k, tl.trans(q), PRECISION)
            st = _scores(qkt, qs[None, :], keys[:, None], scale_log2, b, h, N, BIAS,
                         stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, True, MASK_KEYS)
            pt = tl.where(q_ok[None, :], tl.math.exp2(st - lse[None, :]), 0.0)
            if HAS_MASK:
                mkt = _mask_tile(MASK, b, h, qs[None, :], keys[:, None], N, stride_mb, stride_mh, stride_mm,
                                 stride_mn, HAS_MASK, True, MASK_KEYS)
                dv += _mm((pt * mkt).to(do.dtype), do, PRECISION)
                dst = pt * (mkt * _mm(v, tl.trans(do), PRECISION) - delta[None, :])
            else:
                dv += _mm(pt.to(do.dtype), do, PRECISION)
                dst = pt * (_mm(v, tl.trans(do), PRECISION) - delta[None, :])
            dst_in = dst.to(q.dtype)
            dk += _mm(dst_in, q, PRECISION)
            if FUSED:
                dscale = _add_dq(ACC, kt, dst, dst_in, qkt, dscale, offs_d, qs, q_ok, N, PRECISION, True,
                                 NEED_DSCALE)
    dk = dk * scale
    _store_rows(_tile(DK, b, h, keys, offs_d, stride_dkb, stride_dkh, stride_dkn), dk.to(DK.dtype.element_ty),
                key_ok, MASK_KEYS)
    _store_rows(_tile(DV, b, h, keys, offs_d, stride_dvb, stride_dvh, stride_dvn), dv.to(DV.dtype.element_ty),
                key_ok, MASK_KEYS)
    return tl.sum(dscale, 0)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SCALE, BIAS, MASK, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """One program per block of BLOCK_M keys (the tile's M side), streaming queries BLOCK_N at a time."""
    pid_n, bh, b, h = _program(N, H, BLOCK_M)
    scale = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR)
    if SPLIT:
        if pid_n < N // BLOCK_M:  # full key blocks, then the leftover keys in a TAIL_M-row tile
            _dkdv_keys(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, DK, b, h, bh, pid_n * BLOCK_M, scale,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                       stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                       stride_dvn, stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn, N,
                       D, BLOCK_M, BLOCK_N, TAIL_N, False, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK)
        else:
            _dkdv_keys(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, DK, b, h, bh, pid_n * BLOCK_M, scale,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                       stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                       stride_dvn, stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn, N,
                       D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK)
    else:  # one masked geometry (TAIL_M = BLOCK_M, every key block masked)
        _dkdv_keys(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, DK, b, h, bh, pid_n * BLOCK_M, scale,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                   stride_dvn, stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn, N,
                   D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK)


@triton.jit
def _attention_bwd_fused_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, DQ_ACC, DSCALE_PARTIAL, SCALE, BIAS, MASK, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N, BH,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr, NEED_DSCALE: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """The whole backward of a (b, h) pair in one program, 5 N²D matmuls: a persistent grid, each
    program taking pairs pid, pid + programs, ... with its own [D, N] fp32 dq scratch (L2-sized:
    one per program, not per pair). For each pair it (1) writes δ of every query, (2) runs the
    dk/dv kernel's key blocks with FUSED, which also add dqᵀ = kᵀ·dsᵀ into the scratch, and (3)
    swaps the scratch for zeros, storing what it held as dq · scale. No other program touches the
    scratch, and every access to it is atomic (ordered among the program's threads by its
    barriers, with no L1 between); a barrier after each key block orders the adds, so the sum is
    deterministic."""
    tl.static_assert(SPLIT, "the fused backward takes the split geometry only")
    pid = tl.program_id(0)
    ACC = DQ_ACC + pid.to(tl.int64) * (D * N)
    ACC_BITS = ACC.to(tl.pointer_type(tl.int32), bitcast=True)  # swapped as bits (0.0 is 0)
    offs_d = tl.arange(0, D)
    for start in tl.range(0, N, BLOCK_N, num_stages=1):  # the scratch zeroed once; step (3) leaves it zeroed
        rows = start + tl.arange(0, BLOCK_N)
        tl.atomic_xchg(ACC_BITS + offs_d[:, None] * N + rows[None, :], tl.zeros([D, BLOCK_N], dtype=tl.int32),
                       mask=(rows < N)[None, :], sem="relaxed")
    tl.debug_barrier()
    programs = tl.num_programs(0)
    blocks = tl.cdiv(N, BLOCK_M)
    dscale = 0.0
    # one step per (pair, key block), the pair's key blocks in order; the full and leftover key
    # blocks are two branches of one step (as two steps in sequence, their code held ~100 more registers)
    for step in tl.range(0, tl.cdiv(BH - pid, programs) * blocks, num_stages=1):
        kb = step % blocks
        bh = (pid + (step // blocks) * programs).to(tl.int64)
        b = bh // H
        h = bh % H
        scale = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR)
        if kb == 0:
            dscale = 0.0
            for start in tl.range(0, N, BLOCK_N, num_stages=1):  # (1) δ_m = dout_m · out_m
                rows = start + tl.arange(0, BLOCK_N)
                row_ok = rows < N
                do = tl.load(_tile(DO, b, h, rows, offs_d, stride_dob, stride_doh, stride_don),
                             mask=row_ok[:, None], other=0.0)
                o = tl.load(_tile(O, b, h, rows, offs_d, stride_ob, stride_oh, stride_on), mask=row_ok[:, None],
                            other=0.0)
                tl.store(DELTA + bh * N + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=row_ok)
            tl.debug_barrier()
        if kb < N // BLOCK_M:  # (2) a full key block, or the leftover keys
            dscale += _dkdv_keys(
                Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, ACC, b, h, bh, kb * BLOCK_M, scale,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                stride_dvn, stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
                N, D, BLOCK_M, BLOCK_N, TAIL_N, False, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK,
                True, NEED_DSCALE)
        else:
            dscale += _dkdv_keys(
                Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, MASK, ACC, b, h, bh, kb * BLOCK_M, scale,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                stride_dvn, stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
                N, D, TAIL_M, BLOCK_N, TAIL_N, True, HAS_BIAS, DIAGONAL_MASK, PRECISION, SPLIT, HAS_MASK,
                True, NEED_DSCALE)
        tl.debug_barrier()  # orders this block's adds before the next block's (a deterministic sum)
        if kb == blocks - 1:
            if NEED_DSCALE:
                tl.store(DSCALE_PARTIAL + bh, dscale)
            for start in tl.range(0, N, BLOCK_N, num_stages=1):  # (3) dq = scale · scratchᵀ; scratch zeroed
                rows = start + tl.arange(0, BLOCK_N)
                row_ok = rows < N
                bits = tl.atomic_xchg(ACC_BITS + offs_d[None, :] * N + rows[:, None],
                                      tl.zeros([BLOCK_N, D], dtype=tl.int32), mask=row_ok[:, None], sem="relaxed")
                dq = bits.to(tl.float32, bitcast=True) * scale
                tl.store(_tile(DQ, b, h, rows, offs_d, stride_dqb, stride_dqh, stride_dqn),
                         dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
            tl.debug_barrier()  # the next pair's adds wait for every read of this one


@triton.jit
def _gmm_sq_dist(rows, cols, grid):
    """(‖pos_i − pos_j‖² in patches as fp32, whether both are patches) for token indices rows ×
    cols: token t ≥ 1 is patch t − 1 of a grid-wide square grid, row-major; token 0 is none."""
    pr = tl.maximum(rows - 1, 0)
    pc = tl.maximum(cols - 1, 0)
    dy = (pr // grid)[:, None] - (pc // grid)[None, :]
    dx = (pr % grid)[:, None] - (pc % grid)[None, :]
    return (dy * dy + dx * dx).to(tl.float32), (rows >= 1)[:, None] & (cols >= 1)[None, :]


@triton.jit
def _gmm_gaussian(GMM_W, GMM_LS, h, kk, d2, GMM_KERNELS: tl.constexpr):
    """(weight[h, kk], 1 / σ[h, kk]², exp(−d2 / (2σ[h, kk]²))) of Gaussian kk of head h."""
    w = tl.load(GMM_W + h * GMM_KERNELS + kk).to(tl.float32)
    inv_var = tl.exp(-2.0 * tl.load(GMM_LS + h * GMM_KERNELS + kk).to(tl.float32))
    return w, inv_var, tl.math.exp2(d2 * (inv_var * (-0.5 * 1.4426950408889634)))


@triton.jit
def _attention_gmm_bias_kernel(GMM_W, GMM_LS, BIAS, N, grid, GMM_KERNELS: tl.constexpr, BLOCK: tl.constexpr):
    """The dense [H, N, N] fp32 bias of a Gaussian mixture: one program per (BLOCK × BLOCK tile,
    head)."""
    tiles_n = tl.cdiv(N, BLOCK)
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = (t // tiles_n) * BLOCK + tl.arange(0, BLOCK)
    cols = (t % tiles_n) * BLOCK + tl.arange(0, BLOCK)
    d2, patches = _gmm_sq_dist(rows, cols, grid)
    bias = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for kk in tl.static_range(GMM_KERNELS):
        w, inv_var, g = _gmm_gaussian(GMM_W, GMM_LS, h, kk, d2, GMM_KERNELS)
        bias += w * g
    ok = (rows < N)[:, None] & (cols < N)[None, :]
    tl.store(BIAS + h * N * N + rows[:, None] * N + cols[None, :], tl.where(patches, bias, 0.0), mask=ok)


@triton.jit
def _shared_grad_tile(
    Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, GMM_W, GMM_LS, grid, part, scale_value, sl_b, sl_h,
    r_start, r_end, RH, start_m, start_n, H, N,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_gb, stride_gh, stride_gm, stride_gn,
    D: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr, GRAD_OF_MASK: tl.constexpr, ATOMIC: tl.constexpr, GMM_KERNELS: tl.constexpr,
):
    """Σ over the (b, h) pairs r_start ≤ r < r_end of one gradient slice of the [rows, cols] tile
    of ds (the bias gradient) or of p ⊙ dp (the mask gradient), accumulated in registers, then
    one store or one relaxed atomic per element; for a Gaussian-mixture bias (GMM_KERNELS > 0)
    its 2·GMM_KERNELS sums against the Gaussians instead, stored in row `part` of GRAD's two
    [programs, GMM_KERNELS] halves (weight, log σ)."""
    rows = start_m + tl.arange(0, ROWS)
    cols = start_n + tl.arange(0, COLS)
    offs_d = tl.arange(0, D)
    row_ok = rows < N
    col_ok = cols < N
    tile_ok = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for r in range(r_start, r_end):
        b = sl_b + (r // RH).to(tl.int64)
        h = sl_h + (r % RH).to(tl.int64)
        bh = b * H + h
        scale_log2 = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR) * 1.4426950408889634
        q = _load_rows(_tile(Q, b, h, rows, offs_d, stride_qb, stride_qh, stride_qn), row_ok, MASK_ROWS)
        do = _load_rows(_tile(DO, b, h, rows, offs_d, stride_dob, stride_doh, stride_don), row_ok, MASK_ROWS)
        k = _load_rows(_tile(K, b, h, cols, offs_d, stride_kb, stride_kh, stride_kn), col_ok, MASK_COLS)
        v = _load_rows(_tile(V, b, h, cols, offs_d, stride_vb, stride_vh, stride_vn), col_ok, MASK_COLS)
        lse = _load_vec(LSE + bh * N + rows, row_ok, MASK_ROWS)
        if COLS == 1:  # a lone last key (N mod BLOCK_N = 1): q·k and dout·v on CUDA cores
            qk = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1)[:, None]
            dp = tl.sum(do.to(tl.float32) * v.to(tl.float32), 1)[:, None]
        else:
            qk = _mm(q, tl.trans(k), PRECISION)
        s = _scores(qk, rows[:, None], cols[None, :], scale_log2, b, h, N, BIAS,
                    stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK, MASK_ROWS, MASK_COLS)
        p = tl.math.exp2(s - lse[:, None])
        if MASK_ROWS:
            p = tl.where(row_ok[:, None], p, 0.0)
        if COLS > 1:  # (after p, as before the rank-1 column existed: the tile kernels' registers unchanged)
            dp = _mm(do, tl.trans(v), PRECISION)
        if GRAD_OF_MASK:  # dmask = p ⊙ dp
            acc += p * dp
        else:  # dbias = ds = p ⊙ (mask ⊙ dp − δ)
            delta = _load_vec(DELTA + bh * N + rows, row_ok, MASK_ROWS)
            if HAS_MASK:
                m_ptrs = MASK + b * stride_mb + h * stride_mh + rows[:, None] * stride_mm + cols[None, :] * stride_mn
                if MASK_ROWS or MASK_COLS:
                    dp = dp * tl.load(m_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
                else:
                    dp = dp * tl.load(m_ptrs).to(tl.float32)
            acc += p * (dp - delta[:, None])
    if GMM_KERNELS > 0:  # dweight = Σ ds·G, dlog σ = weight / σ² · Σ ds·G·d² for each Gaussian G
        d2, patches = _gmm_sq_dist(rows, cols, grid)
        acc = tl.where(patches & tile_ok, acc, 0.0)
        for kk in tl.static_range(GMM_KERNELS):
            w, inv_var, g = _gmm_gaussian(GMM_W, GMM_LS, sl_h, kk, d2, GMM_KERNELS)
            g = acc * g
            tl.store(GRAD + part * GMM_KERNELS + kk, tl.sum(g))
            tl.store(GRAD + (tl.num_programs(0) + part) * GMM_KERNELS + kk, w * inv_var * tl.sum(g * d2))
    else:
        ptrs = GRAD + sl_b * stride_gb + sl_h * stride_gh + rows[:, None] * stride_gm + cols[None, :] * stride_gn
        if ATOMIC:
            if MASK_ROWS or MASK_COLS:
                tl.atomic_add(ptrs, acc, mask=tile_ok, sem="relaxed")
            else:
                tl.atomic_add(ptrs, acc, sem="relaxed")
        else:
            if MASK_ROWS or MASK_COLS:
                tl.store(ptrs, acc, mask=tile_ok)
            else:
                tl.store(ptrs, acc)


@triton.jit
def _attention_bwd_shared_kernel(
    Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, GMM_W, GMM_LS, grid, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gn,
    H, N, SH, RH, R, GROUP, GROUPS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr, GRAD_OF_MASK: tl.constexpr, ATOMIC: tl.constexpr, SPLIT: tl.constexpr,
    GMM_KERNELS: tl.constexpr = 0,
):
    """The gradient of a bias or mask shared over the batch and/or heads: one program per
    (tile, group of GROUP contributing (b, h) pairs, gradient slice), tiles fastest. The slice
    is (sl_b, sl_h) over the gradient's own [B|1, H|1] dims; its R contributors r map to
    b = sl_b + r // RH, h = sl_h + r % RH. A Gaussian-mixture bias (GMM_KERNELS Gaussians per
    head, weights GMM_W and log-widths GMM_LS [H, GMM_KERNELS], on a grid-wide patch grid) has
    each program store its tile's sums against the Gaussians in row pid of GRAD instead."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(N, BLOCK_M) * tiles_n
    pid = tl.program_id(0).to(tl.int64)
    t = pid % tiles
    g = (pid // tiles) % GROUPS
    sl = pid // (tiles * GROUPS)
    sl_b = sl // SH
    sl_h = sl % SH
    mi = t // tiles_n
    ni = t % tiles_n
    r_start = g * GROUP
    r_end = tl.minimum(r_start + GROUP, R)
    if SPLIT:  # full tiles unmasked; the leftover rows / columns in TAIL_M / TAIL_N-wide tiles
        if mi < N // BLOCK_M:
            if ni < N // BLOCK_N:
                _shared_grad_tile(Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, GMM_W, GMM_LS, grid, pid,
                                  scale_value, sl_b, sl_h,
                                  r_start, r_end, RH, mi * BLOCK_M, ni * BLOCK_N, H, N,
                                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                                  stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_sh, stride_bb,
                                  stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
                                  stride_gb, stride_gh, stride_gm, stride_gn, D, BLOCK_M, BLOCK_N, False, False,
                                  HAS_SCALE_TENSOR, HAS_BIAS, HAS_MASK, DIAGONAL_MASK, PRECISION, GRAD_OF_MASK,
                                  ATOMIC, GMM_KERNELS)
            else:
                _shared_grad_tile(Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, GMM_W, GMM_LS, grid, pid,
                                  scale_value, sl_b, sl_h,
                                  r_start, r_end, RH, mi * BLOCK_M, ni * BLOCK_N, H, N,
                                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                                  stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_sh, stride_bb,
                                  stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
                                  stride_gb, stride_gh, stride_gm, stride_gn, D, BLOCK_M, TAIL_N, False, TAIL_N > 1,
                                  HAS_SCALE_TENSOR, HAS_BIAS, HAS_MASK, DIAGONAL_MASK, PRECISION, GRAD_OF_MASK,
                                  ATOMIC, GMM_KERNELS)
        else:
            if ni < N // BLOCK_N:
                _shared_grad_tile(Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, GMM_W, GMM_LS, grid, pid,
                                  scale_value, sl_b, sl_h,
                                  r_start, r_end, RH, mi * BLOCK_M, ni * BLOCK_N, H, N,
                                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                                  stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_sh, stride_bb,
                                  stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
                                  stride_gb, stride_gh, stride_gm, stride_gn, D, TAIL_M, BLOCK_N, True, False,
                                  HAS_SCALE_TENSOR, HAS_BIAS, HAS_MASK, DIAGONAL_MASK, PRECISION, GRAD_OF_MASK,
                                  ATOMIC, GMM_KERNELS)
            else:
                _shared_grad_tile(Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, GMM_W, GMM_LS, grid, pid,
                                  scale_value, sl_b, sl_h,
                                  r_start, r_end, RH, mi * BLOCK_M, ni * BLOCK_N, H, N,
                                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                                  stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_sh, stride_bb,
                                  stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
                                  stride_gb, stride_gh, stride_gm, stride_gn, D, TAIL_M, TAIL_N, True, TAIL_N > 1,
                                  HAS_SCALE_TENSOR, HAS_BIAS, HAS_MASK, DIAGONAL_MASK, PRECISION, GRAD_OF_MASK,
                                  ATOMIC, GMM_KERNELS)
    else:
        _shared_grad_tile(Q, K, V, DO, LSE, DELTA, SCALE, BIAS, MASK, GRAD, GMM_W, GMM_LS, grid, pid,
                          scale_value, sl_b, sl_h,
                          r_start, r_end, RH, mi * BLOCK_M, ni * BLOCK_N, H, N,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                          stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_sh, stride_bb,
                          stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
                          stride_gb, stride_gh, stride_gm, stride_gn, D, BLOCK_M, BLOCK_N, True, True,
                          HAS_SCALE_TENSOR, HAS_BIAS, HAS_MASK, DIAGONAL_MASK, PRECISION, GRAD_OF_MASK,
                          ATOMIC, GMM_KERNELS)


# --------------------------------------------------------------------------------------------
# launchers (over [B, H, N, D] views)
# --------------------------------------------------------------------------------------------
def new_buffer(shape, *, device, dtype) -> Tensor:
    """Every tensor a kernel writes is allocated here, uninitialised (tests poison them)."""
    return torch.empty(shape, device=device, dtype=dtype)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by dot precision and head dim, chosen so that no
# kernel spills on sm_80 or sm_90a (`mgit-fast inspect --shapes gate` checks every entry).
# fp16/bf16 and tf32 feed the tensor cores; tf32 operands take twice the registers. "ieee" fp32
# (PyTorch's default, TF32 off) runs on the FMA units, whose dot keeps a whole K = D slice of
# each operand per thread: small tiles, and no software pipelining, which would hold two.
TILES = {
    "half": {16: (64, 64, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (64, 32, 8, 2)},
    "tf32": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 32, 4, 2), 128: (32, 32, 4, 2)},
    "ieee": {16: (32, 32, 4, 1), 32: (16, 16, 4, 1), 64: (16, 16, 4, 1), 128: (16, 16, 8, 1)},
}


# where the split geometry (full unmasked tiles plus narrow tails) compiles without spills on
# sm_80 and sm_90a: fp16/bf16 at D = 32 and 64, the ViT head dims, with these num_stages (2 in
# the forward at D = 64 used local memory on sm_80, 3 in dk/dv spilled 6 B on Triton 3.6). Elsewhere (FMA fp32, tf32, D = 16 and 128) its tail code
# spilled 32 B to 4 KB, and sequences shorter than BLOCK_M gain nothing: one masked loop.
SPLIT_TILES = {"half": {32: (2, 2), 64: (3, 2)}}  # num_stages: forward and dq kernels, dk/dv kernel


# With a mask (its [rows, keys] tile live beside p, and in the dq kernel p ⊙ dp stored beside ds),
# these specialisations spilled with the tiles above (8–256 B on sm_80 or sm_90a, Triton 3.9 or
# 3.6): only when HAS_MASK they take these launch options, or a narrower streamed block
# (max_block_n). Keys: (kernel, dot precision, head dim, split geometry).
MASK_TILES = {
    ("fwd", "tf32", 64, False): dict(num_stages=1),
    ("dq", "half", 64, True): dict(max_block_n=16),
    ("dq", "tf32", 64, False): dict(max_block_n=16),  # spilled 16 B on Triton 3.6, sm_90a
    ("dq", "ieee", 64, False): dict(num_warps=2),
    ("dq", "ieee", 16, False): dict(max_block_n=16),  # a shared mask, no dmask store: 32 spilled 16 B on sm_80
    ("dkdv", "half", 64, True): dict(max_block_n=16),  # 32 queries spilled 54 B on Triton 3.6, sm_80
    ("dkdv", "half", 128, False): dict(num_stages=1),
    ("dkdv", "tf32", 64, False): dict(max_block_n=32, num_stages=1),
    ("dq", "tf32", 128, False): dict(num_stages=1),  # a shared mask, no dmask store: spilled 12 B on sm_90a
    ("shared", "ieee", 64, False): dict(num_warps=2),  # spilled 8 B on sm_90a
    # with the rank-1 last-key column, 2 stages spilled 8 B at N = 65 on sm_80 (Triton 3.9); 1 stage
    # also takes less (the bench shapes on sm_90a: 136 -> 128 registers, 49 -> 25 KB, 3 -> 4 blocks/SM)
    ("shared", "half", 64, True): dict(num_stages=1),
}


def _mask_tiling(kernel: str, tiles: dict, N: int, D: int, precision: str) -> dict:
    """`tiles` of one kernel ("fwd", "dq", "dkdv" or "shared", as launched without a mask) with the
    `MASK_TILES` entry applied, for a launch with a mask."""
    over = dict(MASK_TILES.get((kernel, precision, D, tiles["SPLIT"]), {}))
    max_block_n = over.pop("max_block_n", None)
    if max_block_n is not None and max_block_n < tiles["BLOCK_N"]:
        if kernel == "dkdv" and not tiles["SPLIT"]:  # the masked geometry's query block (TAIL_N = BLOCK_N)
            tiles = dict(tiles, BLOCK_N=max_block_n, TAIL_N=max_block_n)
        else:  # the streamed block and its tail as `tiling` cuts them (queries in the split dk/dv)
            narrow = tiling(N, D, precision, max_block_n=max_block_n)
            tiles = dict(tiles, BLOCK_N=narrow["BLOCK_N"], TAIL_N=narrow["TAIL_N"])
    return dict(tiles, **over)


def _tail(rest: int, block: int, exact_one: bool) -> int:
    """Width of the tile that takes the last `rest` (< block) positions: 0 for none, 1 for one
    (a rank-1 update on CUDA cores, where allowed), else the smallest power of two ≥ 16."""
    if rest == 0:
        return 0
    if rest == 1 and exact_one:
        return 1
    return min(block, max(16, triton.next_power_of_2(rest)))


def tiling(N: int, D: int, precision: str = "half", max_block_n: Optional[int] = None) -> dict:
    """Tile constexprs and launch options for a sequence length, head dim and dot precision.

    Each program owns BLOCK_M positions of the sequence (the M side of its matmuls: queries in
    the forward and dq kernels, keys in the dk/dv kernel), the last program the N mod BLOCK_M
    leftover ones in a TAIL_M-row tile (TAIL_M = BLOCK_M, never taken, when BLOCK_M divides N).
    It streams the other side in unmasked BLOCK_N blocks, then the N mod BLOCK_N last positions
    in one masked TAIL_N-wide tile, or, when there is exactly one (N = 64·n + 1: a class token),
    as a rank-1 update on CUDA cores (TAIL_N = 1)."""
    block_m, block_n, num_warps, num_stages = TILES.get(precision, TILES["half"])[D]
    if max_block_n:
        block_n = min(block_n, max_block_n)
    split_stages = SPLIT_TILES.get(precision, {}).get(D)
    if split_stages is None or N < block_m:  # one masked geometry
        cover = max(16, triton.next_power_of_2(N))
        block_m, block_n = min(block_m, cover), min(block_n, cover)
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, TAIL_M=block_m, TAIL_N=block_n, SPLIT=False,
                    num_warps=num_warps, num_stages=num_stages)
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n,
        TAIL_M=_tail(N % block_m, block_m, False) or block_m, TAIL_N=_tail(N % block_n, block_n, True),
        SPLIT=True, num_warps=num_warps, num_stages=split_stages[0],
    )


def _dkdv_tiling(tiles: dict, precision: str, D: int) -> dict:
    """The dk/dv kernel's tiles: its programs own keys on the M side. The masked geometry keeps
    the forward's key block there (BLOCK_N keys per program, queries BLOCK_M at a time; with
    BLOCK_M keys per program the FMA and D = 128 paths spill)."""
    if tiles["SPLIT"]:
        return dict(tiles, num_stages=SPLIT_TILES[precision][D][1])
    return dict(tiles, BLOCK_M=tiles["BLOCK_N"], BLOCK_N=tiles["BLOCK_M"], TAIL_M=tiles["BLOCK_N"],
                TAIL_N=tiles["BLOCK_M"])


def tf32_allowed() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32, read through whichever API was used to set it
    (torch ≥ 2.9 raises on the legacy getter once the new ``fp32_precision`` was set)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision != "none":
        return precision == "tf32"
    generic = getattr(torch.backends, "fp32_precision", "none")
    if generic != "none":
        return generic == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def _precision(dtype: torch.dtype) -> str:
    """The tl.dot precision: "tf32" for fp32 inputs only when PyTorch's matmuls may use TF32,
    else "ieee"; "upcast" for bfloat16 under the CPU interpreter (see `_mm`)."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    if dtype == torch.float32:
        return "tf32" if tf32_allowed() else "ieee"
    return "half"


def _bhn(t: Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _bias_strides(bias: Optional[Tensor]) -> Tuple[int, int, int, int]:
    """Strides of a bias [H, N, N] / [B, H, N, N] as [B, H, N, N], 0 on broadcast dims."""
    if bias is None:
        return 0, 0, 0, 0
    full = bias if bias.dim() == 4 else bias.unsqueeze(0)
    sb, sh, sm, sn = full.stride()
    return (0 if full.shape[0] == 1 else sb), (0 if full.shape[1] == 1 else sh), sm, sn


def _scale_args(scale: Optional[Tensor], scale_value: float):
    if scale is None:
        return None, scale_value, 0
    return scale, 1.0, (scale.stride(0) if scale.dim() == 1 else 0)


def forward_into(q, k, v, out, scale, scale_value, bias, diagonal_mask, mask=None) -> Tensor:
    """Writes attention of the [B, H, N, D] views q, k, v into the view `out`; returns lse
    [B, H, N] (fp32, log2 units; the unmasked softmax's, also with a mask)."""
    B, H, N, D = q.shape
    lse = new_buffer((B, H, N), device=q.device, dtype=torch.float32)
    precision = _precision(q.dtype)
    tiles = tiling(N, D, precision)
    if mask is not None:
        tiles = _mask_tiling("fwd", tiles, N, D, precision)
    scale_t, scale_v, stride_sh = _scale_args(scale, scale_value)
    with on_device(q):
        _attention_fwd_kernel[(triton.cdiv(N, tiles["BLOCK_M"]) * B * H,)](
            q, k, v, out, lse, scale_t, bias, mask, scale_v,
            *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out),
            stride_sh, *_bias_strides(bias), *_bias_strides(mask),
            H, N, D=D,
            HAS_SCALE_TENSOR=scale is not None, HAS_BIAS=bias is not None, DIAGONAL_MASK=diagonal_mask,
            PRECISION=precision, HAS_MASK=mask is not None, **tiles,
        )
    return lse


def _broadcast_dims(t: Tensor) -> Tuple[int, ...]:
    """The dims of [B, H] over which an [H, N, N] / [B, H, N, N] score map is shared."""
    full = t.shape if t.dim() == 4 else (1, *t.shape)
    return tuple(d for d in (0, 1) if full[d] == 1)


# programs the shared-gradient pass aims for (about 8 per SM on an H100): enough to fill the
# GPU, while each program sums as many (b, h) pairs as it can before its one atomic per element
SHARED_GRAD_PROGRAMS = 1024


def shared_grad_groups(contributors: int, programs_per_group: int, deterministic: bool) -> Tuple[int, int]:
    """(pairs per program, groups): how the pass splits the (b, h) pairs that feed one gradient
    slice. One group (plain stores, a fixed order) when deterministic algorithms are asked for
    or when the tiles alone fill the GPU; else atomics, one per element per group."""
    if deterministic:
        return contributors, 1
    groups = max(1, min(contributors, triton.cdiv(SHARED_GRAD_PROGRAMS, programs_per_group)))
    group = triton.cdiv(contributors, groups)
    return group, triton.cdiv(contributors, group)


def shared_grad(
    target, dout, q, k, v, lse, delta, scale, scale_value, bias, mask, diagonal_mask, of_mask, gmm=None
) -> Tensor:
    """The gradient of `target` (the bias, or the mask when `of_mask`), a score map shared over
    the batch and/or heads: ds (or p ⊙ dp) summed over the (b, h) pairs that read each slice, in
    registers, a group of pairs per program, then one store or relaxed atomic per element. No
    [B, H, N, N] gradient is formed. Reads the lse of the forward and the δ of the first backward
    kernel. With `gmm` = (weight, log_sigma, grid_size) the bias is that Gaussian mixture and the
    result is [2, H, K] fp32, the gradients of weight and log_sigma: each program reduces its
    tile against the K Gaussians and stores 2K partial sums, summed afterwards in a fixed order
    (no atomics, no [H, N, N] gradient)."""
    B, H, N, D = q.shape
    precision = _precision(q.dtype)
    if precision == "tf32" and D == 128:  # tf32 spilled 0.7-1.6 KB at every tile tried: FMA fp32
        precision = "ieee"
    tiles = tiling(N, D, precision)
    if tiles["SPLIT"] and not tiles["TAIL_N"]:  # never taken (BLOCK_N divides N), but compiled
        tiles["TAIL_N"] = tiles["BLOCK_N"]
    # it holds q, dout, k and v of a pair at once: at most 2 stages (3 left 2 blocks/SM at D = 64
    # on sm_90a), 1 with tf32 (2 spilled 236 B at D = 32 on sm_80)
    tiles.update(num_stages=1 if precision == "tf32" else min(tiles["num_stages"], 2))
    if mask is not None:
        tiles = _mask_tiling("shared", tiles, N, D, precision)
    full = target.shape if target.dim() == 4 else (1, *target.shape)
    slices_b, slices_h = full[0], full[1]
    per_b, per_h = B // slices_b, H // slices_h  # contributors per slice along b and h
    tile_programs = triton.cdiv(N, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"])
    programs_per_group = tile_programs * slices_b * slices_h
    # partial sums are deterministic: the GMM path takes groups with no atomics either way
    deterministic = torch.are_deterministic_algorithms_enabled() and gmm is None
    group, groups = shared_grad_groups(per_b * per_h, programs_per_group, deterministic)
    atomic = groups > 1 and gmm is None
    gmm_w = gmm_ls = None
    grid_size = kernels = 0
    if gmm is not None:
        gmm_w, gmm_ls, grid_size = gmm[0].contiguous(), gmm[1].contiguous(), gmm[2]
        kernels = gmm_w.shape[1]
        grad = new_buffer((2, programs_per_group * groups, kernels), device=q.device, dtype=torch.float32)
    else:
        grad = (torch.zeros if atomic else new_buffer)((slices_b, slices_h, N, N), device=q.device, dtype=torch.float32)
    scale_t, scale_v, stride_sh = _scale_args(scale, scale_value)
    with on_device(q):
        _attention_bwd_shared_kernel[(programs_per_group * groups,)](
            q, k, v, dout, lse, delta, scale_t, bias, mask, grad, gmm_w, gmm_ls, grid_size, scale_v,
            *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(dout),
            stride_sh, *_bias_strides(bias), *_bias_strides(mask), *_bias_strides(None if gmm else grad),
            H, N, slices_h, per_h, per_b * per_h, group, groups,
            D=D, HAS_SCALE_TENSOR=scale is not None, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
            DIAGONAL_MASK=diagonal_mask, PRECISION=precision, GRAD_OF_MASK=of_mask, ATOMIC=atomic,
            GMM_KERNELS=kernels, **tiles,
        )
    if gmm is not None:  # [2, slices_h = H, groups · tiles, K] summed over the programs of a head
        return grad.view(2, slices_h, groups * tile_programs, kernels).sum(dim=2)
    return grad.reshape(target.shape).to(target.dtype)


def gaussian_mixture_bias(weight: Tensor, log_sigma: Tensor, grid_size: int) -> Tensor:
    """The dense [H, 1 + grid_size², 1 + grid_size²] fp32 bias of a Gaussian mixture (one launch)."""
    H, kernels = weight.shape
    N = 1 + grid_size * grid_size
    bias = new_buffer((H, N, N), device=weight.device, dtype=torch.float32)
    block = 32
    with on_device(weight):
        _attention_gmm_bias_kernel[(triton.cdiv(N, block) ** 2, H)](
            weight.contiguous(), log_sigma.contiguous(), bias, N, grid_size, GMM_KERNELS=kernels, BLOCK=block,
        )
    return bias


# The fused backward (`_attention_bwd_fused_kernel`, one (b, h) pair at a time per program) runs
# where it compiles without spills on sm_80 and sm_90a (`FUSED_TILES`, by dot precision and head
# dim: 8 warps, 16 queries per streamed block, the split geometry, no per-batch bias or mask
# gradient), one program per SM (≈ 240 registers × 256 threads), each with its own dq scratch. An
# entry given as {80: ..., 90: ...} is chosen by the GPU's architecture (sm_80 up to sm_89, sm_90
# on). With a multiplicative mask its [keys, queries] tile is live beside pᵀ: `FUSED_MASK_TILES`
# amends the entry by architecture (32 keys per block, one stage), None keeping the two kernels. It
# is taken when every program gets at least FUSED_MIN_PAIRS pairs, below which the two kernels'
# cdiv(N, BLOCK_M) programs per pair fill the GPU better. Off a GPU (the interpreter, a
# compile-only capture) the SM count and compute capability are STANDIN_SMS and STANDIN_CAPABILITY.
FUSED_TILES = {
    ("half", 32): dict(num_warps=8, max_block_n=16),
    # num_stages: 2 spilled 28-64 B on sm_80 (Triton 3.6), 1 spilled 8-80 B on sm_90a
    ("half", 64): dict(num_warps=8, max_block_n=16, num_stages={80: 1, 90: 2}),
}
FUSED_MASK_TILES = {  # by architecture; 64 keys per block spilled 24-192 B (D = 64), 24-88 B (D = 32, 2 stages)
    ("half", 32): {80: dict(block_keys=32, num_stages=1), 90: dict(block_keys=32, num_stages=1)},
    ("half", 64): {80: None, 90: dict(block_keys=32, num_stages=1)},  # sm_80: 8 B spilled (Triton 3.9)
}
FUSED_MIN_PAIRS = 2
STANDIN_SMS = 1
STANDIN_CAPABILITY = 90


def _gpu(device: torch.device) -> Tuple[int, int]:
    """(SMs, compute capability ×10) of the device, the stand-ins off a GPU."""
    if device.type != "cuda":
        return STANDIN_SMS, STANDIN_CAPABILITY
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, 10 * props.major + props.minor


def fused_backward_programs(sms: int, pairs: int) -> int:
    """The fused backward's grid for `pairs` (b, h) pairs on `sms` SMs, or 0 for the two-kernel path."""
    return min(sms, pairs) if pairs >= FUSED_MIN_PAIRS * sms else 0


def _fused_tiling(N: int, D: int, precision: str, capability: int, masked: bool = False) -> Optional[dict]:
    """The fused backward's tiles (keys on the M side, as the dk/dv kernel's) for a GPU of this
    compute capability (×10), with or without a multiplicative mask, or None where it does not run."""
    arch = 90 if capability >= 90 else 80
    over = FUSED_TILES.get((precision, D))
    if over is None:
        return None
    over = {key: value[arch] if isinstance(value, dict) else value for key, value in over.items()}
    if masked:
        amend = FUSED_MASK_TILES.get((precision, D), {}).get(arch)
        if amend is None:
            return None
        over.update(amend)
    block_keys = over.pop("block_keys", None)
    tiles = tiling(N, D, precision, max_block_n=over.pop("max_block_n"))
    if not tiles["SPLIT"]:
        return None
    if block_keys is not None and block_keys < tiles["BLOCK_M"]:  # narrower key blocks, their own tail
        tiles.update(BLOCK_M=block_keys, TAIL_M=_tail(N % block_keys, block_keys, False) or block_keys)
    return dict(_dkdv_tiling(tiles, precision, D), **over)


def backward_into(
    dout, q, k, v, out, lse, dq, dk, dv, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias,
    mask=None, need_dmask=False, gmm=None,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Writes dq, dk, dv into their [B, H, N, D] views; returns (dscale, dbias, dmask), each when
    asked. With no per-batch bias or mask gradient and enough (b, h) pairs, one fused launch
    (5 N²D matmuls per pair) where `_fused_tiling` has tiles; else the dq and dk/dv kernels (7).
    With `gmm` (the bias is that Gaussian mixture, `shared_grad`), dbias is [2, H, K]: the
    gradients of its weight and log_sigma."""
    B, H, N, D = q.shape
    precision = _precision(q.dtype)
    tiles = tiling(N, D, precision)
    delta = new_buffer((B, H, N), device=q.device, dtype=torch.float32)  # written by the first kernel
    scale_t, scale_v, stride_sh = _scale_args(scale, scale_value)
    common = dict(
        D=D, HAS_SCALE_TENSOR=scale is not None, HAS_BIAS=bias is not None, DIAGONAL_MASK=diagonal_mask,
        PRECISION=precision,
    )
    shared_bias = need_dbias and _broadcast_dims(bias) != ()
    shared_mask = need_dmask and _broadcast_dims(mask) != ()
    per_batch_dbias = need_dbias and not shared_bias  # written by the dq kernel, one program per element
    per_batch_dmask = need_dmask and not shared_mask
    sms, capability = _gpu(q.device)
    fused_tiles = None if (per_batch_dbias or per_batch_dmask) else _fused_tiling(
        N, D, precision, capability, masked=mask is not None)
    programs = fused_backward_programs(sms, B * H) if fused_tiles is not None else 0
    dbias_buffer = dmask_buffer = None
    if programs:
        dscale_partial = new_buffer((B, H, 1), device=q.device, dtype=torch.float32) if need_dscale else None
        scratch = new_buffer((programs, D, N), device=q.device, dtype=torch.float32)  # zeroed in-kernel
        with on_device(q):
            _attention_bwd_fused_kernel[(programs,)](
                q, k, v, out, dout, lse, delta, dq, dk, dv, scratch, dscale_partial, scale_t, bias, mask, scale_v,
                *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out), *_bhn(dout), *_bhn(dq), *_bhn(dk), *_bhn(dv),
                stride_sh, *_bias_strides(bias), *_bias_strides(mask), H, N, B * H,
                NEED_DSCALE=need_dscale, HAS_MASK=mask is not None, **common, **fused_tiles,
            )
    else:
        m_blocks = triton.cdiv(N, tiles["BLOCK_M"])
        dscale_partial = new_buffer((B, H, m_blocks), device=q.device, dtype=torch.float32) if need_dscale else None
        if per_batch_dbias:
            dbias_buffer = new_buffer(bias.shape, device=q.device, dtype=torch.float32)
        if per_batch_dmask:
            dmask_buffer = new_buffer(mask.shape, device=q.device, dtype=torch.float32)
        # ds (or p ⊙ dp) also goes to memory: narrower key blocks; with a mask always, so that a mask
        # without a gradient takes the tiles the compile gate checks with one
        dq_tiles = tiling(N, D, precision, max_block_n=32) if (per_batch_dbias or mask is not None) else tiles
        dkdv_tiles = _dkdv_tiling(tiles, precision, D)
        if mask is not None:
            dq_tiles = _mask_tiling("dq", dq_tiles, N, D, precision)
            dkdv_tiles = _mask_tiling("dkdv", dkdv_tiles, N, D, precision)
        with on_device(q):
            _attention_bwd_dq_kernel[(m_blocks * B * H,)](
                q, k, v, out, dout, lse, delta, dq, dscale_partial, dbias_buffer, scale_t, bias, mask, dmask_buffer,
                scale_v,
                *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out), *_bhn(dout), *_bhn(dq),
                stride_sh, *_bias_strides(bias), *_bias_strides(dbias_buffer), *_bias_strides(mask),
                *_bias_strides(dmask_buffer), H, N,
                NEED_DSCALE=need_dscale, NEED_DBIAS=per_batch_dbias,
                HAS_MASK=mask is not None, NEED_DMASK=per_batch_dmask, **common, **dq_tiles,
            )
            _attention_bwd_dkdv_kernel[(triton.cdiv(N, dkdv_tiles["BLOCK_M"]) * B * H,)](
                q, k, v, dout, lse, delta, dk, dv, scale_t, bias, mask, scale_v,
                *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(dout), *_bhn(dk), *_bhn(dv),
                stride_sh, *_bias_strides(bias), *_bias_strides(mask), H, N, HAS_MASK=mask is not None,
                **common, **dkdv_tiles,
            )

    dscale = None
    if need_dscale:
        per_head = dscale_partial.sum(dim=(0, 2))  # [H]
        dscale = (per_head if scale.dim() == 1 else per_head.sum()).to(scale.dtype)
    dbias = None
    if shared_bias:
        dbias = shared_grad(bias, dout, q, k, v, lse, delta, scale, scale_value, bias, mask, diagonal_mask, False, gmm)
    elif per_batch_dbias:
        dbias = dbias_buffer.to(bias.dtype)
    dmask = None
    if shared_mask:
        dmask = shared_grad(mask, dout, q, k, v, lse, delta, scale, scale_value, bias, mask, diagonal_mask, True)
    elif per_batch_dmask:
        dmask = dmask_buffer.to(mask.dtype)
    return dscale, dbias, dmask


# --------------------------------------------------------------------------------------------
# custom ops and autograd
# --------------------------------------------------------------------------------------------
def _heads(t: Tensor, num_heads: int, parts: int):
    """[B, N, parts·H·D] → `parts` [B, H, N, D] views."""
    B, N, width = t.shape
    view = t.view(B, N, parts, num_heads, width // (parts * num_heads)).permute(2, 0, 3, 1, 4)
    return view.unbind(0)


@torch.library.custom_op("mgit_fast::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor],
    diagonal_mask: bool, mask: Optional[Tensor] = None, gmm_weight: Optional[Tensor] = None,
    gmm_log_sigma: Optional[Tensor] = None, grid_size: int = 0,
) -> Tuple[Tensor, Tensor]:
    # gmm_*: the Gaussian mixture `bias` was built from, for the backward (its gradients go there)
    out = new_buffer(q.shape, device=q.device, dtype=q.dtype)
    lse = forward_into(q, k, v, out, scale, scale_value, bias, diagonal_mask, mask)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, scale, scale_value, bias, diagonal_mask, mask=None, gmm_weight=None, gmm_log_sigma=None, grid_size=0):
    B, H, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, N), dtype=torch.float32)


def _gmm(weight: Optional[Tensor], log_sigma: Optional[Tensor], grid_size: int):
    return None if weight is None else (weight, log_sigma, grid_size)


@torch.library.custom_op("mgit_fast::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: Optional[Tensor],
    scale_value: float, bias: Optional[Tensor], diagonal_mask: bool, need_dscale: bool, need_dbias: bool,
    mask: Optional[Tensor] = None, need_dmask: bool = False, gmm_weight: Optional[Tensor] = None,
    gmm_log_sigma: Optional[Tensor] = None, grid_size: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = (new_buffer(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    dscale, dbias, dmask = backward_into(
        dout, q, k, v, out, lse, dq, dk, dv, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias,
        mask, need_dmask, _gmm(gmm_weight, gmm_log_sigma, grid_size),
    )
    return dq, dk, dv, _or_empty(dscale, q), _or_empty(dbias, q), _or_empty(dmask, q)


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
    out = new_buffer((B, N, width // 3), device=qkv.device, dtype=qkv.dtype)
    (out_heads,) = _heads(out, num_heads, 1)
    lse = forward_into(*_heads(qkv, num_heads, 3), out_heads, scale, scale_value, bias, diagonal_mask, mask)
    return out, lse


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
    dqkv = new_buffer(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    (dout_heads,) = _heads(dout, num_heads, 1)
    (out_heads,) = _heads(out, num_heads, 1)
    dscale, dbias, dmask = backward_into(
        dout_heads, *_heads(qkv, num_heads, 3), out_heads, lse, *_heads(dqkv, num_heads, 3),
        scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias, mask, need_dmask,
        _gmm(gmm_weight, gmm_log_sigma, grid_size),
    )
    return dqkv, _or_empty(dscale, qkv), _or_empty(dbias, qkv), _or_empty(dmask, qkv)


@attention_qkvpacked_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias, mask=None,
      need_dmask=False, gmm_weight=None, gmm_log_sigma=None, grid_size=0):
    return (
        torch.empty_like(qkv, memory_format=torch.contiguous_format),
        _fake_grad(scale, need_dscale, qkv),
        _fake_dbias(bias, need_dbias, gmm_weight, qkv),
        _fake_grad(mask, need_dmask, qkv),
    )


@torch.library.custom_op("mgit_fast::gaussian_mixture_bias", mutates_args=())
def gaussian_mixture_bias_op(weight: Tensor, log_sigma: Tensor, grid_size: int) -> Tensor:
    return gaussian_mixture_bias(weight, log_sigma, grid_size)


@gaussian_mixture_bias_op.register_fake
def _(weight, log_sigma, grid_size):
    N = 1 + grid_size * grid_size
    return weight.new_empty((weight.shape[0], N, N), dtype=torch.float32)


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return grad if grad is not None else like.new_empty(0)


def _fake_grad(param: Optional[Tensor], needed: bool, like: Tensor) -> Tensor:
    return torch.empty_like(param) if (needed and param is not None) else like.new_empty(0)


def _fake_dbias(bias: Optional[Tensor], needed: bool, gmm_weight: Optional[Tensor], like: Tensor) -> Tensor:
    if needed and gmm_weight is not None:
        return gmm_weight.new_empty((2, *gmm_weight.shape), dtype=torch.float32)
    return _fake_grad(bias, needed, like)


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _need_bias_grad(ctx, bias, gmm_weight, bias_index: int) -> bool:
    """Whether the backward op computes the bias gradient: of `bias`, or of the mixture's
    weight / log_sigma (inputs bias_index + 3, + 4) when the bias is a Gaussian mixture."""
    if gmm_weight is None:
        return bias is not None and ctx.needs_input_grad[bias_index]
    return ctx.needs_input_grad[bias_index + 3] or ctx.needs_input_grad[bias_index + 4]


def _bias_grads(dbias, need: bool, bias, gmm_weight, gmm_log_sigma):
    """(dbias, dweight, dlog_sigma) from the backward op's bias output."""
    if not need:
        return None, None, None
    if gmm_weight is None:
        return dbias.to(bias.dtype), None, None
    return None, dbias[0].to(gmm_weight.dtype), dbias[1].to(gmm_log_sigma.dtype)


def _setup_attention(ctx, inputs, output):
    q, k, v, scale, scale_value, bias, diagonal_mask, mask, gmm_weight, gmm_log_sigma, grid_size = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, scale, bias, mask, gmm_weight, gmm_log_sigma)
    ctx.scale_value, ctx.diagonal_mask, ctx.grid_size = scale_value, diagonal_mask, grid_size
    ctx.set_materialize_grads(False)  # no zeros for lse's gradient (never used)


def _backward_attention(ctx, dout, _dlse):
    q, k, v, out, lse, scale, bias, mask, gmm_weight, gmm_log_sigma = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    need_dscale = scale is not None and ctx.needs_input_grad[3]
    need_dbias = _need_bias_grad(ctx, bias, gmm_weight, 5)
    need_dmask = mask is not None and ctx.needs_input_grad[7]
    dq, dk, dv, dscale, dbias, dmask = attention_bwd(
        _unit_stride(dout), q, k, v, out, lse, scale, ctx.scale_value, bias, ctx.diagonal_mask, need_dscale, need_dbias,
        mask, need_dmask, gmm_weight, gmm_log_sigma, ctx.grid_size,
    )
    dbias, dweight, dlog_sigma = _bias_grads(dbias, need_dbias, bias, gmm_weight, gmm_log_sigma)
    return (dq, dk, dv, (dscale if need_dscale else None), None, dbias, None, (dmask if need_dmask else None),
            dweight, dlog_sigma, None)


attention_fwd.register_autograd(_backward_attention, setup_context=_setup_attention)


def _setup_packed(ctx, inputs, output):
    qkv, num_heads, scale, scale_value, bias, diagonal_mask, mask, gmm_weight, gmm_log_sigma, grid_size = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, scale, bias, mask, gmm_weight, gmm_log_sigma)
    ctx.num_heads, ctx.scale_value, ctx.diagonal_mask, ctx.grid_size = num_heads, scale_value, diagonal_mask, grid_size
    ctx.set_materialize_grads(False)  # no zeros for lse's gradient (never used)


def _backward_packed(ctx, dout, _dlse):
    qkv, out, lse, scale, bias, mask, gmm_weight, gmm_log_sigma = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    need_dscale = scale is not None and ctx.needs_input_grad[2]
    need_dbias = _need_bias_grad(ctx, bias, gmm_weight, 4)
    need_dmask = mask is not None and ctx.needs_input_grad[6]
    dqkv, dscale, dbias, dmask = attention_qkvpacked_bwd(
        dout.contiguous(), qkv, out, lse, ctx.num_heads, scale, ctx.scale_value, bias, ctx.diagonal_mask,
        need_dscale, need_dbias, mask, need_dmask, gmm_weight, gmm_log_sigma, ctx.grid_size,
    )
    dbias, dweight, dlog_sigma = _bias_grads(dbias, need_dbias, bias, gmm_weight, gmm_log_sigma)
    return (dqkv, None, (dscale if need_dscale else None), None, dbias, None, (dmask if need_dmask else None),
            dweight, dlog_sigma, None)


attention_qkvpacked_fwd.register_autograd(_backward_packed, setup_context=_setup_packed)


# --------------------------------------------------------------------------------------------
# entry points (arguments already checked by mgit_fast.functional)
# --------------------------------------------------------------------------------------------
def _split_scale(scale, head_dim: int) -> Tuple[Optional[Tensor], float]:
    if scale is None:
        return None, head_dim**-0.5
    if isinstance(scale, Tensor):
        return scale, 1.0
    return None, float(scale)


def _bias_args(bias, gmm) -> tuple:
    """(bias, gmm_weight, gmm_log_sigma, grid_size) for the custom ops: a Gaussian mixture's
    dense bias is built by one launch, outside autograd (its gradients come from the backward)."""
    if gmm is None:
        return bias, None, None, 0
    weight, log_sigma, grid_size = gmm
    return gaussian_mixture_bias_op(weight.detach(), log_sigma.detach(), grid_size), weight, log_sigma, grid_size


def attention(q, k, v, scale=None, bias=None, diagonal_mask=False, mask=None, gmm=None) -> Tensor:
    """``(softmax(q·kᵀ·scale + bias) ⊙ mask)·v`` for q, k, v ``[B, H, N, D]``.

    ``scale``: None (``D**-0.5``), a float, or a learnable tensor ``[]`` / ``[H]``; ``bias`` and
    ``mask`` (IBiT's multiplicative mask, applied to the probabilities with no renormalisation):
    ``[H, N, N]`` or ``[B, H, N, N]`` (1 broadcasts over B and H), learnable; ``gmm``, instead of
    ``bias``: ``(weight, log_sigma, grid_size)`` of a Gaussian-mixture bias (``weight`` and
    ``log_sigma`` learnable ``[H, K]``, N = 1 + grid_size²); ``diagonal_mask``: a token does not
    attend to itself. Gradients reach q, k, v, scale, bias (or weight and log_sigma) and mask."""
    scale_t, scale_v = _split_scale(scale, q.shape[-1])
    bias, *gmm_args = _bias_args(bias, gmm)
    out, _ = attention_fwd(_unit_stride(q), _unit_stride(k), _unit_stride(v), scale_t, scale_v, bias, diagonal_mask,
                           mask, *gmm_args)
    return out


def attention_qkvpacked(qkv, num_heads, scale=None, bias=None, diagonal_mask=False, mask=None, gmm=None) -> Tensor:
    """Attention from a packed ``qkv [B, N, 3·H·D]`` (read in place) to ``[B, N, H·D]``; the
    options as in `attention` (``mask``: ``[H, N, N]`` / ``[B, H, N, N]``, multiplicative, learnable)."""
    qkv = _unit_stride(qkv)
    scale_t, scale_v = _split_scale(scale, qkv.shape[-1] // (3 * num_heads))
    bias, *gmm_args = _bias_args(bias, gmm)
    out, _ = attention_qkvpacked_fwd(qkv, num_heads, scale_t, scale_v, bias, diagonal_mask, mask, *gmm_args)
    return out
