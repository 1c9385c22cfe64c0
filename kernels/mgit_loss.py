"""Fused MGiT loss: two label-smoothed cross-entropies and the Jensen–Shannon divergence,
forward and backward, reading both logits [B, C] in one kernel.

Per kept row i (target y ≠ ignore_index), with z = logits_primary, w = logits_auxiliary,
ε = label_smoothing, T = temperature, λ = js_weight, C classes:

    ce_z   = (1 − ε)(lse(z) − z_y) + ε(lse(z) − mean(z))            (and ce_w alike)
    log p  = z/T − lse(z/T),  log q = w/T − lse(w/T),  log m = log ½(p + q)
    kl_p   = Σ p (log p − log m),  kl_q = Σ q (log q − log m),  js = ½ kl_p + ½ kl_q

The four outputs are means over the n kept rows: ce_primary, ce_auxiliary, js and
loss = ce_primary + ce_auxiliary + λ·js. Their gradients, per row:

    ∂ce_z/∂z_j = softmax(z)_j − (1 − ε)[j = y] − ε/C
    ∂js/∂z_j   = (1/T) · p_j · (½(log p_j − log m_j) − ½ kl_p)          (and w with q, kl_q)

One pass: when a logit needs a gradient and a row fits one chunk (C ≤ 2,048), the forward,
which holds the row in registers, also writes G_z = ∂ce_z/∂z + λ·∂js/∂z (and G_w) for every
kept row (0 elsewhere), not yet divided by n (`stores_gradients` says why not for longer rows). For upstream gradients (g_loss, g_cp, g_ca, g_js) the gradient is

    dz = ((g_loss + g_cp)·∂ce_z + (λ·g_loss + g_js)·∂js) / n  =  (g_loss + g_cp)/n · G_z

whenever g_js = λ·g_cp and g_js = λ·g_ca (a loss built from `loss`, or from
`ce_primary + ce_auxiliary + λ·js`, times any factor): then the backward only scales G. Any
other weighting of the four outputs (decided on the device, no synchronisation) recomputes
the rows from the saved logits in the same launch.

The four outputs are separate 0-dim float32 tensors, each written by the kernels (not views of
one buffer, whose unbind would make autograd build zeros for the unused outputs and stack
them). An output the objective does not use gets no upstream gradient (None, with
set_materialize_grads(False)): the backward kernel takes a pointer per gradient and a
constexpr flag for each, an absent one counting as 0 without a read, and with only g_loss
present and G stored it compiles the scaling alone. So `out.loss.backward()` costs the forward
launch(es), one backward launch and autograd's own seed (ones_like), nothing more; when no
output has a gradient the backward launches nothing.

Tiling: each program owns tiles of ROWS rows and walks C in BLOCK_C chunks. A row that fits
in one chunk is read once and every exponential is computed once (softmax, p and q reuse the
log-sum-exp's). A longer row takes a pass for the log-sum-exps (online) and one for the JS sums;
its backward recomputes them. When B·C is small one program does every row and
writes the four outputs itself: one launch. Otherwise each program writes its partial sums
(ce_z, ce_w, js, kept rows, invalid labels) and a one-program kernel reduces them in a fixed
order, so no count ever reaches the host.

temperature and js_weight are Python floats or 0-dim float32 tensors read by the kernels from
device memory (a CUDA graph replays later in-place changes). The values a forward used are
saved with the row count for its backward.

A label outside [0, C) that is not ignore_index counts as invalid: the row is left out, every
output becomes NaN (so a MultiGradientAdamW step skips), and the count is returned for the
caller to raise on at its next synchronisation.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import on_device

LN2 = 0.6931471805599453
SINGLE_PROGRAM_ELEMENTS = 8192  # B·C up to this: one program, one launch


@triton.jit
def _scalar(X, FROM_POINTER: tl.constexpr):
    """A float argument, or the value of a 0-dim tensor when X points at one."""
    if FROM_POINTER:
        return tl.load(X).to(tl.float32)
    else:
        return X


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
def _log_m(log_p, log_q):
    """log ½(p + q) from log p and log q, stable when both underflow."""
    hi = tl.maximum(log_p, log_q)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(log_p - log_q))) - 0.6931471805599453


@triton.jit
def _js_terms(z, w, lse_zt, lse_wt, inv_t, ok):
    """log p, log q, p, q and log m for a tile; zeros (not NaN) outside the row."""
    log_p = tl.where(ok, z * inv_t - lse_zt[:, None], 0.0)
    log_q = tl.where(ok, w * inv_t - lse_wt[:, None], 0.0)
    p = tl.where(ok, tl.exp(log_p), 0.0)
    q = tl.where(ok, tl.exp(log_q), 0.0)
    return log_p, log_q, p, q, _log_m(log_p, log_q)


@triton.jit
def _store_grad(D, rows, cols, stride_d, B, C, keep, c_ce, c_js, d_ce, p, log_p, log_m, kl):
    """D[rows, cols] = c_ce·∂ce + c_js·∂js on the kept rows, 0 on the others (d_js below lacks
    ∂js's factor 1/T: c_js carries it)."""
    d_js = p * (0.5 * (log_p - log_m) - 0.5 * kl[:, None])
    g = tl.where(keep, c_ce * d_ce + c_js * d_js, 0.0)
    store_ok = (rows[:, None] < B) & (cols[None, :] < C)
    tl.store(D + rows[:, None] * stride_d + cols[None, :], g.to(D.dtype.element_ty), mask=store_ok)


@triton.jit
def _row_tile(
    Z, W, Y, DZ, DW, STATS, rows, B, C, stride_z, stride_w, stride_d, ignore_index, label_smoothing, inv_t,
    c_z, c_w, c_js,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_CHUNK: tl.constexpr, TEMPERED: tl.constexpr, WRITE: tl.constexpr,
    SAVE_STATS: tl.constexpr, FROM_STATS: tl.constexpr,
):
    """One tile of rows: per row ce_z, ce_w, js and the kept / invalid masks. With WRITE, also
    DZ = c_z·∂ce_z + c_js·∂js/∂z and DW = c_w·∂ce_w + c_js·∂js/∂w for these rows. A row longer
    than a chunk saves its statistics (log-sum-exps, KL sums) to STATS [B, 6] with SAVE_STATS,
    and with FROM_STATS reads them instead of its first two passes (the ce/js it returns are
    then meaningless)."""
    offs = tl.arange(0, BLOCK_C)
    row_ok = rows < B
    y = tl.load(Y + rows, mask=row_ok, other=ignore_index)
    listed = row_ok & (y != ignore_index)
    invalid = listed & ((y < 0) | (y >= C))
    kept = listed & ~invalid
    y = tl.where(kept, y, -1).to(tl.int32)  # in [0, C) on kept rows, so int32 is exact
    eps_c = label_smoothing / C
    c_js_t = c_js * inv_t
    if SINGLE_CHUNK:  # the row is in registers: every exponential once
        ok = row_ok[:, None] & (offs[None, :] < C)
        z = _load_tile(Z, rows, offs, stride_z, B, C)
        w = _load_tile(W, rows, offs, stride_w, B, C)
        m_z = tl.max(z, 1)
        m_w = tl.max(w, 1)
        m_z = tl.where(row_ok, m_z, 0.0)
        m_w = tl.where(row_ok, m_w, 0.0)
        d_z = z - m_z[:, None]  # −∞ outside the row
        d_w = w - m_w[:, None]
        e_z = tl.exp(d_z)
        e_w = tl.exp(d_w)
        s_z = tl.sum(e_z, 1)
        s_w = tl.sum(e_w, 1)
        if TEMPERED:
            e_zt = tl.exp(d_z * inv_t)
            e_wt = tl.exp(d_w * inv_t)
            s_zt = tl.sum(e_zt, 1)
            s_wt = tl.sum(e_wt, 1)
            log_p = tl.where(ok, d_z * inv_t - tl.log(s_zt)[:, None], 0.0)
            log_q = tl.where(ok, d_w * inv_t - tl.log(s_wt)[:, None], 0.0)
        else:
            e_zt, e_wt, s_zt, s_wt = e_z, e_w, s_z, s_w
            log_p = tl.where(ok, d_z - tl.log(s_z)[:, None], 0.0)
            log_q = tl.where(ok, d_w - tl.log(s_w)[:, None], 0.0)
        p = e_zt * (1.0 / s_zt)[:, None]
        q = e_wt * (1.0 / s_wt)[:, None]
        log_m = _log_m(log_p, log_q)
        # the select keeps each product rounded before the row sum: fused into the sum's first
        # cross-lane add (an fma), the lanes of a row would get sums an ulp apart and write them
        # to one shared-memory slot (a race compute-sanitizer reports); p, q are 0 outside `ok`
        kl_p = tl.sum(tl.where(ok, p * (log_p - log_m), 0.0), 1)
        kl_q = tl.sum(tl.where(ok, q * (log_q - log_m), 0.0), 1)
        lse_z = m_z + tl.log(s_z)
        lse_w = m_w + tl.log(s_w)
        is_y = offs[None, :] == y[:, None]
        sum_z = tl.sum(tl.where(ok, z, 0.0), 1)
        sum_w = tl.sum(tl.where(ok, w, 0.0), 1)
        z_y = tl.sum(tl.where(is_y, z, 0.0), 1)
        w_y = tl.sum(tl.where(is_y, w, 0.0), 1)
        if WRITE:
            keep = kept[:, None] & (offs[None, :] < C)
            hot = tl.where(is_y, 1.0 - label_smoothing, 0.0) + eps_c
            if TEMPERED:
                d_ce_z = e_z * (1.0 / s_z)[:, None] - hot
                d_ce_w = e_w * (1.0 / s_w)[:, None] - hot
            else:
                d_ce_z = p - hot
                d_ce_w = q - hot
            _store_grad(DZ, rows, offs, stride_d, B, C, keep, c_z, c_js_t, d_ce_z, p, log_p, log_m, kl_p)
            _store_grad(DW, rows, offs, stride_d, B, C, keep, c_w, c_js_t, d_ce_w, q, log_q, log_m, kl_q)
    else:
        neg_inf = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        zero = tl.zeros([ROWS], dtype=tl.float32)
        m_z, s_z, m_w, s_w = neg_inf, zero, neg_inf, zero
        m_zt, s_zt, m_wt, s_wt = neg_inf, zero, neg_inf, zero
        sum_z, sum_w, z_y, w_y = zero, zero, zero, zero
        if FROM_STATS:
            saved = STATS + rows * 6
            lse_z = tl.load(saved + 0, mask=row_ok, other=0.0)
            lse_w = tl.load(saved + 1, mask=row_ok, other=0.0)
            lse_zt = tl.load(saved + 2, mask=row_ok, other=0.0)
            lse_wt = tl.load(saved + 3, mask=row_ok, other=0.0)
            kl_p = tl.load(saved + 4, mask=row_ok, other=0.0)
            kl_q = tl.load(saved + 5, mask=row_ok, other=0.0)
        else:
            for start in range(0, C, BLOCK_C):  # pass 1: log-sum-exps, sums, target logits
                cols = start + offs
                ok = row_ok[:, None] & (cols[None, :] < C)
                z = _load_tile(Z, rows, cols, stride_z, B, C)
                w = _load_tile(W, rows, cols, stride_w, B, C)
                m_z, s_z = _online_lse(m_z, s_z, z)
                m_w, s_w = _online_lse(m_w, s_w, w)
                if TEMPERED:
                    m_zt, s_zt = _online_lse(m_zt, s_zt, z * inv_t)
                    m_wt, s_wt = _online_lse(m_wt, s_wt, w * inv_t)
                is_y = cols[None, :] == y[:, None]
                sum_z += tl.sum(tl.where(ok, z, 0.0), 1)
                sum_w += tl.sum(tl.where(ok, w, 0.0), 1)
                z_y += tl.sum(tl.where(is_y, z, 0.0), 1)
                w_y += tl.sum(tl.where(is_y, w, 0.0), 1)
            lse_z = m_z + tl.log(s_z)
            lse_w = m_w + tl.log(s_w)
            if TEMPERED:
                lse_zt = m_zt + tl.log(s_zt)
                lse_wt = m_wt + tl.log(s_wt)
            else:
                lse_zt, lse_wt = lse_z, lse_w
            kl_p, kl_q = zero, zero
            for start in range(0, C, BLOCK_C):  # pass 2: the JS sums
                cols = start + offs
                ok = row_ok[:, None] & (cols[None, :] < C)
                z = _load_tile(Z, rows, cols, stride_z, B, C)
                w = _load_tile(W, rows, cols, stride_w, B, C)
                log_p, log_q, p, q, log_m = _js_terms(z, w, lse_zt, lse_wt, inv_t, ok)
                kl_p += tl.sum(p * (log_p - log_m), 1)
                kl_q += tl.sum(q * (log_q - log_m), 1)
            if SAVE_STATS:
                saved = STATS + rows * 6
                tl.store(saved + 0, lse_z, mask=row_ok)
                tl.store(saved + 1, lse_w, mask=row_ok)
                tl.store(saved + 2, lse_zt, mask=row_ok)
                tl.store(saved + 3, lse_wt, mask=row_ok)
                tl.store(saved + 4, kl_p, mask=row_ok)
                tl.store(saved + 5, kl_q, mask=row_ok)
        if WRITE:
            for start in range(0, C, BLOCK_C):  # pass 3: the gradients
                cols = start + offs
                ok = row_ok[:, None] & (cols[None, :] < C)
                keep = kept[:, None] & (cols[None, :] < C)
                z = _load_tile(Z, rows, cols, stride_z, B, C)
                w = _load_tile(W, rows, cols, stride_w, B, C)
                log_p, log_q, p, q, log_m = _js_terms(z, w, lse_zt, lse_wt, inv_t, ok)
                hot = tl.where(cols[None, :] == y[:, None], 1.0 - label_smoothing, 0.0) + eps_c
                if TEMPERED:
                    d_ce_z = tl.exp(tl.where(ok, z - lse_z[:, None], float("-inf"))) - hot
                    d_ce_w = tl.exp(tl.where(ok, w - lse_w[:, None], float("-inf"))) - hot
                else:
                    d_ce_z = p - hot
                    d_ce_w = q - hot
                _store_grad(DZ, rows, cols, stride_d, B, C, keep, c_z, c_js_t, d_ce_z, p, log_p, log_m, kl_p)
                _store_grad(DW, rows, cols, stride_d, B, C, keep, c_w, c_js_t, d_ce_w, q, log_q, log_m, kl_q)
    ce_z = (1.0 - label_smoothing) * (lse_z - z_y) + label_smoothing * (lse_z - sum_z / C)
    ce_w = (1.0 - label_smoothing) * (lse_w - w_y) + label_smoothing * (lse_w - sum_w / C)
    return ce_z, ce_w, 0.5 * kl_p + 0.5 * kl_q, kept, invalid


@triton.jit
def _write_outputs(OUT_LOSS, OUT_CP, OUT_CA, OUT_JS, AUX, ce_z, ce_w, js, kept, invalid, js_weight, temperature):
    """The four 0-dim outputs loss, ce_z, ce_w, js from the sums over the kept rows (NaN after an
    invalid label); AUX = (kept rows, invalid labels, js_weight, temperature) for the backward."""
    scale = tl.where(invalid > 0, float("nan"), 1.0 / tl.maximum(kept, 1.0))
    ce_z = ce_z * scale
    ce_w = ce_w * scale
    js = js * scale
    tl.store(OUT_LOSS, ce_z + ce_w + js_weight * js)
    tl.store(OUT_CP, ce_z)
    tl.store(OUT_CA, ce_w)
    tl.store(OUT_JS, js)
    tl.store(AUX + 0, kept)
    tl.store(AUX + 1, invalid)
    tl.store(AUX + 2, js_weight)
    tl.store(AUX + 3, temperature)


@triton.jit
def _mgit_loss_fwd_kernel(
    Z, W, Y, GZ, GW, STATS, PARTIAL, OUT_LOSS, OUT_CP, OUT_CA, OUT_JS, AUX, TEMPERATURE, JS_WEIGHT,
    B, C, stride_z, stride_w, ignore_index, label_smoothing,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_CHUNK: tl.constexpr, TEMPERED: tl.constexpr,
    T_POINTER: tl.constexpr, JS_POINTER: tl.constexpr, WRITE: tl.constexpr, SAVE_STATS: tl.constexpr,
    SINGLE_PROGRAM: tl.constexpr,
):
    """Per-row sums, and with WRITE the unscaled gradients GZ, GW [B, C] (contiguous), or with
    SAVE_STATS the per-row statistics STATS [B, 6] of rows longer than a chunk. One
    program: every tile, then the four outputs and AUX; several: one tile each, then PARTIAL[pid]."""
    temperature = _scalar(TEMPERATURE, T_POINTER)
    js_weight = _scalar(JS_WEIGHT, JS_POINTER)
    inv_t = 1.0 / temperature
    lanes = tl.arange(0, ROWS)
    sum_z = tl.zeros([ROWS], dtype=tl.float32)
    sum_w, sum_js, n_kept, n_invalid = sum_z, sum_z, sum_z, sum_z
    if SINGLE_PROGRAM:
        first, last = 0, tl.cdiv(B, ROWS)
    else:
        first = tl.program_id(0)
        last = first + 1
    for tile_index in range(first, last):
        rows = (tile_index * ROWS + lanes).to(tl.int64)  # rows · stride can pass 2³¹
        ce_z, ce_w, js, kept, invalid = _row_tile(
            Z, W, Y, GZ, GW, STATS, rows, B, C, stride_z, stride_w, C, ignore_index, label_smoothing, inv_t,
            1.0, 1.0, js_weight, ROWS, BLOCK_C, SINGLE_CHUNK, TEMPERED, WRITE, SAVE_STATS, False,
        )
        sum_z += tl.where(kept, ce_z, 0.0)
        sum_w += tl.where(kept, ce_w, 0.0)
        sum_js += tl.where(kept, js, 0.0)
        n_kept += kept.to(tl.float32)
        n_invalid += invalid.to(tl.float32)
    sum_z = tl.sum(sum_z, 0)
    sum_w = tl.sum(sum_w, 0)
    sum_js = tl.sum(sum_js, 0)
    n_kept = tl.sum(n_kept, 0)
    n_invalid = tl.sum(n_invalid, 0)
    if SINGLE_PROGRAM:
        _write_outputs(OUT_LOSS, OUT_CP, OUT_CA, OUT_JS, AUX, sum_z, sum_w, sum_js, n_kept, n_invalid, js_weight,
                       temperature)
    else:
        out = PARTIAL + first * 5
        tl.store(out + 0, sum_z)
        tl.store(out + 1, sum_w)
        tl.store(out + 2, sum_js)
        tl.store(out + 3, n_kept)
        tl.store(out + 4, n_invalid)


@triton.jit
def _mgit_loss_finish_kernel(
    PARTIAL, OUT_LOSS, OUT_CP, OUT_CA, OUT_JS, AUX, TEMPERATURE, JS_WEIGHT, P,
    T_POINTER: tl.constexpr, JS_POINTER: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Sums the per-program partials in a fixed order into the four outputs and AUX."""
    acc = tl.zeros([BLOCK_P, 8], dtype=tl.float32)
    lanes = tl.arange(0, 8)
    for start in range(0, P, BLOCK_P):
        progs = start + tl.arange(0, BLOCK_P)
        ok = (progs[:, None] < P) & (lanes[None, :] < 5)
        acc += tl.load(PARTIAL + progs[:, None] * 5 + lanes[None, :], mask=ok, other=0.0)
    totals = tl.sum(acc, 0)
    _write_outputs(
        OUT_LOSS, OUT_CP, OUT_CA, OUT_JS, AUX,
        tl.sum(tl.where(lanes == 0, totals, 0.0), 0),
        tl.sum(tl.where(lanes == 1, totals, 0.0), 0),
        tl.sum(tl.where(lanes == 2, totals, 0.0), 0),
        tl.sum(tl.where(lanes == 3, totals, 0.0), 0),
        tl.sum(tl.where(lanes == 4, totals, 0.0), 0),
        _scalar(JS_WEIGHT, JS_POINTER),
        _scalar(TEMPERATURE, T_POINTER),
    )


@triton.jit
def _scale_stored(GZ, GW, DZ, DW, c_z, c_w, first, last, B, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """DZ = c_z · GZ, DW = c_w · GW over the program's rows, [first·ROWS, last·ROWS) ∩ [0, B),
    contiguous (first = the program's id in both schedules)."""
    start = (tl.program_id(0) * ROWS).to(tl.int64) * C
    count = (tl.minimum(last * ROWS, B) - first * ROWS) * C
    for i in range(0, count, ROWS * BLOCK_C):
        offs = start + i + tl.arange(0, ROWS * BLOCK_C)
        ok = offs < start + count
        gz = tl.load(GZ + offs, mask=ok).to(tl.float32)
        gw = tl.load(GW + offs, mask=ok).to(tl.float32)
        tl.store(DZ + offs, (c_z * gz).to(DZ.dtype.element_ty), mask=ok)
        tl.store(DW + offs, (c_w * gw).to(DW.dtype.element_ty), mask=ok)


@triton.jit
def _recompute_rows(
    Z, W, Y, DZ, DW, STATS, first, last, B, C, stride_z, stride_w, ignore_index, label_smoothing, inv_t,
    c_z, c_w, c_js, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_CHUNK: tl.constexpr, TEMPERED: tl.constexpr,
    FROM_STATS: tl.constexpr,
):
    """DZ, DW of the tiles [first, last) recomputed from the logits (FROM_STATS: from the rows'
    saved statistics, in one pass)."""
    lanes = tl.arange(0, ROWS)
    for tile_index in range(first, last):
        rows = (tile_index * ROWS + lanes).to(tl.int64)
        _row_tile(
            Z, W, Y, DZ, DW, STATS, rows, B, C, stride_z, stride_w, C, ignore_index, label_smoothing, inv_t,
            c_z, c_w, c_js, ROWS, BLOCK_C, SINGLE_CHUNK, TEMPERED, True, False, FROM_STATS,
        )


@triton.jit
def _upstream(G, PRESENT: tl.constexpr):
    """An upstream gradient (a 0-dim tensor), or 0 where autograd had none: G then points at
    another tensor and is not read."""
    if PRESENT:
        return tl.load(G).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _mgit_loss_bwd_kernel(
    G_LOSS, G_CP, G_CA, G_JS, AUX, GZ, GW, Z, W, Y, DZ, DW,
    B, C, stride_z, stride_w, ignore_index, label_smoothing,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_CHUNK: tl.constexpr, TEMPERED: tl.constexpr,
    SINGLE_PROGRAM: tl.constexpr, STORED: tl.constexpr,
    HAS_LOSS: tl.constexpr, HAS_CP: tl.constexpr, HAS_CA: tl.constexpr, HAS_JS: tl.constexpr,
):
    """DZ, DW [B, C] (contiguous) for the upstream gradients g_loss, g_cp, g_ca, g_js of the four
    outputs (each 0-dim; one whose HAS_* flag is off is 0 and its pointer is not read): the
    stored G scaled when there is one (STORED) and the weighting allows it, else the rows
    recomputed from the logits (a row longer than a chunk: from its saved statistics,
    GZ = STATS, in one pass); the same rows per program as the forward."""
    inv_n = 1.0 / tl.maximum(tl.load(AUX + 0), 1.0)
    js_weight = tl.load(AUX + 2)
    inv_t = 1.0 / tl.load(AUX + 3)
    g_loss = _upstream(G_LOSS, HAS_LOSS)
    g_cz = _upstream(G_CP, HAS_CP)
    g_cw = _upstream(G_CA, HAS_CA)
    g_js = _upstream(G_JS, HAS_JS)
    c_z = (g_loss + g_cz) * inv_n
    c_w = (g_loss + g_cw) * inv_n
    c_js = (js_weight * g_loss + g_js) * inv_n
    if SINGLE_PROGRAM:
        first, last = 0, tl.cdiv(B, ROWS)
    else:
        first = tl.program_id(0)
        last = first + 1
    if STORED and not (HAS_CP or HAS_CA or HAS_JS):  # loss.backward(): known when compiling
        _scale_stored(GZ, GW, DZ, DW, c_z, c_w, first, last, B, C, ROWS, BLOCK_C)
    elif STORED:
        if (g_js == js_weight * g_cz) & (g_js == js_weight * g_cw):  # dz = c_z · G_z, dw = c_w · G_w
            _scale_stored(GZ, GW, DZ, DW, c_z, c_w, first, last, B, C, ROWS, BLOCK_C)
        else:
            _recompute_rows(Z, W, Y, DZ, DW, GZ, first, last, B, C, stride_z, stride_w, ignore_index,
                            label_smoothing, inv_t, c_z, c_w, c_js, ROWS, BLOCK_C, SINGLE_CHUNK, TEMPERED, False)
    else:
        _recompute_rows(Z, W, Y, DZ, DW, GZ, first, last, B, C, stride_z, stride_w, ignore_index,
                        label_smoothing, inv_t, c_z, c_w, c_js, ROWS, BLOCK_C, SINGLE_CHUNK, TEMPERED, True)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
Scalar = Union[float, Tensor]


def new_buffer(shape, *, device, dtype) -> Tensor:
    """Every tensor a kernel writes is allocated here, uninitialised (tests poison them)."""
    return torch.empty(shape, device=device, dtype=dtype)


def tile(B: int, C: int) -> Tuple[int, int, int, int]:
    """(ROWS, BLOCK_C, num_warps, programs) for [B, C] logits; see `_tile` (memoised: a launch
    is on every step's host path)."""
    return _tile(B, C, SINGLE_PROGRAM_ELEMENTS)


@functools.lru_cache(maxsize=1024)
def _tile(B: int, C: int, single_program_elements: int) -> Tuple[int, int, int, int]:
    """(ROWS, BLOCK_C, num_warps, programs): a row of up to 2,048 classes in one chunk, a longer
    one in chunks of 1,024 (its passes hold more state in registers). One program
    of 8 warps walks every row when B·C ≤ SINGLE_PROGRAM_ELEMENTS, in tiles of 512 logits of
    each model (2 per thread; more rows per tile cost registers for every row's statistics)
    or of one row's chunk. Otherwise each program takes one tile: at most 8 logits of each model
    per thread, 4 up to 1,024 classes or when a tile holds several rows (more would cost
    registers), several rows when C is small but no more than keeps about two programs per SM
    busy (`mgit-fast inspect`)."""
    block_c = triton.next_power_of_2(C) if C <= 2048 else 1024
    if B * C <= single_program_elements:
        rows = max(1, min(512 // block_c, triton.next_power_of_2(max(B, 1))))
        return rows, block_c, 8, 1
    num_warps = 8 if 1024 <= block_c and C <= 2048 else 4  # a longer row: 4 warps (8 spill its statistics)
    rows = max(1, min(4 * 32 * num_warps // block_c, triton.next_power_of_2(triton.cdiv(B, 264))))
    return rows, block_c, num_warps, triton.cdiv(B, rows)


def stores_gradients(C: int, needs_grad: bool) -> bool:
    """Whether the forward writes the unscaled gradients: only when a row fits one chunk
    (C ≤ 2,048). There the row is in registers, and storing G (2 B·C elements written and read
    back) is cheaper than recomputing every exponential in the backward. A longer row streams
    through chunks; writing G would add a pass and 4 B·C element transfers to save a 2 B·C
    re-read, so its backward recomputes from the logits (modeled in bench/results/model.md)."""
    return needs_grad and C <= 2048


def forward(z, w, target, label_smoothing: float, temperature: Scalar, js_weight: Scalar, ignore_index: int,
            needs_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launches the forward: (loss, ce_primary, ce_auxiliary, js: four 0-dim float32 tensors the
    kernels write; aux [4] = kept rows, invalid labels, js_weight, temperature; grad_primary,
    grad_auxiliary [B, C], the unscaled gradients, or the row statistics [B, 6] and an empty
    tensor for rows longer than a chunk, or two empties without needs_grad). temperature and
    js_weight: floats or 0-dim float32 tensors on the logits' device, read by the kernels."""
    B, C = z.shape
    rows, block_c, num_warps, programs = tile(B, C)
    device = z.device
    outputs = [new_buffer((), device=device, dtype=torch.float32) for _ in range(4)]
    aux = new_buffer((4,), device=device, dtype=torch.float32)
    store = stores_gradients(C, needs_grad)
    save_stats = needs_grad and not store
    if store:
        gz = new_buffer((B, C), device=device, dtype=z.dtype)
        gw = new_buffer((B, C), device=device, dtype=w.dtype)
    elif save_stats:
        gz, gw = new_buffer((B, 6), device=device, dtype=torch.float32), w.new_empty((0,))
    else:
        gz, gw = z.new_empty((0,)), w.new_empty((0,))
    single = programs == 1
    partial = aux if single else new_buffer((programs, 5), device=device, dtype=torch.float32)  # one: unused
    t_pointer, js_pointer = isinstance(temperature, Tensor), isinstance(js_weight, Tensor)
    with on_device(z):
        _mgit_loss_fwd_kernel[(programs,)](
            z, w, target, gz if store else z, gw if store else w, gz if save_stats else z, partial, *outputs, aux,
            temperature, js_weight, B, C, z.stride(0), w.stride(0), ignore_index, label_smoothing,
            ROWS=rows, BLOCK_C=block_c, SINGLE_CHUNK=C <= block_c, TEMPERED=t_pointer or temperature != 1.0,
            T_POINTER=t_pointer, JS_POINTER=js_pointer, WRITE=store, SAVE_STATS=save_stats, SINGLE_PROGRAM=single,
            num_warps=num_warps,
        )
        if not single:
            _mgit_loss_finish_kernel[(1,)](
                partial, *outputs, aux, temperature, js_weight, programs,
                T_POINTER=t_pointer, JS_POINTER=js_pointer, BLOCK_P=256,
            )
    return (*outputs, aux, gz, gw)


def backward(grads: Sequence[Optional[Tensor]], aux, gz, gw, z, w, target, label_smoothing: float, ignore_index: int,
             tempered: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Launches the backward for the upstream gradients (g_loss, g_cp, g_ca, g_js) of the four
    outputs, each a 0-dim float32 tensor or None (autograd had none: it counts as 0 and costs
    nothing, a constexpr flag leaves it unread): (dz, dw), or (None, None) without a launch
    when all four are None."""
    if all(g is None for g in grads):
        return None, None
    B, C = z.shape
    rows, block_c, num_warps, programs = tile(B, C)
    dz = new_buffer((B, C), device=z.device, dtype=z.dtype)
    dw = new_buffer((B, C), device=w.device, dtype=w.dtype)
    with on_device(z):
        _mgit_loss_bwd_kernel[(programs,)](
            *(aux if g is None else g for g in grads), aux, gz, gw, z, w, target, dz, dw,
            B, C, z.stride(0), w.stride(0), ignore_index, label_smoothing,
            ROWS=rows, BLOCK_C=block_c, SINGLE_CHUNK=C <= block_c, TEMPERED=tempered, SINGLE_PROGRAM=programs == 1,
            STORED=gz.shape == z.shape, HAS_LOSS=grads[0] is not None, HAS_CP=grads[1] is not None,
            HAS_CA=grads[2] is not None, HAS_JS=grads[3] is not None, num_warps=num_warps,
        )
    return dz, dw


@torch.library.custom_op("mgit_fast::mgit_loss_fwd", mutates_args=())
def mgit_loss_fwd(
    logits_primary: Tensor, logits_auxiliary: Tensor, target: Tensor, label_smoothing: float, temperature: float,
    js_weight: float, ignore_index: int, needs_grad: bool, temperature_tensor: Optional[Tensor],
    js_weight_tensor: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, ce_primary, ce_auxiliary, js: 0-dim; aux [4]; unscaled gradients, row statistics
    or empties). A given *_tensor (0-dim float32, read on the device) replaces the float beside
    it. A backward needs needs_grad=True."""
    return forward(
        logits_primary, logits_auxiliary, target, label_smoothing,
        temperature if temperature_tensor is None else temperature_tensor,
        js_weight if js_weight_tensor is None else js_weight_tensor, ignore_index, needs_grad,
    )


@mgit_loss_fwd.register_fake
def _(logits_primary, logits_auxiliary, target, label_smoothing, temperature, js_weight, ignore_index,
      needs_grad, temperature_tensor, js_weight_tensor):
    f32 = dict(dtype=torch.float32)
    B, C = logits_primary.shape
    outputs = tuple(logits_primary.new_empty((), **f32) for _ in range(4)) + (logits_primary.new_empty((4,), **f32),)
    if stores_gradients(C, needs_grad):
        return outputs + (logits_primary.new_empty((B, C)), logits_auxiliary.new_empty((B, C)))
    if needs_grad:
        return outputs + (logits_primary.new_empty((B, 6), **f32), logits_auxiliary.new_empty((0,)))
    return outputs + (logits_primary.new_empty((0,)), logits_auxiliary.new_empty((0,)))


@torch.library.custom_op("mgit_fast::mgit_loss_bwd", mutates_args=())
def mgit_loss_bwd(
    grad_loss: Optional[Tensor], grad_ce_primary: Optional[Tensor], grad_ce_auxiliary: Optional[Tensor],
    grad_js: Optional[Tensor], aux: Tensor, grad_primary: Tensor, grad_auxiliary: Tensor, logits_primary: Tensor,
    logits_auxiliary: Tensor, target: Tensor, label_smoothing: float, ignore_index: int, tempered: bool,
) -> Tuple[Tensor, Tensor]:
    """(dz, dw) for the upstream gradients of the four outputs, at least one given."""
    dz, dw = backward((grad_loss, grad_ce_primary, grad_ce_auxiliary, grad_js), aux, grad_primary, grad_auxiliary,
                      logits_primary, logits_auxiliary, target, label_smoothing, ignore_index, tempered)
    return dz, dw


@mgit_loss_bwd.register_fake
def _(grad_loss, grad_ce_primary, grad_ce_auxiliary, grad_js, aux, grad_primary, grad_auxiliary, logits_primary,
      logits_auxiliary, target, label_smoothing, ignore_index, tempered):
    return torch.empty_like(logits_primary), torch.empty_like(logits_auxiliary)


def _setup(ctx, inputs, output):
    z, w, target, label_smoothing, temperature, _, ignore_index, needs_grad, t_tensor, _ = inputs
    aux, gz, gw = output[4:]
    ctx.mark_non_differentiable(aux, gz, gw)
    ctx.set_materialize_grads(False)  # an output that got no gradient arrives as None: no zeros made
    ctx.save_for_backward(z, w, target, aux, gz, gw)
    ctx.needs_grad = needs_grad
    ctx.options = (label_smoothing, ignore_index, t_tensor is not None or temperature != 1.0)


def _float32(grads):
    """The upstream gradients as float32 (autocast or a caller may hand in another dtype)."""
    return tuple(g if g is None or g.dtype == torch.float32 else g.float() for g in grads)


def _backward(ctx, grad_loss, grad_ce_primary, grad_ce_auxiliary, grad_js, _grad_aux, _grad_gz, _grad_gw):
    if not ctx.needs_grad:
        raise RuntimeError("mgit_fast::mgit_loss_fwd was called with needs_grad=False: it has no backward")
    grads = (grad_loss, grad_ce_primary, grad_ce_auxiliary, grad_js)
    if all(g is None for g in grads):
        return (None,) * 10
    z, w, target, aux, gz, gw = ctx.saved_tensors
    dz, dw = mgit_loss_bwd(*_float32(grads), aux, gz, gw, z, w, target, *ctx.options)
    return (dz, dw) + (None,) * 8


mgit_loss_fwd.register_autograd(_backward, setup_context=_setup)


class MGiTLossFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom ops, launched straight from an
    autograd.Function (a custom op's dispatch costs more host time than the launches). Used
    when grad mode is on, a logit requires grad and nothing is compiling; outputs (loss,
    ce_primary, ce_auxiliary, js, aux), aux not differentiable. Launches only (no torch op, no
    synchronisation), so a CUDA graph can capture it."""

    @staticmethod
    def forward(ctx, z, w, target, label_smoothing, temperature, js_weight, ignore_index):
        loss, ce_primary, ce_auxiliary, js, aux, gz, gw = forward(
            z, w, target, label_smoothing, temperature, js_weight, ignore_index, True
        )
        ctx.mark_non_differentiable(aux)
        ctx.set_materialize_grads(False)  # an output that got no gradient arrives as None: no zeros made
        ctx.save_for_backward(z, w, target, aux, gz, gw)
        ctx.options = (label_smoothing, ignore_index, isinstance(temperature, Tensor) or temperature != 1.0)
        return loss, ce_primary, ce_auxiliary, js, aux

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_ce_primary, grad_ce_auxiliary, grad_js, _grad_aux):
        grads = (grad_loss, grad_ce_primary, grad_ce_auxiliary, grad_js)
        if grad_loss is None and grad_ce_primary is None and grad_ce_auxiliary is None and grad_js is None:
            return (None,) * 7
        z, w, target, aux, gz, gw = ctx.saved_tensors
        dz, dw = backward(_float32(grads), aux, gz, gw, z, w, target, *ctx.options)
        return dz, dw, None, None, None, None, None


def mgit_loss(logits_primary, logits_auxiliary, target, label_smoothing, temperature: Scalar, js_weight: Scalar,
              ignore_index) -> Tuple[Tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """((loss, ce_primary, ce_auxiliary, js), aux [kept rows, invalid labels, js_weight,
    temperature]); arguments already checked by mgit_fast.functional. The four outputs are
    separate 0-dim float32 tensors, so a backward through some of them passes None for the
    others (no zeros, no stack). temperature and js_weight: floats, or 0-dim float32 tensors on
    the logits' device that the kernels read when they run (a captured CUDA graph sees in-place
    changes). Gradients are written in the forward when grad mode is on and a logit requires
    grad; otherwise nothing beyond the outputs is.

    Eagerly the kernels launch directly (`MGiTLossFunction`, or no autograd at all when no
    gradient is needed); while torch.compile traces, through the custom ops
    mgit_fast::mgit_loss_fwd / mgit_loss_bwd, which it can put in a graph."""
    needs_grad = torch.is_grad_enabled() and (logits_primary.requires_grad or logits_auxiliary.requires_grad)
    if logits_primary.stride(-1) != 1:
        logits_primary = logits_primary.contiguous()
    if logits_auxiliary.stride(-1) != 1:
        logits_auxiliary = logits_auxiliary.contiguous()
    if not target.is_contiguous():
        target = target.contiguous()
    scalars = (float(label_smoothing), temperature if isinstance(temperature, Tensor) else float(temperature),
               js_weight if isinstance(js_weight, Tensor) else float(js_weight), int(ignore_index))
    if torch.compiler.is_compiling():
        smoothing, t, js_w, ignore = scalars
        t_tensor = t if isinstance(t, Tensor) else None
        js_tensor = js_w if isinstance(js_w, Tensor) else None
        loss, ce_primary, ce_auxiliary, js, aux, _, _ = mgit_loss_fwd(
            logits_primary, logits_auxiliary, target, smoothing, 1.0 if t_tensor is not None else t,
            0.0 if js_tensor is not None else js_w, ignore, needs_grad, t_tensor, js_tensor,
        )
    elif needs_grad:
        loss, ce_primary, ce_auxiliary, js, aux = MGiTLossFunction.apply(logits_primary, logits_auxiliary, target,
                                                                         *scalars)
    else:
        loss, ce_primary, ce_auxiliary, js, aux, _, _ = forward(logits_primary, logits_auxiliary, target, *scalars,
                                                               False)
    return (loss, ce_primary, ce_auxiliary, js), aux
