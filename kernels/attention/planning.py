"""`plan()`: the one place that picks the attention kernels' tiles and paths.

Launch geometry, every kernel: a 1-D grid of (block of BLOCK_M owned positions, b·h) programs
(queries in the forward and dq kernels, keys in dk/dv); the other side streams through in
BLOCK_N blocks. Full blocks run unmasked: the last program takes the N mod BLOCK_M leftover
positions in a TAIL_M-row tile (the smallest power of two ≥ 16 that holds them), and the
N mod BLOCK_N last streamed positions go in masked 16-wide steps (TAIL_N = 16; 0 when BLOCK_N
divides N; the shared-gradient pass, whose columns are tiles, takes them in one tile as wide as
they need). Where a tail is as wide as its block (the 16-wide FMA tiles; a sequence shorter than
a block; a leftover that needs the whole block; no leftover rows), every block on that side
takes the masked path: one copy of the code, the same tile work.

The streamed side fixes each sum's order, so it is planned here, never tuned. The owned side
(BLOCK_M, warps, stages) comes from a short candidate list, today's measured-or-gated entry first:
on a GPU `triton.autotune` times the candidates once per (shape, variant) and keeps the winner in
Triton's on-disk autotune cache (so a resumed run picks what the interrupted one picked); under
the interpreter, on non-CUDA tensors (`mgit-fast inspect`) and under
`torch.use_deterministic_algorithms(True)` the first candidate runs. The compile gate compiles
every candidate (`every_config`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Callable, Dict, Tuple

import torch
import triton

HEAD_DIMS = (16, 32, 64, 128)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by dot precision and head dim, none spilling on sm_80
# or sm_90a. "ieee" fp32 runs on the FMA units, whose dot holds a whole K = D slice per thread:
# small tiles, one stage.
TILES = {
    "half": {16: (64, 64, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (64, 32, 8, 2)},
    "tf32": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 32, 4, 2), 128: (32, 32, 4, 2)},
    "ieee": {16: (16, 16, 4, 1), 32: (16, 16, 4, 1), 64: (16, 16, 4, 1), 128: (16, 16, 8, 1)},
}
# amended launch options, keyed (kernel, precision, D): the specialisations that spilled on sm_80
# or sm_90a with the tiles above, and at half D = 64 the forward and dq kernels' measured stages
TILE_FIXES = {
    ("fwd", "half", 64): dict(num_stages=3),
    ("fwd", "tf32", 16): dict(num_warps=8),
    ("fwd", "tf32", 128): dict(num_stages=1),
    ("fwd", "ieee", 64): dict(num_warps=2),
    ("dq", "half", 16): dict(num_stages=1),
    ("dq", "half", 64): dict(num_stages=3),
    ("dq", "half", 128): dict(num_stages=1),
    ("dq", "ieee", 64): dict(num_warps=2),
    ("dq", "tf32", 16): dict(max_block_n=32),
    ("dq", "tf32", 32): dict(max_block_n=32),
    ("dkdv", "tf32", 16): dict(max_block_n=32, num_stages=1),
    ("dkdv", "tf32", 32): dict(max_block_n=32, num_stages=1),
    ("dkdv", "tf32", 64): dict(max_block_n=16),
    ("dkdv", "ieee", 64): dict(num_warps=2),
    ("shared", "tf32", 16): dict(num_stages=1),
    ("shared", "tf32", 32): dict(num_warps=8, num_stages=1, max_block_n=32),
    ("shared", "tf32", 64): dict(num_stages=1),
}
# with a multiplicative mask (its tile live beside p) these spilled too: amended as above
MASK_TILES = {
    ("fwd", "tf32", 64): dict(num_stages=1),
    ("fwd", "ieee", 16): dict(num_warps=2),
    ("dq", "half", 64): dict(max_block_n=16, num_stages=2),
    ("dq", "half", 128): dict(max_block_n=16),
    ("dq", "tf32", 64): dict(max_block_n=16),
    ("dq", "tf32", 128): dict(num_stages=1),
    ("dkdv", "half", 64): dict(max_block_n=16),
    ("shared", "ieee", 64): dict(num_warps=2),
}
# a second candidate for the owned side of the forward and dq kernels, timed against the first by
# the autotuner: (BLOCK_M, warps, stages). Both stream the same blocks. Gated on sm_80 and sm_90a,
# Triton 3.6 and 3.9: 128 rows, 8 warps, or one stage fewer at D = 64 and 32 rows at D = 32
# spilled somewhere, and so did this one with a multiplicative mask or a dq kernel storing a
# [B, H, N, N] gradient, which therefore run the first only
MORE_CANDIDATES = {("half", 32): (64, 4, 1), ("half", 64): (32, 4, 2)}
# programs the shared-gradient pass aims for (about 8 per SM on an H100): enough to fill the GPU
# while each program sums as many (b, h) pairs as it can before its one atomic per element
SHARED_GRAD_PROGRAMS = 1024

_every_config = contextvars.ContextVar("every_config", default=False)


@contextlib.contextmanager
def every_config():
    """Within the block, launches off a GPU run every candidate, not the first (the compile gate)."""
    token = _every_config.set(True)
    try:
        yield
    finally:
        _every_config.reset(token)


@dataclasses.dataclass(frozen=True)
class Config:
    """The owned side of one candidate: BLOCK_M positions per program, the TAIL_M-row tile of the
    leftover ones, warps, stages."""

    block_m: int
    tail_m: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """One kernel's launch: its dot precision (`precision_of`), the streamed side (fixed) and the
    owned-side candidates."""

    precision: str
    block_n: int
    tail_n: int
    configs: Tuple[Config, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every attention kernel's launch for one (N, D, precision, variant)."""

    fwd: KernelPlan
    dq: KernelPlan
    dkdv: KernelPlan
    shared: KernelPlan


def tail_width(rest: int, block: int) -> int:
    """Width of the tile that takes the last `rest` (< block) positions (block when none)."""
    return block if rest == 0 else min(block, max(16, triton.next_power_of_2(rest)))


def tf32_allowed() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32, read through whichever API set it (torch ≥ 2.9
    raises on the legacy getter once the new ``fp32_precision`` was set)."""
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


# kernels are defined for the interpreter or the GPU when first imported, so this is fixed then
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def precision_of(dtype: torch.dtype) -> str:
    """The tl.dot precision: "half" for fp16/bf16, "tf32" or "ieee" for fp32 as PyTorch allows,
    "upcast" for bf16 under the CPU interpreter."""
    if dtype == torch.float32:
        return "tf32" if tf32_allowed() else "ieee"
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":  # read now: inspect unsets it
        return "upcast"
    return "half"


def plan(shape, dtype: torch.dtype, device: torch.device = None, *, mask: bool = False,
         stores_map_grad: bool = False) -> Plan:
    """Tiles and paths of every attention kernel for q of `shape` [B, H, N, D] and `dtype`, with
    a multiplicative mask or not, and with the dq kernel storing a per-batch bias / mask gradient
    or not. `device` is accepted for the signature's sake: the plan does not depend on the GPU."""
    return _plan(shape[-2], shape[-1], precision_of(dtype), mask, stores_map_grad)


@functools.lru_cache(maxsize=None)
def _plan(N: int, D: int, precision: str, mask: bool, stores_map_grad: bool) -> Plan:
    tile_precision = "half" if precision == "upcast" else precision  # same tiles; the interpreter's bf16
    cover = max(16, triton.next_power_of_2(N))

    def kernel(name, tiles=tile_precision, block_n=None, more=None):
        block_m, tile_n, warps, stages = TILES[tiles][D]
        over = dict(TILE_FIXES.get((name, tiles, D), {}))
        over.update(MASK_TILES.get((name, tiles, D), {}) if mask else {})
        block_n = min(block_n or tile_n, over.pop("max_block_n", tile_n), cover)
        warps, stages = over.get("num_warps", warps), over.get("num_stages", stages)
        configs = [(block_m, warps, stages)] + ([more] if more and N >= block_m else [])
        if block_m > cover:  # a short sequence: fewer rows, and at most 4 warps for them
            configs = [(cover, min(warps, 4), stages)]
        configs = [Config(m, tail_width(N % m, m), w, s) for m, w, s in configs]
        tail_n = 0 if N % block_n == 0 else (16 if N > block_n else block_n)  # (no full block: one tail)
        return KernelPlan(precision if tiles == tile_precision else tiles, block_n, tail_n,
                          tuple(dict.fromkeys(configs)))

    more = None if mask else MORE_CANDIDATES.get((tile_precision, D))
    fwd = kernel("fwd", more=more)
    # ds (or p ⊙ dp) also goes to memory from dq: narrower key blocks, one candidate
    dq = kernel("dq", block_n=32 if (stores_map_grad or mask) else None, more=None if stores_map_grad else more)
    dkdv = kernel("dkdv")  # keys owned, queries streamed, both as in the forward
    # it holds q, dout, k and v of a pair at once (one stage with tf32); tf32 at D = 128 spilled
    # 0.7-1.6 KB at every tile tried, so that pass runs FMA fp32; the columns are one tile (not
    # streamed), the leftover ones as wide as they need
    shared = kernel("shared", "ieee" if (tile_precision == "tf32" and D == 128) else tile_precision)
    shared = dataclasses.replace(shared, tail_n=tail_width(N % shared.block_n, shared.block_n))
    return Plan(fwd, dq, dkdv, shared)


def shared_grad_groups(contributors: int, programs_per_group: int, deterministic: bool) -> Tuple[int, int]:
    """(pairs per program, groups): how the shared-gradient pass splits the (b, h) pairs feeding
    one gradient slice. One group (plain stores, a fixed order) when deterministic algorithms are
    asked for or the tiles alone fill the GPU; else atomics, one per element per group."""
    if deterministic:
        return contributors, 1
    groups = max(1, min(contributors, triton.cdiv(SHARED_GRAD_PROGRAMS, programs_per_group)))
    group = triton.cdiv(contributors, groups)
    return group, triton.cdiv(contributors, group)


def tunes(device: torch.device) -> bool:
    """Whether launches on `device` choose among their candidates by timing them."""
    return device.type == "cuda" and not INTERPRETING and not torch.are_deterministic_algorithms_enabled()


_TUNED: Dict[Tuple[int, Tuple[Config, ...]], Callable] = {}


def _tuned(kernel, configs: Tuple[Config, ...], key):
    """`triton.autotune` over `configs` around `kernel`, one per list."""
    ident = (id(kernel), configs)
    if ident not in _TUNED:
        _TUNED[ident] = triton.autotune(
            [triton.Config({"BLOCK_M": c.block_m, "TAIL_M": c.tail_m}, num_warps=c.num_warps, num_stages=c.num_stages)
             for c in configs], key=list(key), cache_results=True,
        )(kernel)
    return _TUNED[ident]


# the arguments an autotuned choice depends on (besides the tensor dtypes, which Triton adds)
# (an absent scale, bias or mask passes −1); the dq kernel's choice does not depend on which
# optional gradients it writes
TUNING_KEY = ("N", "D", "DIAGONAL_MASK", "PRECISION", "BLOCK_N", "TAIL_N", "scale_stride", "BIAS_LAYOUT",
              "MASK_LAYOUT")


def launch(kernel, kernel_plan: KernelPlan, programs: Callable, device: torch.device, args, constexprs: dict) -> None:
    """Launches `kernel` over `programs(BLOCK_M)` programs with the plan's streamed side and the
    owned side chosen as the module docstring says."""
    configs = kernel_plan.configs
    streamed = dict(BLOCK_N=kernel_plan.block_n, TAIL_N=kernel_plan.tail_n)
    if len(configs) > 1 and tunes(device):
        _tuned(kernel, configs, TUNING_KEY)[lambda meta: (programs(meta["BLOCK_M"]),)](
            *args, **streamed, **constexprs)
        return
    for c in configs if _every_config.get() else configs[:1]:
        kernel[(programs(c.block_m),)](*args, **streamed, BLOCK_M=c.block_m, TAIL_M=c.tail_m, num_warps=c.num_warps,
                                       num_stages=c.num_stages, **constexprs)
