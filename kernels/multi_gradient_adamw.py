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

Storage: parameters and both moments of both models live in three flat fp32 buffers
(`FlatLayout`); each tensor's segment is padded to a multiple of BLOCK elements, so a block
belongs to one tensor and a paired primary block's partner is the block at the same position
of the auxiliary's segment. Gradients stay where autograd (or DDP, or a user) put them: the
kernels read them through a per-tensor table of (address, element count), uploaded only when
an address changes; a count of 0 (no gradient) reads as zeros, and a tensor's last, partial
block is masked. Three launches, whatever the number of tensors:

1. `_sumsq_kernel`: Σg² and the count of non-finite elements; each program walks a fixed run
   of one model's blocks, so there are at most MAX_PARTIALS partial sums per model.
2. `_scalars_kernel`, one program: both norms (partials summed in a fixed order), clip factors,
   μ, the skip flag, the step count and the bias corrections, all written to device memory.
3. `_update_kernel`, one program per work item: an unpaired block, or a paired primary block
   together with its auxiliary partner (so averaging sees the partner's new weights).

The norms need every block before any update may start, and Triton has no grid-wide barrier,
hence three launches rather than one. Nothing is read back to the host, and the learning
rates, max_norm, μ (fixed), mix_max and γ are read from 0-dim device tensors: the step can be
captured in a CUDA graph once and follow in-place changes of those tensors.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import on_device

BLOCK = 1024  # elements per block (a program's unit of work)
MAX_PARTIALS = 2048  # sum-of-squares programs (partial sums) per model, at most
CHUNK = 1024  # partial sums the scalars kernel adds per iteration

Hyper = Union[float, Tensor]


@triton.jit
def _grad_block(GRADS, tensor, offset, BLOCK_SIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements [offset, offset + BLOCK_SIZE) of gradient `tensor`, zeros past its end. The
    caller hints `offset` as a multiple of BLOCK_SIZE where it loads it (a hint on a function
    argument is lost)."""
    address = tl.load(GRADS + tensor * 2)
    count = tl.load(GRADS + tensor * 2 + 1)
    base = address.to(tl.pointer_type(tl.float32))
    if ALIGNED:  # the hint goes on the pointer: the cast does not carry an integer's divisibility
        base = tl.multiple_of(base, 16)
    base += offset
    lanes = tl.arange(0, BLOCK_SIZE)
    if count - offset >= BLOCK_SIZE:  # a whole block: unmasked, 128-bit loads when ALIGNED
        g = tl.load(base + lanes)
    else:  # the tensor's last block, or no gradient (count 0)
        g = tl.load(base + lanes, mask=lanes < count - offset, other=0.0)
    return g


@triton.jit
def _sumsq_kernel(
    GRADS, BLOCKS, PARTIAL, primary_programs, primary_rows, total_rows, per_primary, per_auxiliary,
    BLOCK_SIZE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """PARTIAL[pid] = (Σg², non-finite count) over rows [first, last) of BLOCKS (tensor,
    offset); programs [0, primary_programs) cover the primary's rows, the rest the auxiliary's."""
    pid = tl.program_id(0)
    auxiliary = pid >= primary_programs
    first = tl.where(auxiliary, primary_rows + (pid - primary_programs) * per_auxiliary, pid * per_primary)
    last = tl.minimum(first + tl.where(auxiliary, per_auxiliary, per_primary),
                      tl.where(auxiliary, total_rows, primary_rows))
    total = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    bad = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for row in range(first, last):
        offset = tl.multiple_of(tl.load(BLOCKS + row * 2 + 1), BLOCK_SIZE)
        g = _grad_block(GRADS, tl.load(BLOCKS + row * 2), offset, BLOCK_SIZE, ALIGNED)
        finite = (g == g) & (tl.abs(g) < float("inf"))
        total += tl.where(finite, g * g, 0.0)
        bad += (~finite).to(tl.float32)
    tl.store(PARTIAL + pid * 2, tl.sum(total, 0))
    tl.store(PARTIAL + pid * 2 + 1, tl.sum(bad, 0))


@triton.jit
def _partial_sum(PARTIAL, first, last, lane, CHUNK: tl.constexpr):
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(first, last, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        acc += tl.load(PARTIAL + rows * 2 + lane, mask=rows < last, other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def _scalars_kernel(
    PARTIAL, SCALARS, STEP, SKIPPED, LAST_MIX, OUT, SKIP_OUT, CE_P, CE_A, LOG_BETAS, GRAD_SCALE,
    MAX_NORM, MIX, MIX_MAX, primary_partials, total_partials,
    CLIP: tl.constexpr, ADAPTIVE: tl.constexpr, UNSCALE: tl.constexpr, CHUNK: tl.constexpr,
):
    """SCALARS = (c_P, c_A, μ, skip, 1 − β1ᵗ, 1 − β2ᵗ); OUT = (μ, n_P, n_A). With UNSCALE the
    gradients hold a loss scale S: the norms are divided by S and 1/S is folded into c_P, c_A."""
    norm_p = tl.sqrt(_partial_sum(PARTIAL, 0, primary_partials, 0, CHUNK))
    norm_a = tl.sqrt(_partial_sum(PARTIAL, primary_partials, total_partials, 0, CHUNK))
    bad = _partial_sum(PARTIAL, 0, total_partials, 1, CHUNK)
    if UNSCALE:
        inv_scale = 1.0 / tl.load(GRAD_SCALE).to(tl.float32)
    else:
        inv_scale = 1.0 + 0.0 * norm_p
    norm_p = norm_p * inv_scale
    norm_a = norm_a * inv_scale
    if ADAPTIVE:
        ce_p = tl.load(CE_P).to(tl.float32)
        total = ce_p + tl.load(CE_A).to(tl.float32)
        mix_max = tl.load(MIX_MAX).to(tl.float32)
        mu = tl.where(total == 0.0, 0.0, mix_max * ce_p / tl.where(total == 0.0, 1.0, total))
    else:
        mu = tl.load(MIX).to(tl.float32) + 0.0 * norm_p
    skip = (bad > 0) | (mu != mu) | (tl.abs(mu) == float("inf"))
    if CLIP:
        max_norm = tl.load(MAX_NORM).to(tl.float32)
        clip_p = tl.minimum(max_norm / (norm_p + 1e-6), 1.0)
        clip_a = tl.minimum(max_norm / (norm_a + 1e-6), 1.0)
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
    P, GRADS, M, V, ITEMS, SCALARS, LR_P, LR_A, AVERAGE_WEIGHT,
    wd_p, wd_a, beta1, beta2, eps,
    AVERAGE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """ITEMS rows: (start, partner start or −1, bits: model | decay << 1 | partner decay << 2,
    offset in the tensor, tensor, partner tensor)."""
    pid = tl.program_id(0)
    row = ITEMS + pid * 6
    start = tl.multiple_of(tl.load(row), BLOCK_SIZE)  # segments are whole blocks: 128-bit access
    partner = tl.load(row + 1)
    bits = tl.load(row + 2)
    skip = tl.load(SCALARS + 3)
    if skip == 0.0:
        offset = tl.multiple_of(tl.load(row + 3), BLOCK_SIZE)
        clip_p = tl.load(SCALARS + 0)
        clip_a = tl.load(SCALARS + 1)
        mu = tl.load(SCALARS + 2)
        bias_correction1 = tl.load(SCALARS + 4)
        bias_correction2 = tl.load(SCALARS + 5)
        lr_p = tl.load(LR_P).to(tl.float32)
        lr_a = tl.load(LR_A).to(tl.float32)
        is_aux = (bits & 1) != 0
        lr = tl.where(is_aux, lr_a, lr_p)
        wd = tl.where(is_aux, wd_a, wd_p)
        decay_factor = tl.where((bits & 2) != 0, 1.0 - lr * wd, 1.0)
        offs = start + tl.arange(0, BLOCK_SIZE)
        g = _grad_block(GRADS, tl.load(row + 4), offset, BLOCK_SIZE, ALIGNED) * tl.where(is_aux, clip_a, clip_p)
        p = tl.load(P + offs)
        m = tl.load(M + offs)
        v = tl.load(V + offs)
        if partner >= 0:  # a paired primary block: update its auxiliary partner here too
            poffs = tl.multiple_of(partner, BLOCK_SIZE) + tl.arange(0, BLOCK_SIZE)
            g_a = _grad_block(GRADS, tl.load(row + 5), offset, BLOCK_SIZE, ALIGNED) * clip_a
            p_a, m_a, v_a = _adamw(
                tl.load(P + poffs), g_a, tl.load(M + poffs), tl.load(V + poffs), lr_a,
                tl.where((bits & 4) != 0, 1.0 - lr_a * wd_a, 1.0), beta1, beta2, eps,
                bias_correction1, bias_correction2,
            )
            p, m, v = _adamw(p, (1.0 - mu) * g + mu * g_a, m, v, lr, decay_factor, beta1, beta2, eps,
                             bias_correction1, bias_correction2)
            if AVERAGE:
                average = tl.load(AVERAGE_WEIGHT).to(tl.float32)
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
class FlatLayout:
    """Three flat fp32 buffers (params, exp_avg, exp_avg_sq) holding both models, with each
    tensor's segment padded to whole blocks; the block and work-item tables of the kernels; and
    the gradient table, refreshed by ``step(grads=...)`` when a gradient's address changes.

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
        self.block, self.max_partials, self.chunk = BLOCK, MAX_PARTIALS, CHUNK
        self.shapes = [torch.Size(s) for s in list(shapes_primary) + list(shapes_auxiliary)]
        self.numels = [s.numel() for s in self.shapes]
        self.num_primary = len(shapes_primary)
        self.offsets: List[int] = []
        total = 0
        for numel in self.numels:
            self.offsets.append(total)
            total += self._padded(numel)
        self.total = total
        self.device = device
        self.params, self.exp_avgs, self.exp_avg_sqs = (
            torch.zeros(total, device=device, dtype=torch.float32) for _ in range(3)
        )
        self.items = self._work_items(pairs, list(decay_primary) + list(decay_auxiliary))
        self.blocks, self.geometry = self._block_rows()
        self.partial = torch.empty((max(self.geometry[0] + self.geometry[1], 1), 2), device=device, dtype=torch.float32)
        self.scalars = torch.empty(6, device=device, dtype=torch.float32)
        self.grad_table = torch.zeros((len(self.shapes), 2), device=device, dtype=torch.int64)
        self._grad_key: Optional[list] = [0] * (2 * len(self.shapes))
        self._aligned = True
        self._spare_host: Optional[Tensor] = None  # pinned, for an upload inside a CUDA graph capture
        self._captured_tables: List[Tuple[Tensor, Tensor]] = []  # (pinned host, device), live with the graphs
        self._hyper: dict = {}

    def _padded(self, n: int) -> int:
        return triton.cdiv(n, self.block) * self.block

    def _work_items(self, pairs, decay) -> Tensor:
        partner = {i: self.num_primary + j for i, j in pairs}
        handled = set(partner.values())
        rows = []
        for index, (numel, offset) in enumerate(zip(self.numels, self.offsets)):
            if index in handled:
                continue
            mate = partner.get(index)
            bits = int(index >= self.num_primary) | int(decay[index]) << 1
            bits |= int(decay[mate]) << 2 if mate is not None else 0
            for block in range(0, self._padded(numel), self.block):
                mate_start = self.offsets[mate] + block if mate is not None else -1
                rows.append((offset + block, mate_start, bits, block, index, mate if mate is not None else index))
        return torch.tensor(rows, dtype=torch.int64, device=self.device).reshape(-1, 6)

    def _block_rows(self) -> Tuple[Tensor, Tuple[int, int, int, int, int, int]]:
        """Every block as (tensor, offset in it), the primary's first, and the sum-of-squares
        geometry (programs per model, rows per program, rows per model)."""
        rows = [(index, block) for index, numel in enumerate(self.numels)
                for block in range(0, self._padded(numel), self.block)]
        primary_rows = sum(self._padded(n) for n in self.numels[: self.num_primary]) // self.block
        geometry = []
        for count in (primary_rows, len(rows) - primary_rows):
            per_program = triton.cdiv(count, self.max_partials)
            geometry.append((triton.cdiv(count, per_program) if count else 0, max(per_program, 1)))
        (programs_p, per_p), (programs_a, per_a) = geometry
        table = torch.tensor(rows, dtype=torch.int64, device=self.device).reshape(-1, 2)
        return table, (programs_p, programs_a, per_p, per_a, primary_rows, len(rows))

    def _log_betas(self, betas) -> Tensor:
        if getattr(self, "_betas", None) != tuple(betas):
            self._betas = tuple(betas)
            self._log_betas_tensor = torch.tensor(
                [math.log(b) if b > 0 else -math.inf for b in betas], dtype=torch.float64, device=self.device
            )
        return self._log_betas_tensor

    def _hyperparameter(self, name: str, value: Hyper) -> Tensor:
        """A 0-dim device tensor holding ``value``: the tensor itself, or a cached one refilled
        in place when the float changes."""
        if isinstance(value, Tensor):
            return value.reshape(())
        cached = self._hyper.get(name)
        if cached is None:
            cached = self._hyper[name] = [torch.full((), float(value), device=self.device), float(value)]
        elif cached[1] != float(value):
            cached[0].fill_(float(value))
            cached[1] = float(value)
        return cached[0]

    def view(self, buffer: Tensor, index: int) -> Tensor:
        offset, shape = self.offsets[index], self.shapes[index]
        return buffer[offset : offset + shape.numel()].view(shape)

    def bind_grads(self, grads: Sequence[Optional[Tensor]]) -> Tuple[Tensor, bool]:
        """The gradient table for ``grads`` (one per tensor, in layout order: contiguous fp32
        on the device with the tensor's element count, or None for zeros), uploaded without a
        synchronisation when an address changed, and whether every address is 16-byte aligned. Inside a CUDA graph capture the upload goes to
        a table of the graph's own, kept as long as this layout."""
        key = []
        for g in grads:
            key += (0, 0) if g is None else (g.data_ptr(), g.numel())
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if key == self._grad_key and not capturing:
            return self.grad_table, self._aligned
        aligned = all(address % 16 == 0 for address in key[0::2])
        if self.device.type != "cuda":
            self.grad_table.copy_(torch.tensor(key, dtype=torch.int64).reshape(-1, 2))
            table = self.grad_table
        elif capturing:
            host = self._spare_host  # pinned before the capture: no host allocation inside it
            if host is None:
                raise RuntimeError("FlatLayout: run one step eagerly before capturing a CUDA graph")
            self._spare_host = None
            host.copy_(torch.tensor(key, dtype=torch.int64).reshape(-1, 2))
            table = torch.empty_like(self.grad_table)
            table.copy_(host, non_blocking=True)
            self._captured_tables.append((host, table))
        else:  # a fresh pinned buffer: the caching host allocator holds it until the copy is done
            host = torch.tensor(key, dtype=torch.int64).reshape(-1, 2).pin_memory()
            self.grad_table.copy_(host, non_blocking=True)
            table = self.grad_table
        if not capturing:
            self._grad_key, self._aligned = key, aligned
        return table, aligned

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
        mix: Union[str, Hyper],
        mix_max: Hyper,
        ce_primary: Optional[Tensor],
        ce_auxiliary: Optional[Tensor],
        average: Hyper,
        max_grad_norm: Optional[Hyper],
        grad_scale: Optional[Tensor] = None,
        grads: Optional[Sequence[Optional[Tensor]]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Runs the three kernels; returns (μ, n_P, n_A) as one fresh [3] tensor, and the skip flag.

        ``grads``: see ``bind_grads`` (None keeps the last table). ``mix`` (unless
        ``"adaptive"``), ``mix_max``, ``average`` and ``max_grad_norm`` are floats or 0-dim
        device tensors read by the kernels at run time; clipping is on unless
        ``max_grad_norm`` is None, averaging unless ``average`` is the float 0."""
        if grads is not None:
            table, aligned = self.bind_grads(grads)
        else:
            table, aligned = self.grad_table, self._aligned
        if self.device.type == "cuda" and self._spare_host is None and not torch.cuda.is_current_stream_capturing():
            self._spare_host = torch.empty_like(self.grad_table, device="cpu").pin_memory()
        table.pointees = list(grads) if grads is not None else []  # what the addresses point to
        out = torch.empty(3, device=self.device, dtype=torch.float32)
        skipped = torch.empty((), device=self.device, dtype=torch.bool)
        adaptive = isinstance(mix, str)
        averaging = isinstance(average, Tensor) or float(average) != 0.0
        programs_p, programs_a, per_p, per_a, primary_rows, total_rows = self.geometry
        with on_device(self.params):
            _sumsq_kernel[(max(programs_p + programs_a, 1),)](
                table, self.blocks, self.partial, programs_p, primary_rows, total_rows, per_p, per_a,
                BLOCK_SIZE=self.block, ALIGNED=aligned, num_warps=4,
            )
            _scalars_kernel[(1,)](
                self.partial, self.scalars, step, skipped_steps, last_mix, out, skipped,
                ce_primary if adaptive else self.scalars, ce_auxiliary if adaptive else self.scalars,
                self._log_betas(betas), grad_scale if grad_scale is not None else self.scalars,
                self._hyperparameter("max_grad_norm", max_grad_norm) if max_grad_norm is not None else self.scalars,
                self.scalars if adaptive else self._hyperparameter("mix", mix),
                self._hyperparameter("mix_max", mix_max) if adaptive else self.scalars,
                programs_p, programs_p + programs_a,
                CLIP=max_grad_norm is not None, ADAPTIVE=adaptive, UNSCALE=grad_scale is not None, CHUNK=self.chunk,
            )
            _update_kernel[(self.items.shape[0],)](
                self.params, table, self.exp_avgs, self.exp_avg_sqs, self.items, self.scalars, lr[0], lr[1],
                self._hyperparameter("average", average) if averaging else self.scalars,
                float(weight_decay[0]), float(weight_decay[1]), float(betas[0]), float(betas[1]), float(eps),
                AVERAGE=averaging, ALIGNED=aligned, BLOCK_SIZE=self.block, num_warps=8,
            )
        table.pointees = []
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
    layout (parameters and moments copied in and out, gradients read in place). Tensors whose
    gradient is None are left out, as there."""
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
    flat = [layout.params, None, layout.exp_avgs, layout.exp_avg_sqs]
    order = [(k, m) for m in range(2) for k in range(4)]  # (buffer, model) for each of the 8 lists
    grads = []
    for (buffer, model), group in zip(order, tensors):
        for n, t in enumerate(group):
            if buffer == 1:  # gradients are read where they are
                grads.append(t.detach().to(device=step.device, dtype=torch.float32).contiguous())
            else:
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
        average=average, max_grad_norm=max_grad_norm, grad_scale=grad_scale, grads=grads,
    )
    for (buffer, model), group in zip(order, tensors):
        if buffer == 1:
            continue  # gradients are inputs only
        for n, t in enumerate(group):
            t.copy_(layout.view(flat[buffer], n + (0 if model == 0 else len(primary))))
    return MultiGradientStepOutput(out[0], out[1], out[2], skipped)
