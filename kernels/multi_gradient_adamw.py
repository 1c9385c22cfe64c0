"""Fused multi-gradient AdamW: one update of a primary and an auxiliary model.

Math (DESIGN §1 step 4), with g_P, g_A the two models' gradients:

    n_X   = ‖g_X‖₂ over all of model X,  c_X = min(1, max_norm / (n_X + 1e-6))   (clipping)
    μ     = fixed, or mix_max · ce_P / (ce_P + ce_A)                            (0 if both are 0)
    ĝ_P   = (1 − μ)·c_P·g_P + μ·c_A·g_A  for a paired primary parameter, c_X·g_X otherwise
    AdamW : θ ← θ·(1 − lr·wd) [≥2-dim, not excluded];  m ← β1·m + (1 − β1)·ĝ;
            v ← β2·v + (1 − β2)·ĝ²;  θ ← θ − lr·(m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + eps)
    θ_P   ← (1 − γ)·θ_P + γ·θ_A after the update, for paired parameters (average = γ)
    skip  : any non-finite gradient or μ ⇒ nothing is written, skipped_steps += 1
    scale : gradients that carry a loss scale S (fp16 training) are read as g / S

Storage: every parameter, gradient and both moments of both models live in four flat fp32
buffers (`FlatLayout`); each tensor's segment is padded to a multiple of BLOCK elements, so a
block belongs to one tensor and a paired primary block's partner is the block at the same
position of the auxiliary's segment. Three launches, whatever the number of tensors:

1. `_sumsq_kernel`, one program per block: Σg² and the count of non-finite elements.
2. `_scalars_kernel`, one program: both norms (summed in a fixed order), clip factors, μ, the
   skip flag, the step count and the bias corrections, all written to device memory.
3. `_update_kernel`, one program per work item: an unpaired block, or a paired primary block
   together with its auxiliary partner (so averaging sees the partner's new weights).

The norms need every block before any update may start, and Triton has no grid-wide barrier,
hence three launches rather than one. Nothing is read back to the host: the step can be
captured in a CUDA graph (with the learning rate as a device tensor).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import on_device

BLOCK = 1024


@triton.jit
def _sumsq_kernel(G, PARTIAL, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.load(G + pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE))
    finite = (g == g) & (tl.abs(g) < float("inf"))
    tl.store(PARTIAL + pid * 2, tl.sum(tl.where(finite, g * g, 0.0), 0))
    tl.store(PARTIAL + pid * 2 + 1, tl.sum((~finite).to(tl.float32), 0))


@triton.jit
def _block_sum(PARTIAL, first, last, lane, CHUNK: tl.constexpr):
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(first, last, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        acc += tl.load(PARTIAL + blocks * 2 + lane, mask=blocks < last, other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def _scalars_kernel(
    PARTIAL, SCALARS, STEP, SKIPPED, LAST_MIX, OUT, SKIP_OUT, CE_P, CE_A, LOG_BETAS, GRAD_SCALE,
    primary_blocks, total_blocks, max_grad_norm, mix, mix_max,
    CLIP: tl.constexpr, ADAPTIVE: tl.constexpr, UNSCALE: tl.constexpr, CHUNK: tl.constexpr,
):
    """SCALARS = (c_P, c_A, μ, skip, 1 − β1ᵗ, 1 − β2ᵗ); OUT = (μ, n_P, n_A). With UNSCALE the
    gradients hold a loss scale S: the norms are divided by S and 1/S is folded into c_P, c_A."""
    norm_p = tl.sqrt(_block_sum(PARTIAL, 0, primary_blocks, 0, CHUNK))
    norm_a = tl.sqrt(_block_sum(PARTIAL, primary_blocks, total_blocks, 0, CHUNK))
    bad = _block_sum(PARTIAL, 0, total_blocks, 1, CHUNK)
    if UNSCALE:
        inv_scale = 1.0 / tl.load(GRAD_SCALE).to(tl.float32)
    else:
        inv_scale = 1.0 + 0.0 * norm_p
    norm_p = norm_p * inv_scale
    norm_a = norm_a * inv_scale
    if ADAPTIVE:
        ce_p = tl.load(CE_P).to(tl.float32)
        total = ce_p + tl.load(CE_A).to(tl.float32)
        mu = tl.where(total == 0.0, 0.0, mix_max * ce_p / tl.where(total == 0.0, 1.0, total))
    else:
        mu = mix + 0.0 * norm_p
    skip = (bad > 0) | (mu != mu) | (tl.abs(mu) == float("inf"))
    if CLIP:
        clip_p = tl.minimum(max_grad_norm / (norm_p + 1e-6), 1.0)
        clip_a = tl.minimum(max_grad_norm / (norm_a + 1e-6), 1.0)
    else:
        clip_p = 1.0 + 0.0 * norm_p
        clip_a = 1.0 + 0.0 * norm_p
    clip_p = clip_p * inv_scale
    clip_a = clip_a * inv_scale
    step = tl.load(STEP) + tl.where(skip, 0, 1)
    t = step.to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(t * tl.load(LOG_BETAS + 0))  # fp64: 1 − β2ᵗ is small early on
    bias_correction2 = 1.0 - tl.exp(t * tl.load(LOG_BETAS + 1))
    tl.store(SCALARS + 0, clip_p)
    tl.store(SCALARS + 1, clip_a)
    tl.store(SCALARS + 2, mu)
    tl.store(SCALARS + 3, skip.to(tl.float32))
    tl.store(SCALARS + 4, bias_correction1.to(tl.float32))
    tl.store(SCALARS + 5, bias_correction2.to(tl.float32))
    tl.store(STEP, step)
    tl.store(SKIPPED, tl.load(SKIPPED) + tl.where(skip, 1, 0))
    tl.store(LAST_MIX, mu)
    tl.store(OUT + 0, mu)
    tl.store(OUT + 1, norm_p)
    tl.store(OUT + 2, norm_a)
    tl.store(SKIP_OUT, skip)


@triton.jit
def _adamw(p, g, m, v, lr, decay_factor, beta1, beta2, eps, bias_correction1, bias_correction2):
    p = p * decay_factor
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - lr * (m / bias_correction1) / (tl.sqrt(v / bias_correction2) + eps)
    return p, m, v


@triton.jit
def _update_kernel(
    P, G, M, V, ITEMS, SCALARS, LR_P, LR_A,
    wd_p, wd_a, beta1, beta2, eps, average,
    AVERAGE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """ITEMS rows: (start, partner start or −1, model 0/1, decay bits: self | partner << 1)."""
    pid = tl.program_id(0)
    start = tl.multiple_of(tl.load(ITEMS + pid * 4), BLOCK_SIZE)  # segments are whole blocks: 128-bit access
    partner = tl.load(ITEMS + pid * 4 + 1)
    model = tl.load(ITEMS + pid * 4 + 2)
    decay = tl.load(ITEMS + pid * 4 + 3)
    skip = tl.load(SCALARS + 3)
    if skip == 0.0:
        clip_p = tl.load(SCALARS + 0)
        clip_a = tl.load(SCALARS + 1)
        mu = tl.load(SCALARS + 2)
        bias_correction1 = tl.load(SCALARS + 4)
        bias_correction2 = tl.load(SCALARS + 5)
        lr_p = tl.load(LR_P).to(tl.float32)
        lr_a = tl.load(LR_A).to(tl.float32)
        is_aux = model == 1
        lr = tl.where(is_aux, lr_a, lr_p)
        wd = tl.where(is_aux, wd_a, wd_p)
        decay_factor = tl.where((decay & 1) != 0, 1.0 - lr * wd, 1.0)
        offs = start + tl.arange(0, BLOCK_SIZE)
        g = tl.load(G + offs) * tl.where(is_aux, clip_a, clip_p)
        p = tl.load(P + offs)
        m = tl.load(M + offs)
        v = tl.load(V + offs)
        if partner >= 0:  # a paired primary block: update its auxiliary partner here too
            poffs = tl.multiple_of(partner, BLOCK_SIZE) + tl.arange(0, BLOCK_SIZE)
            g_a = tl.load(G + poffs) * clip_a
            p_a, m_a, v_a = _adamw(
                tl.load(P + poffs), g_a, tl.load(M + poffs), tl.load(V + poffs), lr_a,
                tl.where((decay & 2) != 0, 1.0 - lr_a * wd_a, 1.0), beta1, beta2, eps,
                bias_correction1, bias_correction2,
            )
            p, m, v = _adamw(p, (1.0 - mu) * g + mu * g_a, m, v, lr, decay_factor, beta1, beta2, eps,
                             bias_correction1, bias_correction2)
            if AVERAGE:
                p = (1.0 - average) * p + average * p_a
            tl.store(P + poffs, p_a)
            tl.store(M + poffs, m_a)
            tl.store(V + poffs, v_a)
        else:
            p, m, v = _adamw(p, g, m, v, lr, decay_factor, beta1, beta2, eps, bias_correction1, bias_correction2)
        tl.store(P + offs, p)
        tl.store(M + offs, m)
        tl.store(V + offs, v)


# --------------------------------------------------------------------------------------------
# the flat layout
# --------------------------------------------------------------------------------------------
def _padded(n: int) -> int:
    return triton.cdiv(n, BLOCK) * BLOCK


class FlatLayout:
    """Four flat fp32 buffers (params, grads, exp_avg, exp_avg_sq) holding both models, with
    each tensor's segment padded to whole blocks, and the work-item table of the update.

    ``shapes_primary``/``shapes_auxiliary``: the tensors' shapes, in order; ``pairs`` the
    ``(i, j)`` index pairs; ``decay_*`` the weight-decay flags.
    """

    def __init__(
        self,
        shapes_primary: Sequence[torch.Size],
        shapes_auxiliary: Sequence[torch.Size],
        pairs: Sequence[Tuple[int, int]],
        decay_primary: Sequence[bool],
        decay_auxiliary: Sequence[bool],
        device: torch.device,
    ):
        self.shapes = list(shapes_primary) + list(shapes_auxiliary)
        self.num_primary = len(shapes_primary)
        self.offsets: List[int] = []
        total = 0
        for shape in self.shapes:
            self.offsets.append(total)
            total += _padded(shape.numel())
        self.total = total
        self.primary_blocks = (self.offsets[self.num_primary] if shapes_auxiliary else total) // BLOCK
        self.device = device
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs = (
            torch.zeros(total, device=device, dtype=torch.float32) for _ in range(4)
        )
        self.items = self._work_items(pairs, list(decay_primary) + list(decay_auxiliary))
        self.partial = torch.empty((total // BLOCK, 2), device=device, dtype=torch.float32)
        self.scalars = torch.empty(6, device=device, dtype=torch.float32)

    def _work_items(self, pairs, decay) -> Tensor:
        partner = {i: self.num_primary + j for i, j in pairs}
        handled = set(partner.values())
        rows = []
        for index, (shape, offset) in enumerate(zip(self.shapes, self.offsets)):
            if index in handled:
                continue
            model = 0 if index < self.num_primary else 1
            mate = partner.get(index)
            bits = int(decay[index]) | (int(decay[mate]) << 1 if mate is not None else 0)
            for block in range(0, _padded(shape.numel()), BLOCK):
                mate_start = self.offsets[mate] + block if mate is not None else -1
                rows.append((offset + block, mate_start, model, bits))
        return torch.tensor(rows, dtype=torch.int64, device=self.device).reshape(-1, 4)

    def _log_betas(self, betas) -> Tensor:
        if getattr(self, "_betas", None) != tuple(betas):
            self._betas = tuple(betas)
            self._log_betas_tensor = torch.tensor(
                [math.log(b) if b > 0 else -math.inf for b in betas], dtype=torch.float64, device=self.device
            )
        return self._log_betas_tensor

    def view(self, buffer: Tensor, index: int) -> Tensor:
        offset, shape = self.offsets[index], self.shapes[index]
        return buffer[offset : offset + shape.numel()].view(shape)

    def step(
        self,
        *,
        step: Tensor,
        skipped_steps: Tensor,
        last_mix: Tensor,
        lr: Tuple[Tensor, Tensor],
        betas: Tuple[float, float],
        eps: float,
        weight_decay: Tuple[float, float],
        mix,
        mix_max: float,
        ce_primary: Optional[Tensor],
        ce_auxiliary: Optional[Tensor],
        average: float,
        max_grad_norm: Optional[float],
        grad_scale: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Runs the three kernels; returns (μ, n_P, n_A) as one fresh [3] tensor, and the skip flag."""
        blocks = self.total // BLOCK
        out = torch.empty(3, device=self.device, dtype=torch.float32)
        skipped = torch.empty((), device=self.device, dtype=torch.bool)
        adaptive = isinstance(mix, str)
        with on_device(self.grads):
            _sumsq_kernel[(blocks,)](self.grads, self.partial, BLOCK_SIZE=BLOCK)
            _scalars_kernel[(1,)](
                self.partial, self.scalars, step, skipped_steps, last_mix, out, skipped,
                ce_primary if adaptive else self.scalars, ce_auxiliary if adaptive else self.scalars,
                self._log_betas(betas), grad_scale if grad_scale is not None else self.scalars,
                self.primary_blocks, blocks, float(max_grad_norm or 0.0),
                0.0 if adaptive else float(mix), float(mix_max),
                CLIP=max_grad_norm is not None, ADAPTIVE=adaptive, UNSCALE=grad_scale is not None, CHUNK=1024,
            )
            _update_kernel[(self.items.shape[0],)](
                self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.items, self.scalars, lr[0], lr[1],
                float(weight_decay[0]), float(weight_decay[1]), float(betas[0]), float(betas[1]), float(eps),
                float(average), AVERAGE=average != 0.0, BLOCK_SIZE=BLOCK, num_warps=8,
            )
        return out, skipped


# --------------------------------------------------------------------------------------------
# the functional entry point (tensor lists; the optimizer keeps a FlatLayout instead)
# --------------------------------------------------------------------------------------------
def multi_gradient_adamw(
    params_primary, grads_primary, exp_avgs_primary, exp_avg_sqs_primary,
    params_auxiliary, grads_auxiliary, exp_avgs_auxiliary, exp_avg_sqs_auxiliary,
    *, pairs, decay_primary, decay_auxiliary, step, skipped_steps, lr, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0.05, mix="adaptive", mix_max=0.5, ce_primary=None, ce_auxiliary=None, average=0.0,
    max_grad_norm=None, grad_scale=None,
):
    """``mgit_fast.reference.multi_gradient_adamw`` on the kernels, through a temporary flat
    layout (copied in and out). Tensors whose gradient is None are left out, as there."""
    from mgit_fast.reference import MultiGradientStepOutput

    primary = [i for i, g in enumerate(grads_primary) if g is not None]
    auxiliary = [j for j, g in enumerate(grads_auxiliary) if g is not None]
    new_p, new_a = {i: n for n, i in enumerate(primary)}, {j: n for n, j in enumerate(auxiliary)}
    kept_pairs = [(new_p[i], new_a[j]) for i, j in pairs if i in new_p and j in new_a]
    lists = [
        (params_primary, grads_primary, exp_avgs_primary, exp_avg_sqs_primary, primary),
        (params_auxiliary, grads_auxiliary, exp_avgs_auxiliary, exp_avg_sqs_auxiliary, auxiliary),
    ]
    layout = FlatLayout(
        [params_primary[i].shape for i in primary], [params_auxiliary[j].shape for j in auxiliary], kept_pairs,
        [decay_primary[i] for i in primary], [decay_auxiliary[j] for j in auxiliary], step.device,
    )
    tensors = [[lst[i] for i in kept] for *group, kept in lists for lst in group]
    flat = [layout.params, layout.grads, layout.exp_avgs, layout.exp_avg_sqs]
    order = [(k, m) for m in range(2) for k in range(4)]  # (buffer, model) for each of the 8 lists
    for (buffer, model), group in zip(order, tensors):
        for n, t in enumerate(group):
            layout.view(flat[buffer], n + (0 if model == 0 else len(primary))).copy_(t)

    lr_pair = lr if isinstance(lr, (tuple, list)) else (lr, lr)
    lr_tensors = tuple(
        x.to(device=step.device, dtype=torch.float32) if isinstance(x, Tensor)
        else torch.tensor(float(x), device=step.device) for x in lr_pair
    )
    wd_pair = weight_decay if isinstance(weight_decay, (tuple, list)) else (weight_decay, weight_decay)
    last_mix = torch.empty((), device=step.device, dtype=torch.float32)
    out, skipped = layout.step(
        step=step, skipped_steps=skipped_steps, last_mix=last_mix, lr=lr_tensors, betas=betas, eps=eps,
        weight_decay=wd_pair, mix=mix, mix_max=mix_max, ce_primary=ce_primary, ce_auxiliary=ce_auxiliary,
        average=average, max_grad_norm=max_grad_norm, grad_scale=grad_scale,
    )
    for (buffer, model), group in zip(order, tensors):
        if buffer == 1:
            continue  # gradients are inputs only
        for n, t in enumerate(group):
            t.copy_(layout.view(flat[buffer], n + (0 if model == 0 else len(primary))))
    return MultiGradientStepOutput(out[0], out[1], out[2], skipped)
