"""Fused attention, forward and backward (flash-style), with the small-data variants.

Math, per batch b and head h, for queries m and keys n of a sequence of N tokens:

    s[m, n] = scale_h · (q_m · k_n) + bias[b, h, m, n]        (−∞ where m = n if diagonal_mask)
    p[m, :] = softmax(s[m, :]),   out_m = Σ_n p[m, n] · v_n,   lse_m = log Σ_n exp s[m, n]

Forward: one program per (query block, b·h) streams the key blocks with an online softmax in
fp32 (exp2 domain), so nothing of size N×N is written; it stores `out` and `lse`.

Backward, with ds[m, n] = p[m, n] · (dp[m, n] − δ_m), dp = dout · vᵀ, δ_m = dout_m · out_m:

    dv_n = Σ_m p[m, n] · dout_m          dk_n = scale_h · Σ_m ds[m, n] · q_m
    dq_m = scale_h · Σ_n ds[m, n] · k_n  dbias[b, h, m, n] = ds[m, n]
    dscale_h = Σ_{b, m, n} ds[m, n] · (q_m · k_n)

Two kernels recompute p from the saved lse: one program per query block (δ, dq, dbias, and
per-block partial sums of dscale reduced afterwards in a fixed order), then one per key block
(dk, dv), which reads the δ the first wrote. A bias shared over the batch (or heads) has its gradient summed with fp32 atomics, or,
under `torch.use_deterministic_algorithms(True)`, written per batch and summed by torch.

Launch geometry: a 1-D grid of (sequence block, b·h) pairs, sequence blocks fastest, so any
batch fits CUDA's grid limits; head indices are int64, so offsets past 2³¹ do not wrap. Tiles
come from `TILES` by dot precision and head dim (no kernel spills on sm_80 or sm_90a).

Layouts: q, k, v, out are [B, H, N, D] views with unit stride on D and any other strides, so a
packed qkv [B, N, 3·H·D] is read in place and the packed output [B, N, H·D] is written in
place. Forward and backward are PyTorch custom ops, so torch.compile sees no graph break.
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
def _scores(
    qk, rows, cols, scale_log2, b, h, N,
    BIAS, stride_bb, stride_bh, stride_bm, stride_bn,
    HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
):
    """Scores of a [BLOCK_M, BLOCK_N] tile from q·kᵀ, in log2 units, −∞ outside the sequence
    and on the masked diagonal."""
    s = qk * scale_log2
    in_seq = (rows[:, None] < N) & (cols[None, :] < N)
    if HAS_BIAS:
        bias_ptrs = BIAS + b * stride_bb + h * stride_bh + rows[:, None] * stride_bm + cols[None, :] * stride_bn
        s += tl.load(bias_ptrs, mask=in_seq, other=0.0).to(tl.float32) * 1.4426950408889634
    keep = cols[None, :] < N
    if DIAGONAL_MASK:
        keep = keep & (rows[:, None] != cols[None, :])
    return tl.where(keep, s, float("-inf"))


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
def _attention_fwd_kernel(
    Q, K, V, O, LSE, SCALE, BIAS, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, bh, b, h = _program(N, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = rows[:, None] < N

    q = tl.load(_tile(Q, b, h, rows, offs_d, stride_qb, stride_qh, stride_qn), mask=row_ok, other=0.0)
    scale_log2 = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols[:, None] < N
        k = tl.load(K_bh + cols[:, None] * stride_kn + offs_d[None, :], mask=col_ok, other=0.0)
        s = _scores(_mm(q, tl.trans(k), PRECISION), rows, cols, scale_log2, b, h, N,
                    BIAS, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_bh + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok, other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(_tile(O, b, h, rows, offs_d, stride_ob, stride_oh, stride_on),
             acc.to(O.dtype.element_ty), mask=row_ok)
    tl.store(LSE + bh * N + rows, m_i + tl.math.log2(l_i), mask=rows < N)  # log2 units


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SCALE, BIAS, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n, bh, b, h = _program(N, H, BLOCK_N)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = cols[:, None] < N

    k = tl.load(_tile(K, b, h, cols, offs_d, stride_kb, stride_kh, stride_kn), mask=col_ok, other=0.0)
    v = tl.load(_tile(V, b, h, cols, offs_d, stride_vb, stride_vh, stride_vn), mask=col_ok, other=0.0)
    scale = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    Q_bh = Q + b * stride_qb + h * stride_qh
    DO_bh = DO + b * stride_dob + h * stride_doh
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N
        q = tl.load(Q_bh + rows[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO_bh + rows[:, None] * stride_don + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        s = _scores(_mm(q, tl.trans(k), PRECISION), rows, cols, scale * 1.4426950408889634, b, h, N,
                    BIAS, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK)
        p = tl.where(row_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        dv += _mm(tl.trans(p.to(do.dtype)), do, PRECISION)
        dp = _mm(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION)

    dk = dk * scale
    tl.store(_tile(DK, b, h, cols, offs_d, stride_dkb, stride_dkh, stride_dkn),
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(_tile(DV, b, h, cols, offs_d, stride_dvb, stride_dvh, stride_dvn),
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DSCALE_PARTIAL, DBIAS, SCALE, BIAS, scale_value,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_sh, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_gb, stride_gh, stride_gm, stride_gn,
    H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DBIAS: tl.constexpr, DBIAS_ATOMIC: tl.constexpr,
):
    pid_m, bh, b, h = _program(N, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = rows < N

    q = tl.load(_tile(Q, b, h, rows, offs_d, stride_qb, stride_qh, stride_qn), mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile(DO, b, h, rows, offs_d, stride_dob, stride_doh, stride_don), mask=row_ok[:, None], other=0.0)
    o = tl.load(_tile(O, b, h, rows, offs_d, stride_ob, stride_oh, stride_on), mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # δ_m = dout_m · out_m
    tl.store(DELTA + bh * N + rows, delta, mask=row_ok)  # for the dk/dv kernel, launched next
    scale = _head_scale(SCALE, scale_value, h, stride_sh, HAS_SCALE_TENSOR)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols[:, None] < N
        k = tl.load(K_bh + cols[:, None] * stride_kn + offs_d[None, :], mask=col_ok, other=0.0)
        v = tl.load(V_bh + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok, other=0.0)
        qk = _mm(q, tl.trans(k), PRECISION)
        s = _scores(qk, rows, cols, scale * 1.4426950408889634, b, h, N,
                    BIAS, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS, DIAGONAL_MASK)
        p = tl.where(row_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION)
        if NEED_DSCALE:
            dscale += tl.sum(tl.where(ds != 0.0, ds * qk, 0.0), 1)
        if NEED_DBIAS:
            in_seq = row_ok[:, None] & (cols[None, :] < N)
            dbias_ptrs = DBIAS + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + cols[None, :] * stride_gn
            if DBIAS_ATOMIC:
                tl.atomic_add(dbias_ptrs, ds, mask=in_seq, sem="relaxed")
            else:
                tl.store(dbias_ptrs, ds, mask=in_seq)

    if NEED_DSCALE:  # Σ_{m, n} ds[m, n] · (q_m · k_n) over this block's rows, from fp32 ds
        tl.store(DSCALE_PARTIAL + bh * tl.cdiv(N, BLOCK_M) + pid_m, tl.sum(dscale, 0))
    dq = dq * scale
    tl.store(_tile(DQ, b, h, rows, offs_d, stride_dqb, stride_dqh, stride_dqn),
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


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


def block_sizes(N: int, D: int, precision: str = "half") -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a sequence length, head dim and dot
    precision: the table's tile, shrunk to the smallest power of two (≥ 16) covering short
    sequences."""
    block_m, block_n, num_warps, num_stages = TILES.get(precision, TILES["half"])[D]
    cover = max(16, triton.next_power_of_2(N))
    return min(block_m, cover), min(block_n, cover), num_warps, num_stages


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


def forward_into(q, k, v, out, scale, scale_value, bias, diagonal_mask) -> Tensor:
    """Writes attention of the [B, H, N, D] views q, k, v into the view `out`; returns lse
    [B, H, N] (fp32, log2 units)."""
    B, H, N, D = q.shape
    lse = new_buffer((B, H, N), device=q.device, dtype=torch.float32)
    precision = _precision(q.dtype)
    block_m, block_n, num_warps, num_stages = block_sizes(N, D, precision)
    scale_t, scale_v, stride_sh = _scale_args(scale, scale_value)
    with on_device(q):
        _attention_fwd_kernel[(triton.cdiv(N, block_m) * B * H,)](
            q, k, v, out, lse, scale_t, bias, scale_v,
            *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out),
            stride_sh, *_bias_strides(bias),
            H, N,
            D=D, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_SCALE_TENSOR=scale is not None, HAS_BIAS=bias is not None, DIAGONAL_MASK=diagonal_mask,
            PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
        )
    return lse


def backward_into(
    dout, q, k, v, out, lse, dq, dk, dv, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Writes dq, dk, dv into their [B, H, N, D] views; returns (dscale, dbias) when asked."""
    B, H, N, D = q.shape
    precision = _precision(q.dtype)
    block_m, block_n, num_warps, num_stages = block_sizes(N, D, precision)
    delta = new_buffer((B, H, N), device=q.device, dtype=torch.float32)  # written by the dq kernel
    scale_t, scale_v, stride_sh = _scale_args(scale, scale_value)
    common = dict(
        D=D, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SCALE_TENSOR=scale is not None, HAS_BIAS=bias is not None, DIAGONAL_MASK=diagonal_mask,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    m_blocks = triton.cdiv(N, block_m)
    dscale_partial = new_buffer((B, H, m_blocks), device=q.device, dtype=torch.float32) if need_dscale else None
    dbias_buffer, atomic = None, False
    if need_dbias:
        shared = bias.dim() == 3 or bias.shape[0] == 1 or bias.shape[1] == 1
        atomic = shared and not torch.are_deterministic_algorithms_enabled()
        if atomic:
            dbias_buffer = torch.zeros(bias.shape, device=q.device, dtype=torch.float32)
        else:
            dbias_buffer = new_buffer((B, H, N, N), device=q.device, dtype=torch.float32)
    dbias_strides = _bias_strides(dbias_buffer) if atomic else (dbias_buffer.stride() if need_dbias else (0,) * 4)
    with on_device(q):
        _attention_bwd_dq_kernel[(m_blocks * B * H,)](
            q, k, v, out, dout, lse, delta, dq, dscale_partial, dbias_buffer, scale_t, bias, scale_v,
            *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out), *_bhn(dout), *_bhn(dq),
            stride_sh, *_bias_strides(bias), *dbias_strides, H, N,
            NEED_DSCALE=need_dscale, NEED_DBIAS=need_dbias, DBIAS_ATOMIC=atomic,
            **dict(common, BLOCK_N=min(block_n, 32)) if need_dbias else common,  # ds also goes to memory
        )
        _attention_bwd_dkdv_kernel[(triton.cdiv(N, block_n) * B * H,)](
            q, k, v, dout, lse, delta, dk, dv, scale_t, bias, scale_v,
            *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(dout), *_bhn(dk), *_bhn(dv),
            stride_sh, *_bias_strides(bias), H, N, **common,
        )

    dscale = None
    if need_dscale:
        per_head = dscale_partial.sum(dim=(0, 2))  # [H]
        dscale = (per_head if scale.dim() == 1 else per_head.sum()).to(scale.dtype)
    dbias = None
    if need_dbias:
        if not atomic:  # per-(b, h) gradients, summed over the broadcast dims in a fixed order
            full_shape = bias.shape if bias.dim() == 4 else (1, *bias.shape)
            broadcast = tuple(d for d in (0, 1) if full_shape[d] == 1)
            if broadcast:
                dbias_buffer = dbias_buffer.sum(dim=broadcast, keepdim=True)
        dbias = dbias_buffer.reshape(bias.shape).to(bias.dtype)
    return dscale, dbias


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
    diagonal_mask: bool,
) -> Tuple[Tensor, Tensor]:
    out = new_buffer(q.shape, device=q.device, dtype=q.dtype)
    lse = forward_into(q, k, v, out, scale, scale_value, bias, diagonal_mask)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, scale, scale_value, bias, diagonal_mask):
    B, H, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("mgit_fast::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: Optional[Tensor],
    scale_value: float, bias: Optional[Tensor], diagonal_mask: bool, need_dscale: bool, need_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = (new_buffer(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    dscale, dbias = backward_into(
        dout, q, k, v, out, lse, dq, dk, dv, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias
    )
    return dq, dk, dv, _or_empty(dscale, q), _or_empty(dbias, q)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    return (*grads, _fake_grad(scale, need_dscale, q), _fake_grad(bias, need_dbias, q))


@torch.library.custom_op("mgit_fast::attention_qkvpacked_fwd", mutates_args=())
def attention_qkvpacked_fwd(
    qkv: Tensor, num_heads: int, scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor],
    diagonal_mask: bool,
) -> Tuple[Tensor, Tensor]:
    B, N, width = qkv.shape
    out = new_buffer((B, N, width // 3), device=qkv.device, dtype=qkv.dtype)
    (out_heads,) = _heads(out, num_heads, 1)
    lse = forward_into(*_heads(qkv, num_heads, 3), out_heads, scale, scale_value, bias, diagonal_mask)
    return out, lse


@attention_qkvpacked_fwd.register_fake
def _(qkv, num_heads, scale, scale_value, bias, diagonal_mask):
    B, N, width = qkv.shape
    return qkv.new_empty((B, N, width // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("mgit_fast::attention_qkvpacked_bwd", mutates_args=())
def attention_qkvpacked_bwd(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: Optional[Tensor],
    scale_value: float, bias: Optional[Tensor], diagonal_mask: bool, need_dscale: bool, need_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dqkv = new_buffer(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    (dout_heads,) = _heads(dout, num_heads, 1)
    (out_heads,) = _heads(out, num_heads, 1)
    dscale, dbias = backward_into(
        dout_heads, *_heads(qkv, num_heads, 3), out_heads, lse, *_heads(dqkv, num_heads, 3),
        scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias,
    )
    return dqkv, _or_empty(dscale, qkv), _or_empty(dbias, qkv)


@attention_qkvpacked_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale, scale_value, bias, diagonal_mask, need_dscale, need_dbias):
    return (
        torch.empty_like(qkv, memory_format=torch.contiguous_format),
        _fake_grad(scale, need_dscale, qkv),
        _fake_grad(bias, need_dbias, qkv),
    )


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return grad if grad is not None else like.new_empty(0)


def _fake_grad(param: Optional[Tensor], needed: bool, like: Tensor) -> Tensor:
    return torch.empty_like(param) if (needed and param is not None) else like.new_empty(0)


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _setup_attention(ctx, inputs, output):
    q, k, v, scale, scale_value, bias, diagonal_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, scale, bias)
    ctx.scale_value, ctx.diagonal_mask = scale_value, diagonal_mask


def _backward_attention(ctx, dout, _dlse):
    q, k, v, out, lse, scale, bias = ctx.saved_tensors
    need_dscale = scale is not None and ctx.needs_input_grad[3]
    need_dbias = bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dscale, dbias = attention_bwd(
        _unit_stride(dout), q, k, v, out, lse, scale, ctx.scale_value, bias, ctx.diagonal_mask, need_dscale, need_dbias
    )
    return dq, dk, dv, (dscale if need_dscale else None), None, (dbias if need_dbias else None), None


attention_fwd.register_autograd(_backward_attention, setup_context=_setup_attention)


def _setup_packed(ctx, inputs, output):
    qkv, num_heads, scale, scale_value, bias, diagonal_mask = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, scale, bias)
    ctx.num_heads, ctx.scale_value, ctx.diagonal_mask = num_heads, scale_value, diagonal_mask


def _backward_packed(ctx, dout, _dlse):
    qkv, out, lse, scale, bias = ctx.saved_tensors
    need_dscale = scale is not None and ctx.needs_input_grad[2]
    need_dbias = bias is not None and ctx.needs_input_grad[4]
    dqkv, dscale, dbias = attention_qkvpacked_bwd(
        dout.contiguous(), qkv, out, lse, ctx.num_heads, scale, ctx.scale_value, bias, ctx.diagonal_mask,
        need_dscale, need_dbias,
    )
    return dqkv, None, (dscale if need_dscale else None), None, (dbias if need_dbias else None), None


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


def attention(q, k, v, scale=None, bias=None, diagonal_mask=False) -> Tensor:
    """``softmax(q·kᵀ·scale + bias)·v`` for q, k, v ``[B, H, N, D]``."""
    scale_t, scale_v = _split_scale(scale, q.shape[-1])
    out, _ = attention_fwd(_unit_stride(q), _unit_stride(k), _unit_stride(v), scale_t, scale_v, bias, diagonal_mask)
    return out


def attention_qkvpacked(qkv, num_heads, scale=None, bias=None, diagonal_mask=False) -> Tensor:
    """Attention from a packed ``qkv [B, N, 3·H·D]`` (read in place) to ``[B, N, H·D]``."""
    qkv = _unit_stride(qkv)
    scale_t, scale_v = _split_scale(scale, qkv.shape[-1] // (3 * num_heads))
    out, _ = attention_qkvpacked_fwd(qkv, num_heads, scale_t, scale_v, bias, diagonal_mask)
    return out
