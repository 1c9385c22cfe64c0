"""Fused MGiT loss: two label-smoothed cross-entropies and the Jensen–Shannon divergence,
forward and backward, reading both logits [B, C] in one kernel.

Per kept row i (target y ≠ ignore_index), with z = logits_primary, w = logits_auxiliary,
ε = label_smoothing, T = temperature, C classes:

    ce_z   = (1 − ε)(lse(z) − z_y) + ε(lse(z) − mean(z))            (and ce_w alike)
    log p  = z/T − lse(z/T),  log q = w/T − lse(w/T),  log m = log ½(p + q)
    kl_p   = Σ p (log p − log m),  kl_q = Σ q (log q − log m),  js = ½ kl_p + ½ kl_q

The four outputs are means over the kept rows: ce_primary, ce_auxiliary, js and
loss = ce_primary + ce_auxiliary + λ·js. Gradients, for upstream g_loss, g_cp, g_ca, g_js and
n kept rows:

    ∂ce_z/∂z_j = softmax(z)_j − (1 − ε)[j = y] − ε/C
    ∂js/∂z_j   = (1/T) · p_j · (½(log p_j − log m_j) − ½ kl_p)          (and w with q, kl_q)
    dz = ((g_loss + g_cp)·∂ce_z + (λ·g_loss + g_js)·∂js) / n

Forward: each program owns a tile of ROWS rows and walks C in BLOCK_C chunks: one pass when
a row fits in one chunk; otherwise a first pass for the log-sum-exps (online) and a second
for the JS sums, so each logit is read at most twice. Each program writes its partial sums
(ce_z, ce_w, js, kept rows, invalid labels); a one-program kernel reduces them in a fixed order
and divides, so no count ever reaches the host. Per-row statistics (four lse, kl_p, kl_q) are
saved for the backward, which reads each logit once and writes each gradient once.

A label outside [0, C) that is not ignore_index counts as invalid: the row is left out, every
output becomes NaN (so a MultiGradientAdamW step skips), and the count is returned for the
caller to raise on at its next synchronisation.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import on_device

LN2 = 0.6931471805599453


@triton.jit
def _load_tile(Z, rows, cols, stride_z, B, C):
    ok = (rows[:, None] < B) & (cols[None, :] < C)
    return tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)


@triton.jit
def _online_lse(m, s, x):
    """Updates a running (max, Σ exp(x − max)) with a tile x [ROWS, BLOCK_C] (−∞ = absent)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
    return m_new, s


@triton.jit
def _js_terms(z, w, lse_zt, lse_wt, inv_t, ok):
    """log p, log q, p, q and log m for a tile; zeros (not NaN) outside the row."""
    log_p = tl.where(ok, z * inv_t - lse_zt[:, None], 0.0)
    log_q = tl.where(ok, w * inv_t - lse_wt[:, None], 0.0)
    p = tl.where(ok, tl.exp(log_p), 0.0)
    q = tl.where(ok, tl.exp(log_q), 0.0)
    hi = tl.maximum(log_p, log_q)
    log_m = hi + tl.log(1.0 + tl.exp(-tl.abs(log_p - log_q))) - 0.6931471805599453
    return log_p, log_q, p, q, log_m


@triton.jit
def _log_sum_exps(m_z, s_z, m_w, s_w, m_zt, s_zt, m_wt, s_wt, TEMPERED: tl.constexpr):
    """lse(z), lse(w), lse(z/T), lse(w/T) from the running (max, sum) pairs."""
    lse_z = m_z + tl.log(s_z)
    lse_w = m_w + tl.log(s_w)
    if TEMPERED:
        return lse_z, lse_w, m_zt + tl.log(s_zt), m_wt + tl.log(s_wt)
    else:
        return lse_z, lse_w, lse_z, lse_w


@triton.jit
def _kl_sums(z, w, lse_zt, lse_wt, inv_t, ok):
    """Σ p (log p − log m) and Σ q (log q − log m) over a tile, per row."""
    log_p, log_q, p, q, log_m = _js_terms(z, w, lse_zt, lse_wt, inv_t, ok)
    return tl.sum(p * (log_p - log_m), 1), tl.sum(q * (log_q - log_m), 1)


@triton.jit
def _mgit_loss_fwd_kernel(
    Z, W, Y, STATS, PARTIAL,
    B, C, stride_z, stride_w, ignore_index, label_smoothing, inv_t,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_CHUNK: tl.constexpr, TEMPERED: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # rows · stride can pass 2³¹
    offs = tl.arange(0, BLOCK_C)
    row_ok = rows < B
    y = tl.load(Y + rows, mask=row_ok, other=ignore_index).to(tl.int32)
    invalid = row_ok & (y != ignore_index) & ((y < 0) | (y >= C))
    kept = row_ok & (y != ignore_index) & ~invalid

    neg_inf = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    zero = tl.zeros([ROWS], dtype=tl.float32)
    m_z, s_z, m_w, s_w = neg_inf, zero, neg_inf, zero
    m_zt, s_zt, m_wt, s_wt = neg_inf, zero, neg_inf, zero
    sum_z, sum_w, z_y, w_y = zero, zero, zero, zero
    kl_p, kl_q = zero, zero
    # pass 1 (the only one when a row fits in one chunk): log-sum-exps, sums, target logits
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        ok = row_ok[:, None] & (cols[None, :] < C)
        z = _load_tile(Z, rows, cols, stride_z, B, C)
        w = _load_tile(W, rows, cols, stride_w, B, C)
        m_z, s_z = _online_lse(m_z, s_z, z)
        m_w, s_w = _online_lse(m_w, s_w, w)
        if TEMPERED:
            m_zt, s_zt = _online_lse(m_zt, s_zt, z * inv_t)
            m_wt, s_wt = _online_lse(m_wt, s_wt, w * inv_t)
        sum_z += tl.sum(tl.where(ok, z, 0.0), 1)
        sum_w += tl.sum(tl.where(ok, w, 0.0), 1)
        is_y = cols[None, :] == y[:, None]
        z_y += tl.sum(tl.where(is_y & ok, z, 0.0), 1)
        w_y += tl.sum(tl.where(is_y & ok, w, 0.0), 1)
        if SINGLE_CHUNK:  # the whole row is in this tile: the JS sums need no second pass
            _, _, lse_zt1, lse_wt1 = _log_sum_exps(m_z, s_z, m_w, s_w, m_zt, s_zt, m_wt, s_wt, TEMPERED)
            kl_p, kl_q = _kl_sums(z, w, lse_zt1, lse_wt1, inv_t, ok)
    lse_z, lse_w, lse_zt, lse_wt = _log_sum_exps(m_z, s_z, m_w, s_w, m_zt, s_zt, m_wt, s_wt, TEMPERED)
    if not SINGLE_CHUNK:  # pass 2: the JS sums need the tempered log-sum-exps
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            ok = row_ok[:, None] & (cols[None, :] < C)
            z = _load_tile(Z, rows, cols, stride_z, B, C)
            w = _load_tile(W, rows, cols, stride_w, B, C)
            chunk_p, chunk_q = _kl_sums(z, w, lse_zt, lse_wt, inv_t, ok)
            kl_p += chunk_p
            kl_q += chunk_q

    ce_z = (1.0 - label_smoothing) * (lse_z - z_y) + label_smoothing * (lse_z - sum_z / C)
    ce_w = (1.0 - label_smoothing) * (lse_w - w_y) + label_smoothing * (lse_w - sum_w / C)
    js = 0.5 * kl_p + 0.5 * kl_q
    stats = STATS + rows * 6
    tl.store(stats + 0, lse_z, mask=row_ok)
    tl.store(stats + 1, lse_w, mask=row_ok)
    tl.store(stats + 2, lse_zt, mask=row_ok)
    tl.store(stats + 3, lse_wt, mask=row_ok)
    tl.store(stats + 4, kl_p, mask=row_ok)
    tl.store(stats + 5, kl_q, mask=row_ok)
    out = PARTIAL + pid * 5
    tl.store(out + 0, tl.sum(tl.where(kept, ce_z, 0.0), 0))
    tl.store(out + 1, tl.sum(tl.where(kept, ce_w, 0.0), 0))
    tl.store(out + 2, tl.sum(tl.where(kept, js, 0.0), 0))
    tl.store(out + 3, tl.sum(kept.to(tl.float32), 0))
    tl.store(out + 4, tl.sum(invalid.to(tl.float32), 0))


@triton.jit
def _mgit_loss_finish_kernel(PARTIAL, OUT, COUNTS, P, js_weight, BLOCK_P: tl.constexpr):
    """Sums the per-program partials in a fixed order; OUT = (loss, ce_z, ce_w, js) means,
    COUNTS = (kept rows, invalid labels)."""
    acc = tl.zeros([BLOCK_P, 8], dtype=tl.float32)
    lanes = tl.arange(0, 8)
    for start in range(0, P, BLOCK_P):
        progs = start + tl.arange(0, BLOCK_P)
        ok = (progs[:, None] < P) & (lanes[None, :] < 5)
        acc += tl.load(PARTIAL + progs[:, None] * 5 + lanes[None, :], mask=ok, other=0.0)
    totals = tl.sum(acc, 0)
    ce_z = tl.sum(tl.where(lanes == 0, totals, 0.0), 0)
    ce_w = tl.sum(tl.where(lanes == 1, totals, 0.0), 0)
    js = tl.sum(tl.where(lanes == 2, totals, 0.0), 0)
    kept = tl.sum(tl.where(lanes == 3, totals, 0.0), 0)
    invalid = tl.sum(tl.where(lanes == 4, totals, 0.0), 0)
    scale = tl.where(invalid > 0, float("nan"), 1.0 / tl.maximum(kept, 1.0))
    ce_z = ce_z * scale
    ce_w = ce_w * scale
    js = js * scale
    tl.store(OUT + 0, ce_z + ce_w + js_weight * js)
    tl.store(OUT + 1, ce_z)
    tl.store(OUT + 2, ce_w)
    tl.store(OUT + 3, js)
    tl.store(COUNTS + 0, kept)
    tl.store(COUNTS + 1, invalid)


@triton.jit
def _mgit_loss_bwd_kernel(
    Z, W, Y, STATS, COUNTS, GRAD, DZ, DW,
    B, C, stride_z, stride_w, stride_dz, stride_dw, ignore_index, label_smoothing, inv_t, js_weight,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # rows · stride can pass 2³¹
    offs = tl.arange(0, BLOCK_C)
    row_ok = rows < B
    y = tl.load(Y + rows, mask=row_ok, other=ignore_index).to(tl.int32)
    kept = row_ok & (y != ignore_index) & (y >= 0) & (y < C)

    inv_n = 1.0 / tl.maximum(tl.load(COUNTS), 1.0)
    g_loss = tl.load(GRAD + 0)
    w_z = (g_loss + tl.load(GRAD + 1)) * inv_n
    w_w = (g_loss + tl.load(GRAD + 2)) * inv_n
    w_js = (js_weight * g_loss + tl.load(GRAD + 3)) * inv_n * inv_t
    stats = STATS + rows * 6
    lse_z = tl.load(stats + 0, mask=row_ok, other=0.0)
    lse_w = tl.load(stats + 1, mask=row_ok, other=0.0)
    lse_zt = tl.load(stats + 2, mask=row_ok, other=0.0)
    lse_wt = tl.load(stats + 3, mask=row_ok, other=0.0)
    kl_p = tl.load(stats + 4, mask=row_ok, other=0.0)
    kl_q = tl.load(stats + 5, mask=row_ok, other=0.0)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        ok = kept[:, None] & (cols[None, :] < C)
        z = _load_tile(Z, rows, cols, stride_z, B, C)
        w = _load_tile(W, rows, cols, stride_w, B, C)
        is_y = tl.where(cols[None, :] == y[:, None], 1.0 - label_smoothing, 0.0)
        d_ce_z = tl.exp(tl.where(ok, z - lse_z[:, None], float("-inf"))) - is_y - label_smoothing / C
        d_ce_w = tl.exp(tl.where(ok, w - lse_w[:, None], float("-inf"))) - is_y - label_smoothing / C
        log_p, log_q, p, q, log_m = _js_terms(z, w, lse_zt, lse_wt, inv_t, ok)
        d_js_z = p * (0.5 * (log_p - log_m) - 0.5 * kl_p[:, None])
        d_js_w = q * (0.5 * (log_q - log_m) - 0.5 * kl_q[:, None])
        dz = tl.where(ok, w_z * d_ce_z + w_js * d_js_z, 0.0)
        dw = tl.where(ok, w_w * d_ce_w + w_js * d_js_w, 0.0)
        store_ok = row_ok[:, None] & (cols[None, :] < C)
        tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=store_ok)
        tl.store(DW + rows[:, None] * stride_dw + cols[None, :], dw.to(DW.dtype.element_ty), mask=store_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def new_buffer(shape, *, device, dtype) -> Tensor:
    """Every tensor a kernel writes is allocated here, uninitialised (tests poison them)."""
    return torch.empty(shape, device=device, dtype=dtype)


def tile(B: int, C: int) -> Tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps): up to 2,048 classes of a row per chunk, at most 8 logits of
    each model per thread, 4 when a program holds several rows (which costs more registers), so
    that three or more programs stay resident per SM (`mgit-fast inspect`); several rows per
    program when C is small, but no more than keeps about two programs per SM busy."""
    block_c = min(triton.next_power_of_2(C), 2048)
    num_warps = 8 if block_c >= 2048 else 4
    rows = max(1, min(4 * 32 * num_warps // block_c, triton.next_power_of_2(triton.cdiv(B, 264))))
    return rows, block_c, num_warps


def _rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(z, w, target, label_smoothing, temperature, js_weight, ignore_index) -> Tuple[Tensor, Tensor, Tensor]:
    """Launches the forward: (outputs [4] = loss, ce_primary, ce_auxiliary, js; stats [B, 6]; counts [2])."""
    B, C = z.shape
    rows, block_c, num_warps = tile(B, C)
    programs = triton.cdiv(B, rows)
    device = z.device
    stats = new_buffer((B, 6), device=device, dtype=torch.float32)
    partial = new_buffer((programs, 5), device=device, dtype=torch.float32)
    out = new_buffer((4,), device=device, dtype=torch.float32)
    counts = new_buffer((2,), device=device, dtype=torch.float32)
    with on_device(z):
        _mgit_loss_fwd_kernel[(programs,)](
            z, w, target, stats, partial,
            B, C, z.stride(0), w.stride(0), ignore_index, label_smoothing, 1.0 / temperature,
            ROWS=rows, BLOCK_C=block_c, SINGLE_CHUNK=C <= block_c, TEMPERED=temperature != 1.0,
            num_warps=num_warps,
        )
        _mgit_loss_finish_kernel[(1,)](partial, out, counts, programs, js_weight, BLOCK_P=256)
    return out, stats, counts


@torch.library.custom_op("mgit_fast::mgit_loss_fwd", mutates_args=())
def mgit_loss_fwd(
    logits_primary: Tensor, logits_auxiliary: Tensor, target: Tensor, label_smoothing: float, temperature: float,
    js_weight: float, ignore_index: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    return forward(logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight, ignore_index)


@mgit_loss_fwd.register_fake
def _(logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight, ignore_index):
    B = logits_primary.shape[0]
    f32 = dict(dtype=torch.float32)
    return logits_primary.new_empty((4,), **f32), logits_primary.new_empty((B, 6), **f32), logits_primary.new_empty((2,), **f32)


def backward(grad, z, w, target, stats, counts, label_smoothing, temperature, js_weight, ignore_index):
    """Launches the backward: (dz, dw)."""
    B, C = z.shape
    rows, block_c, num_warps = tile(B, C)
    dz = new_buffer((B, C), device=z.device, dtype=z.dtype)
    dw = new_buffer((B, C), device=w.device, dtype=w.dtype)
    with on_device(z):
        _mgit_loss_bwd_kernel[(triton.cdiv(B, rows),)](
            z, w, target, stats, counts, grad, dz, dw,
            B, C, z.stride(0), w.stride(0), dz.stride(0), dw.stride(0), ignore_index, label_smoothing,
            1.0 / temperature, js_weight,
            ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
        )
    return dz, dw


@torch.library.custom_op("mgit_fast::mgit_loss_bwd", mutates_args=())
def mgit_loss_bwd(
    grad: Tensor, logits_primary: Tensor, logits_auxiliary: Tensor, target: Tensor, stats: Tensor, counts: Tensor,
    label_smoothing: float, temperature: float, js_weight: float, ignore_index: int,
) -> Tuple[Tensor, Tensor]:
    return backward(grad, logits_primary, logits_auxiliary, target, stats, counts, label_smoothing, temperature,
                    js_weight, ignore_index)


@mgit_loss_bwd.register_fake
def _(grad, logits_primary, logits_auxiliary, target, stats, counts, label_smoothing, temperature, js_weight,
      ignore_index):
    return torch.empty_like(logits_primary), torch.empty_like(logits_auxiliary)


def _setup(ctx, inputs, output):
    z, w, target, label_smoothing, temperature, js_weight, ignore_index = inputs
    _, stats, counts = output
    ctx.save_for_backward(z, w, target, stats, counts)
    ctx.options = (label_smoothing, temperature, js_weight, ignore_index)


def _backward(ctx, grad_out, _grad_stats, _grad_counts):
    z, w, target, stats, counts = ctx.saved_tensors
    grad = grad_out.float().contiguous() if grad_out is not None else torch.zeros(4, device=z.device)
    dz, dw = mgit_loss_bwd(grad, z, w, target, stats, counts, *ctx.options)
    return dz, dw, None, None, None, None, None


mgit_loss_fwd.register_autograd(_backward, setup_context=_setup)


def mgit_loss(logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight, ignore_index):
    """(outputs [loss, ce_primary, ce_auxiliary, js], counts [kept rows, invalid labels]);
    arguments already checked by mgit_fast.functional."""
    out, _, counts = mgit_loss_fwd(
        _rows(logits_primary), _rows(logits_auxiliary), target.contiguous(), float(label_smoothing),
        float(temperature), float(js_weight), int(ignore_index),
    )
    return out, counts.detach()
