"""A modeled work and traffic table for the bench shapes, runnable on a CPU (no GPU, no timing).

    python bench/model.py [--out DIR] [--arch sm_90a] [--quick] [--jobs N] [--part attention|loss|update]

Writes DIR/model.md and DIR/model.json (DIR defaults to bench/results); with `--part`, only that
part's shapes, to DIR/model_PART.md and .json. Every figure is
*modeled*: bytes, FLOPs and launches come from facts gathered on the CPU, times from the
published peak figures of the target GPU. Nothing here is a measurement.

How each figure is obtained, for ours (the Triton kernels) and for each peer:

- **Our launches**: the part (attention forward + backward, the MGiT loss forward + backward,
  one optimizer step) runs through the public API at full size on CPU tensors while
  `mgit_fast.inspect.capture` records every Triton launch (grid, constexprs, the compiled
  specialisation) without running it; the same part runs at two reduced sizes under Triton's
  CPU interpreter with the memory checker (`tests/memcheck.py`) recording every lane's address.
  For each launch and each tensor argument (arguments whose views overlap, such as q, k and v of
  a packed qkv, form one region) the recorded unique bytes read, written and updated atomically
  are divided by the region's size: that coverage, applied to the region's size at full size,
  gives the launch's HBM bytes (atomics count twice: read and write). One mechanism for every
  kernel; the two reduced sizes must agree, and `tests/test_model.py` checks the prediction
  against a third size recorded directly. Executed and useful FLOPs come from the launch
  geometry via `mgit_fast.inspect` (tiles × programs), registers and blocks/SM from the cubin.
- **Torch ops around our kernels and every eager peer**: a `TorchDispatchMode` sees each aten
  op; a op that is not a view or an allocation is one launch (foreach and fused optimizer ops:
  the launches of PyTorch's `multi_tensor_apply` chunking) and moves the unique bytes of its
  tensor inputs and outputs (an in-place op reads and writes its target; a fill or copy does
  not read it).
- **SDPA**: FlashAttention-2's kernels as PyTorch's flash backend launches them, from their
  tile sizes (see `FLASH`), plus the layout copies timm's Attention makes around the call,
  counted by the dispatch mode on a stand-in with the flash kernel's output layouts. The LSA
  and bias variants cannot use the flash kernel (it takes no mask or bias); they are modeled
  as the memory-efficient kernel (see `MEM_EFFICIENT`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
# the reduced-size runs execute the kernels in Triton's interpreter: chosen before they are defined
if os.environ.get("TRITON_INTERPRET") != "1" and any(m.startswith("mgit_fast.kernels") for m in sys.modules):
    raise ImportError("bench/model.py runs the kernels in Triton's interpreter, but this process has "
                      "already defined them for the GPU (import it first, or set TRITON_INTERPRET=1)")
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import memcheck  # noqa: E402
from mgit_fast import inspect as insp  # noqa: E402
from mgit_fast.kernels import attention as _attention, mgit_loss as _loss, multi_gradient_adamw as _update  # noqa: E402,F401,E501  (defined under the interpreter)

# --------------------------------------------------------------------------------------------
# the GPU: published figures (H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16/fp16
# tensor, 494.7 TF32 tensor, 66.9 TFLOP/s fp32 non-tensor), and a launch cost
# --------------------------------------------------------------------------------------------
LAUNCH_US = 2.5  # back-to-back kernel launch gap on one stream (assumed; host overhead excluded)
TENSOR_PRECISIONS = ("bf16", "fp16", "tf32")

# FlashAttention-2 as PyTorch's flash backend launches it for head dim 64 on a GPU with
# ≥ 144 KB of shared memory per block (aten/src/ATen/native/transformers/cuda/flash_attn/
# flash_fwd_launch_template.h run_mha_fwd_hdim64: Flash_fwd_kernel_traits<64, 128, 128, 4>;
# flash_bwd_launch_template.h run_mha_bwd_hdim64: Flash_bwd_kernel_traits<64, 128, 128, 8, ...>).
# Backward: flash_bwd_dot_do_o (D = rowsum(dO∘O), clears the fp32 dQ accumulator), the
# seqk-parallel main kernel (5 matmuls per tile, dQ by fp32 atomics), flash_bwd_convert_dq.
FLASH = {"fwd": (128, 128), "bwd": (128, 128)}
# PyTorch's memory-efficient kernel (xformers/cutlass) for the masked and biased variants:
# 64 × 64 tiles for head dim ≤ 64 (assumed from the kernel's small-K configuration); it reads
# the [B, H, N, N] (broadcast) bias tile by tile and writes a full [B, H, N, N] bias gradient.
MEM_EFFICIENT = {"fwd": (64, 64), "bwd": (64, 64)}


def _target(arch: str) -> insp.Target:
    return insp.TARGETS[arch]


def modeled_us(nbytes: float, tc_flops: float, fma_flops: float, launches: int, target: insp.Target,
               tc_precision: str = "bf16") -> float:
    """max(bytes / bandwidth, tensor FLOPs / tensor peak + CUDA-core FLOPs / fp32 peak) + launches × cost."""
    compute = tc_flops / target.peak[tc_precision] + fma_flops / target.peak["fp32"]
    return 1e6 * max(nbytes / target.bandwidth, compute) + launches * LAUNCH_US


# --------------------------------------------------------------------------------------------
# the dispatch-mode counter: every aten op's launches, bytes and FLOPs
# --------------------------------------------------------------------------------------------
FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
            "lift_fresh", "_to_copy_meta", "set_", "resize_", "_local_scalar_dense", "is_same_size",
            "sym_size", "sym_stride", "_unsafe_view", "_reshape_alias", "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type"}
WRITE_ONLY_OPS = {"zero_", "fill_", "copy_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
                  "new_zeros", "new_ones", "new_full", "scalar_tensor", "arange", "normal_", "uniform_",
                  "random_", "randint", "randn", "rand"}
COPY_OPS = {"clone", "copy_", "_to_copy", "stack", "cat", "contiguous", "zero_", "fill_", "zeros", "zeros_like",
            "full", "new_zeros", "expand_copy", "index_select", "gather", "scatter", "masked_fill", "where"}
MATMUL_OPS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "addbmm"}
MTA_MAX_TENSORS = (110, 64, 48, 36, 30)  # multi_tensor_apply: tensors per launch by list depth
MTA_MAX_BLOCKS, MTA_CHUNK = 320, 65536


def tensor_bytes(t: torch.Tensor) -> int:
    """Unique bytes a view reaches (broadcast dims, stride 0, count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def mta_launches(numels: Sequence[int], depth: int) -> int:
    """Launches PyTorch's multi_tensor_apply makes for tensor lists of these sizes."""
    max_tensors = MTA_MAX_TENSORS[min(depth, 5) - 1]
    launches = tensors = blocks = 0
    sizes = [n for n in numels if n]
    for i, n in enumerate(sizes):
        tensors += 1
        chunks = -(-n // MTA_CHUNK)
        for c in range(chunks):
            blocks += 1
            last_chunk = c == chunks - 1
            if (tensors == max_tensors and last_chunk) or blocks == MTA_MAX_BLOCKS or (i == len(sizes) - 1 and last_chunk):
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return launches


def _flat_tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat_tensors(item)]
    return []


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


@dataclasses.dataclass
class Op:
    """One counted op: a launch group of the model's table."""

    name: str
    launches: int
    read: int
    write: int
    tc_flops: float = 0.0
    fma_flops: float = 0.0
    precision: str = "fp32"


class OpCounter(TorchDispatchMode):
    """Counts aten ops (see the module docstring). Ops of other namespaces (our custom ops) are
    run with the counter still active, so the aten ops inside them count and Triton launches
    inside them are left to the capture or the interpreter recording. `only_writes_to` (a set of
    storages), when set, keeps only ops that write into those storages (gradient accumulation)."""

    def __init__(self):
        super().__init__()
        self.ops: List[Op] = []
        self.only_writes_to: Optional[set] = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            with self:
                return func.redispatch(_backend_keys(args, kwargs), *args, **kwargs)
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out):
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in FREE_OPS:
            return
        schema_args = func._schema.arguments
        values = list(args) + [kwargs.get(a.name) for a in schema_args[len(args):]]
        mutated, read_tensors = [], []
        unscales = kwargs.get("grad_scale") is not None
        for arg, value in zip(schema_args, values):
            tensors = _flat_tensors(value)
            if name.startswith("_fused_adam") and arg.name == "grads" and not unscales:
                read_tensors += tensors  # marked mutable, but stored only when unscaling by grad_scale
            elif arg.alias_info is not None and arg.alias_info.is_write:
                mutated += tensors
            else:
                read_tensors += tensors
        if self.only_writes_to is not None and not any(_storage_key(t) in self.only_writes_to for t in mutated):
            return
        mutated_keys = {_storage_key(t) for t in mutated}
        outputs = [t for t in _flat_tensors(out) if _storage_key(t) not in mutated_keys]
        read = sum(tensor_bytes(t) for t in read_tensors)
        if name not in WRITE_ONLY_OPS:
            read += sum(tensor_bytes(t) for t in mutated)
        write = sum(tensor_bytes(t) for t in mutated) + sum(tensor_bytes(t) for t in outputs)
        if name.startswith("_foreach_") or name.startswith("_fused_"):
            lists = [v for v in values if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor)]
            depth = len(lists) + (1 if not mutated and outputs else 0)
            launches = mta_launches([t.numel() for t in lists[0]], depth) + (1 if "norm" in name else 0)
        else:
            launches = 1
        tc = fma = 0.0
        precision = "fp32"
        if name in MATMUL_OPS:
            a, b = [t for t in read_tensors if t.dim() >= 2][-2:]
            tc = 2.0 * (outputs[0].numel() if outputs else 0) * a.shape[-1]
            precision = insp._precision_name(a.dtype, False)
            if precision == "fp32":  # PyTorch's default: no TF32 for fp32 matmuls, CUDA cores
                tc, fma = 0.0, tc
        elif name not in COPY_OPS:
            fma = float(sum(t.numel() for t in (outputs or mutated)))
        self.ops.append(Op(name, launches, read, write, tc, fma, precision))


def _backend_keys(args, kwargs):
    tensors = _flat_tensors(list(args) + list(kwargs.values()))
    device = tensors[0].device.type if tensors else "cpu"
    key = {"cpu": torch._C.DispatchKey.CPU, "meta": torch._C.DispatchKey.Meta}.get(device, torch._C.DispatchKey.CPU)
    return torch._C.DispatchKeySet(key)


# --------------------------------------------------------------------------------------------
# our launches: full-size capture (geometry, region sizes) and reduced-size interpreter recording
# --------------------------------------------------------------------------------------------
def _regions(named: Sequence[Tuple[str, int, int]]) -> List[Tuple[frozenset, int, int]]:
    """Merges (name, lo, hi) byte spans that overlap: (names, lo, hi) per region, by address."""
    merged: List[List[Any]] = []
    for name, lo, hi in sorted(named, key=lambda x: (x[1], x[2])):
        if hi == lo:  # an empty tensor moves no bytes
            continue
        if merged and lo < merged[-1][2]:
            merged[-1][0].add(name)
            merged[-1][2] = max(merged[-1][2], hi)
        else:
            merged.append([{name}, lo, hi])
    return [(frozenset(n), lo, hi) for n, lo, hi in merged]


def _span(t: torch.Tensor) -> Tuple[int, int]:
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    size = t.element_size()
    reach = [(n - 1) * s for n, s in zip(t.shape, t.stride())]
    lo = t.data_ptr() + size * sum(r for r in reach if r < 0)
    return lo, t.data_ptr() + size * (sum(r for r in reach if r > 0) + 1)


@contextlib.contextmanager
def capture_with_spans(target: insp.Target):
    """inspect.capture, plus each launch's tensor arguments' byte spans at their real addresses
    (the capture's own addresses are the allocator's model, not the CPU tensors')."""
    spans: List[Tuple[int, int, torch.dtype, list]] = []

    class Pointer(insp._Pointer):
        def __init__(self, t):
            super().__init__(t)
            # the tensors an address table points to (`pointees`, as the memory checker names
            # them): the kernel reads them through the table, not as arguments
            pointees = [(i, *_span(p)) for i, p in enumerate(getattr(t, "pointees", None) or ()) if p is not None]
            spans.append((*_span(t), t.dtype, pointees))  # empty: a zero-length span, skipped when counting

    from mgit_fast import _checks

    check = _checks.kernel_inputs

    def kernel_inputs(*args, **kwargs):  # CPU tensors pass the device check; the launchers still
        os.environ["TRITON_INTERPRET"] = "1"  # see no interpreter, as on a GPU
        try:
            return check(*args, **kwargs)
        finally:
            os.environ.pop("TRITON_INTERPRET", None)

    saved = insp._Pointer
    insp._Pointer, _checks.kernel_inputs = Pointer, kernel_inputs
    result: List[Tuple[insp.Launch, List[Tuple[str, int, int]]]] = []
    try:
        with insp.capture(target) as launches:
            seen = [0]

            def collect():
                while seen[0] < len(launches):
                    launch = launches[seen[0]]
                    names = [k for k, v in launch.args.items()
                             if launch.signature.get(k, "").startswith("*")]
                    mine = spans[:len(names)]
                    del spans[:len(names)]
                    named = []
                    for n, (lo, hi, _, pointees) in zip(names, mine):
                        named.append((n, lo, hi))
                        named += [(f"{n}.pointees[{i}]", plo, phi) for i, plo, phi in pointees]
                    result.append((launch, named))
                    seen[0] += 1
            yield result, collect
            collect()
    finally:
        insp._Pointer, _checks.kernel_inputs = saved, check


@dataclasses.dataclass
class Recorded:
    """One interpreted launch: per region (arg names), its size and unique/requested bytes."""

    kernel: str
    regions: Dict[frozenset, Dict[str, float]]


class _RecordingLaunch(memcheck.Launch):
    sink: Optional[List[Recorded]] = None

    def check(self):
        super().check()
        if _RecordingLaunch.sink is not None:
            _RecordingLaunch.sink.append(summarise(self))


def _canonical(names: frozenset) -> frozenset:
    """Region names with the tensors behind an address table taken as one region
    (``GRADS.pointees[*]``): their number changes with the model's depth, their coverage does not."""
    return frozenset(re.sub(r"\.pointees\[\d+\]$", ".pointees[*]", n) for n in names)


def summarise(launch: memcheck.Launch) -> Recorded:
    """Unique bytes read, written and updated atomically per region of one checked launch."""
    spans = [(name, lo, hi) for name, _, _, lo, hi in launch.args]
    regions = _regions(spans)
    out: Dict[frozenset, Dict[str, float]] = {names: dict(size=hi - lo, read=0, write=0, atomic=0, requested=0)
                                             for names, lo, hi in regions}
    region_names = [names for names, _, _ in regions]
    for kind, label in ((memcheck.READ, "read"), (memcheck.WRITE, "write"), (memcheck.ATOMIC, "atomic")):
        records = launch.records[kind]
        if not records:
            continue
        by_size: Dict[int, List[np.ndarray]] = defaultdict(list)
        for _, size, compact in records:
            by_size[size].append(compact)
        everything = []
        for size, arrays in by_size.items():
            addrs = np.concatenate(arrays)
            region = launch._region(addrs)
            counts = np.bincount(region, minlength=len(region_names)) * size
            for r, c in enumerate(counts):
                out[region_names[r]]["requested"] += float(c)
            unique = np.unique(addrs)
            everything.append((unique[:, None] + np.arange(size)).ravel())
        unique = np.unique(np.concatenate(everything))
        counts = np.bincount(launch._region(unique), minlength=len(region_names))
        for r, c in enumerate(counts):
            out[region_names[r]][label] += float(c)
    merged: Dict[frozenset, Dict[str, float]] = {}
    for names, r in out.items():
        into = merged.setdefault(_canonical(names), dict.fromkeys(r, 0.0))
        for key, value in r.items():
            into[key] += value
    return Recorded(launch.kernel, merged)


@contextlib.contextmanager
def recording():
    """Within the block, interpreted Triton launches are memory-checked and summarised."""
    memcheck.install()
    sink: List[Recorded] = []
    saved_class, saved_enabled = memcheck.Launch, memcheck.enabled
    memcheck.Launch, memcheck.enabled = _RecordingLaunch, True
    _RecordingLaunch.sink = sink
    try:
        yield sink
    finally:
        memcheck.Launch, memcheck.enabled = saved_class, saved_enabled
        _RecordingLaunch.sink = None


def coverage(recorded: Recorded) -> Dict[frozenset, Dict[str, float]]:
    """Per region: the fraction of its bytes read / written / updated atomically, and requested
    bytes per unique byte (re-reads that an L2 may or may not catch)."""
    out = {}
    for names, r in recorded.regions.items():
        unique = r["read"] + r["write"] + r["atomic"]
        out[names] = dict(read=r["read"] / r["size"], write=r["write"] / r["size"], atomic=r["atomic"] / r["size"],
                          requested=r["requested"] / unique if unique else 0.0)
    return out


def apply_coverage(cov: Dict[frozenset, Dict[str, float]], regions: Sequence[Tuple[frozenset, int, int]]
                   ) -> Dict[str, float]:
    """HBM bytes of a full-size launch from the reduced-size coverage of each of its regions."""
    total = dict(read=0.0, write=0.0, atomic=0.0, requested=0.0)
    for names, lo, hi in regions:
        if hi == lo:  # an empty tensor (e.g. a gradient slot the launch does not use)
            continue
        c = cov.get(_canonical(names))
        if c is None:
            raise KeyError(f"region {sorted(names)} was not seen at the reduced size")
        size = hi - lo
        for k in ("read", "write", "atomic"):
            total[k] += c[k] * size
        total["requested"] += c["requested"] * (c["read"] + c["write"] + c["atomic"]) * size
    total["hbm"] = total["read"] + total["write"] + 2 * total["atomic"]
    return total


# --------------------------------------------------------------------------------------------
# the parts, run through the public API (the same code at full and at reduced size)
# --------------------------------------------------------------------------------------------
def _rand(*shape, dtype=torch.float32, device="cpu", grad=False, real=True):
    t = torch.randn(shape, dtype=dtype, device=device) if real else torch.empty(shape, dtype=dtype, device=device)
    return t.requires_grad_(grad)


def attention_part(B: int, N: int, H: int, D: int, variant: str, *, real: bool = True, dtype=torch.bfloat16):
    """Our attention, forward and backward, bf16, packed qkv as a ViT block calls it. The reduced
    runs take fp16: the same bytes and tiles, and the interpreter multiplies it as it is (bf16
    is upcast to fp32 there)."""
    from mgit_fast import functional

    qkv = _rand(B, N, 3 * H * D, dtype=dtype, grad=True, real=real)
    scale = torch.full((H,), D**-0.5, requires_grad=True) if variant == "lsa" else None
    bias = (0.1 * torch.randn(H, N, N) if real else torch.empty(H, N, N)).requires_grad_() if variant == "bias" else None
    dout = _rand(B, N, H * D, dtype=dtype, real=real)

    def run(counter: OpCounter):
        out = functional.attention_qkvpacked(qkv, H, scale=scale, bias=bias, diagonal_mask=variant == "lsa",
                                             backend="triton")
        out.backward(dout)

    return run


LOSS_OPTIONS = dict(label_smoothing=0.1, temperature=2.0, js_weight=0.1)


def loss_part(B: int, C: int, *, real: bool = True):
    """Our MGiT loss, forward and backward, bf16 logits."""
    from mgit_fast import functional

    z, w = (_rand(B, C, dtype=torch.bfloat16, grad=True, real=real) for _ in range(2))
    y = torch.randint(0, C, (B,)) if real else torch.zeros(B, dtype=torch.int64)

    def run(counter: OpCounter):
        functional.mgit_loss(z, w, y, **LOSS_OPTIONS, backend="triton").loss.backward()

    return run


class _Params(nn.Module):
    """A model that is only its parameters: a ViT's shapes, the last two named head.*."""

    def __init__(self, shapes, device="cpu", real=True):
        super().__init__()
        make = (lambda s: torch.randn(s, device=device)) if real else (lambda s: torch.empty(s, device=device))
        self.body = nn.ParameterList([nn.Parameter(make(s)) for s in shapes[:-2]])
        self.head = nn.ParameterList([nn.Parameter(make(s)) for s in shapes[-2:]])


def _update_models(dim: int, depth: int, small: bool, device="cpu", real=True):
    kw = dict(classes=10, img=32, patch=16) if small else {}
    return (_Params(insp._vit_shapes(dim, depth, **kw), device, real),
            _Params(insp._vit_shapes(dim, 1, **kw), device, real))


def _accumulate(models, counter: OpCounter, seed_grads):
    """Autograd writes each parameter's gradient as the backward would (a fresh tensor per
    parameter, as a weight-gradient GEMM makes); only the ops that write into existing .grad
    storage count (the accumulation; stealing the fresh tensor costs nothing)."""
    params = [p for m in models for p in m.parameters()]
    counter.only_writes_to = {_storage_key(p.grad) for p in params if p.grad is not None}
    try:
        loss = sum((p * g).sum() for p, g in zip(params, seed_grads))
        loss.backward()
    finally:
        counter.only_writes_to = None


def update_part(dim: int, depth: int, *, small: bool = False, real: bool = True):
    """One steady-state step of our update: zero_grad, gradient accumulation, MultiGradientAdamW."""
    from mgit_fast.optim import MultiGradientAdamW

    models = _update_models(dim, depth, small, real=real)
    opt = MultiGradientAdamW(models[0], models[1], lr=1e-3, weight_decay=0.05, pairing="head", mix="adaptive",
                             mix_max=0.5, max_grad_norm=1.0, backend="triton")
    seeds = [torch.full_like(p, 1e-3) for m in models for p in m.parameters()]
    ce = (torch.tensor(2.0), torch.tensor(1.5))
    state = {"warm": False}

    def run(counter: OpCounter):
        opt.zero_grad()
        _accumulate(models, counter, seeds)
        opt.step(*ce)

    def warm():
        with torch.enable_grad():
            _accumulate(models, OpCounter(), seeds)
        opt.step(*ce)
        state["warm"] = True

    run.warm = warm
    return run


def update_size(dim: int, depth: int, small: bool = False) -> int:
    kw = dict(classes=10, img=32, patch=16) if small else {}
    return sum(math.prod(s) for d in (depth, 1) for s in insp._vit_shapes(dim, d, **kw))


# --------------------------------------------------------------------------------------------
# running a part: full-size capture + counting, reduced-size recording, combination
# --------------------------------------------------------------------------------------------
def run_full(make: Callable, target: insp.Target):
    """(launches with their regions, torch ops) of one full-size run (kernels captured, not run)."""
    counter = OpCounter()
    with capture_with_spans(target) as (captured, collect):
        run = make()
        if hasattr(run, "warm"):
            run.warm()
        collect()
        captured.clear()
        with counter:
            run(counter)
        collect()
    return [(launch, _regions(spans)) for launch, spans in captured], counter.ops


_RECORDED: Dict[Any, List[Recorded]] = {}


def run_recorded(make: Callable, key: Any = None) -> List[Recorded]:
    """The interpreted Triton launches of one reduced-size run, summarised (kept under `key`)."""
    if key is not None and key in _RECORDED:
        return _RECORDED[key]
    run = make()  # a first step launches the same kernels as a later one: no warm-up needed
    with recording() as sink:
        run(OpCounter())
    if key is not None:
        _RECORDED[key] = list(sink)
    return list(sink)


def combine(full: List[Tuple[insp.Launch, list]], smalls: Sequence[List[Recorded]]) -> List[Dict[str, Any]]:
    """Full-size bytes per launch from each reduced size's coverage. A full-size launch takes the
    coverage of the same kernel's launch at the reduced size (its k-th, or the last one when the
    reduced size launches that kernel fewer times, as a reduction with size-dependent stages
    may); `spread` says how far the reduced sizes' predictions differ."""
    out = []
    for recorded in smalls:
        missing = {launch.kernel for launch, _ in full} - {r.kernel for r in recorded}
        if missing:
            raise RuntimeError(f"kernels launched at full size but not at the reduced size: {sorted(missing)}")
    seen: Dict[str, int] = defaultdict(int)
    for launch, regions in full:
        k = seen[launch.kernel]
        seen[launch.kernel] += 1
        estimates = []
        for recorded in smalls:
            same = [r for r in recorded if r.kernel == launch.kernel]
            estimates.append(apply_coverage(coverage(same[min(k, len(same) - 1)]), regions))
        hbm = [e["hbm"] for e in estimates]
        spread = (max(hbm) - min(hbm)) / max(max(hbm), 1)
        out.append(dict(launch=launch, bytes=estimates[-1], spread=spread))
    return out


# --------------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------------
def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(shape, device="meta", dtype=dtype).requires_grad_(grad)


def eager_attention(B: int, N: int, H: int, D: int, variant: str) -> List[Op]:
    """mgit_fast.reference (the eager twin) on meta tensors, forward + backward."""
    from mgit_fast import reference

    qkv = _meta(B, N, 3 * H * D, grad=True)
    scale = _meta(H, dtype=torch.float32, grad=True) if variant == "lsa" else None
    bias = _meta(H, N, N, dtype=torch.float32, grad=True) if variant == "bias" else None
    counter = OpCounter()
    with counter:
        out = reference.attention_qkvpacked(qkv, H, scale=scale, bias=bias, diagonal_mask=variant == "lsa")
        out.backward(_meta(B, N, H * D))
    return counter.ops


class _FlashStandIn(torch.autograd.Function):
    """Returns what the SDPA kernel returns, in its layouts (output [B, N, H, D] memory seen as
    [B, H, N, D]; gradients likewise; a bias gradient [B, H, N, N]); its own work is modeled."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        B, H, N, D = q.shape
        ctx.shapes = (B, H, N, D, bias is not None)
        return torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        B, H, N, D, has_bias = ctx.shapes
        grads = [torch.empty(B, N, H, D, dtype=dout.dtype, device=dout.device).transpose(1, 2) for _ in range(3)]
        dbias = torch.empty(B, H, N, N, dtype=dout.dtype, device=dout.device) if has_bias else None
        return (*grads, dbias)


def sdpa_layout_ops(B: int, N: int, H: int, D: int, variant: str) -> List[Op]:
    """The aten ops of timm's Attention around F.scaled_dot_product_attention (from the qkv
    Linear's output to the projection's input), forward + backward, on meta tensors."""
    qkv_out = _meta(B, N, 3 * H * D, grad=True)
    scale = _meta(H, dtype=torch.float32, grad=True) if variant == "lsa" else None
    bias = _meta(H, N, N, dtype=torch.float32, grad=True) if variant == "bias" else None
    counter = OpCounter()
    with counter:
        qkv = qkv_out.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = None
        if variant == "lsa":  # a learnable per-head scale folded into q; the diagonal mask as a bias
            q = q * (scale * D**0.5).to(q.dtype).view(1, H, 1, 1)
            mask = torch.zeros(N, N, dtype=q.dtype, device=q.device).expand(B, H, N, N)
        elif variant == "bias":
            mask = bias.to(q.dtype).unsqueeze(0).expand(B, H, N, N)
        x = _FlashStandIn.apply(q, k, v, mask)
        x = x.transpose(1, 2).reshape(B, N, H * D)
        x.backward(_meta(B, N, H * D))
    return counter.ops


def attention_useful_flops(B: int, N: int, H: int, D: int) -> float:
    """The math: QKᵀ and PV forward, dV, dP, dQ and dK backward, no recomputation, no padding."""
    return 2.0 * 6 * B * H * N * N * D


def sdpa_kernel_ops(B: int, N: int, H: int, D: int, variant: str, size: int = 2) -> List[Op]:
    """The SDPA kernels themselves, from their tile sizes (see FLASH and MEM_EFFICIENT)."""
    tiles = FLASH if variant == "plain" else MEM_EFFICIENT
    bhnd = B * H * N * D * size

    def executed(which):
        bm, bn = tiles[which]
        return 2 * B * H * math.ceil(N / bm) * bm * math.ceil(N / bn) * bn * D

    lse = B * H * math.ceil(N / 128) * 128 * 4
    accum = B * math.ceil(N / 128) * 128 * H * D * 4  # fp32 dQ accumulator
    # the additive mask, broadcast: [H, N, N] for the bias, [N, N] for LSA's diagonal; read once
    bias = {"bias": H * N * N * size, "lsa": N * N * size}.get(variant, 0)
    dbias = B * H * N * N * size if variant == "bias" else 0
    ops = [Op("sdpa fwd", 1, 3 * bhnd + bias, bhnd + lse, 2 * executed("fwd"), 0, "bf16"),
           Op("sdpa bwd dot(dO, O)", 1, 2 * bhnd, lse + accum),
           Op("sdpa bwd main", 1, 4 * bhnd + 2 * lse + bias + accum, 2 * bhnd + accum + dbias,
              5 * executed("bwd"), 0, "bf16"),
           Op("sdpa bwd convert dQ", 1, accum, bhnd)]
    return ops


def eager_loss(B: int, C: int) -> List[Op]:
    """mgit_fast.reference.mgit_loss on meta tensors, forward + backward (its host-side label
    check computed on the device, without the synchronising read)."""
    from mgit_fast import _checks, reference

    z, w = _meta(B, C, grad=True), _meta(B, C, grad=True)
    y = torch.empty(B, device="meta", dtype=torch.int64)
    saved = _checks.labels_in_range
    _checks.labels_in_range = lambda t, c, i: ((t == i) | ((t >= 0) & (t < c))).all()
    counter = OpCounter()
    try:
        with counter:
            reference.mgit_loss(z, w, y, **LOSS_OPTIONS).loss.backward()
    finally:
        _checks.labels_in_range = saved
    return counter.ops


@contextlib.contextmanager
def _meta_optimizers():
    """Lets torch's fused AdamW and foreach clipping take meta tensors (they check the device)."""
    import torch.utils._foreach_utils as fu

    patched = []
    devices = fu._get_fused_kernels_supported_devices() + ["meta"]
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("torch.") and m is not None]:
        for attr, value in (("_get_fused_kernels_supported_devices", lambda: devices),
                            ("_device_has_foreach_support", lambda device: True)):
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def torch_update(dim: int, depth: int) -> List[Op]:
    """The update as torch's own pieces on meta tensors: zero_grad(set_to_none), gradient
    accumulation, clip_grad_norm_(foreach) per model, the found-inf flag from the norms, foreach
    mixing of the paired gradients with a device μ, AdamW(fused=True) per model (decay groups)."""
    models = _update_models(dim, depth, False, device="meta", real=False)
    params = [list(m.parameters()) for m in models]
    seeds = [torch.empty_like(p) for ps in params for p in ps]
    counter = OpCounter()
    with _meta_optimizers():
        opts = []
        for m in models:
            decay = [p for p in m.parameters() if p.dim() >= 2]
            other = [p for p in m.parameters() if p.dim() < 2]
            opts.append(torch.optim.AdamW([{"params": decay}, {"params": other, "weight_decay": 0.0}],
                                          lr=1e-3, weight_decay=0.05, fused=True))
        ce_p, ce_a = torch.empty((), device="meta"), torch.empty((), device="meta")
        for step in range(2):  # the first step creates the optimizer state
            counter = OpCounter()
            with counter:
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                _accumulate(models, counter, seeds)
                norms = [torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True) for ps in params]
                found_inf = (~torch.isfinite(norms[0]) | ~torch.isfinite(norms[1])).float()
                mix = 0.5 * ce_p / (ce_p + ce_a)
                paired_p, paired_a = [p.grad for p in models[0].head], [p.grad for p in models[1].head]
                torch._foreach_mul_(paired_p, 1 - mix)
                torch._foreach_add_(paired_p, torch._foreach_mul(paired_a, mix))
                for opt in opts:
                    opt.found_inf = found_inf
                    opt.step()
    return counter.ops


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
def _ops_totals(ops: Sequence[Op], target: insp.Target) -> Dict[str, float]:
    nbytes = sum(o.read + o.write for o in ops)
    tc = sum(o.tc_flops for o in ops)
    fma = sum(o.fma_flops for o in ops)
    us = sum(modeled_us(o.read + o.write, o.tc_flops, o.fma_flops, o.launches, target,
                        o.precision if o.precision in TENSOR_PRECISIONS else "bf16") for o in ops)
    return dict(bytes=nbytes, tc_flops=tc, fma_flops=fma,
                launches=sum(o.launches for o in ops), modeled_us=us)


def _by_name(ops: Sequence[Op]) -> Dict[str, Dict[str, float]]:
    """Launches and bytes per op name."""
    out: Dict[str, Dict[str, float]] = defaultdict(lambda: dict(launches=0, bytes=0))
    for o in ops:
        out[o.name]["launches"] += o.launches
        out[o.name]["bytes"] += o.read + o.write
    return dict(out)


def ours_part(name: str, shape: str, full_make: Callable, small_makes: Sequence[Tuple[Any, Callable]],
              work: List[insp.Launch], target: insp.Target, facts: Dict[str, List],
              useful: Optional[float] = None) -> Dict[str, Any]:
    full, torch_ops = run_full(full_make, target)
    smalls = [run_recorded(make, key) for key, make in small_makes]
    launches = combine(full, smalls)
    label = {"attention": shape}.get(name, f"{name} {shape}")
    rows = facts.get(label, [])
    if [r["kernel"] for r in rows] != [l["launch"].kernel.strip("_").replace("_kernel", "") for l in launches]:
        rows = [{} for _ in launches]  # inspect's shape set no longer matches: no cubin facts
    kernels = []
    for i, (item, row) in enumerate(zip(launches, rows)):
        launch = item["launch"]
        w = work[i].work if i < len(work) and work[i].kernel == launch.kernel else {}
        precision = w.get("precision", "fp32")
        executed = w.get("executed_flops", w.get("flops", 0.0))
        tc, fma = (executed, 0.0) if precision in TENSOR_PRECISIONS else (0.0, executed)
        b = item["bytes"]
        kernels.append(dict(
            kernel=launch.kernel.strip("_").replace("_kernel", ""), grid=list(launch.grid),
            programs=math.prod(launch.grid), hbm_bytes=b["hbm"], read=b["read"], write=b["write"],
            atomic=b["atomic"], requested=b["requested"], size_spread=item["spread"],
            tc_flops=tc, fma_flops=fma, useful_flops=w.get("flops", 0.0), precision=precision,
            registers=row.get("registers"), blocks_per_sm=row.get("blocks_per_sm"),
            limited_by=row.get("limited_by"), spill_bytes=row.get("spill_bytes"), status=row.get("status"),
            modeled_us=modeled_us(b["hbm"], tc, fma, 1, target,
                                  precision if precision in TENSOR_PRECISIONS else "bf16"),
        ))
    extra = _ops_totals(torch_ops, target)
    total = dict(
        bytes=sum(k["hbm_bytes"] for k in kernels) + extra["bytes"],
        tc_flops=sum(k["tc_flops"] for k in kernels) + extra["tc_flops"],
        fma_flops=sum(k["fma_flops"] for k in kernels) + extra["fma_flops"],
        useful_flops=useful if useful is not None else sum(k["useful_flops"] for k in kernels),
        launches=len(kernels) + extra["launches"],
        modeled_us=sum(k["modeled_us"] for k in kernels) + extra["modeled_us"],
    )
    return dict(part=name, shape=shape, kernels=kernels,
                torch_ops=[dataclasses.asdict(o) for o in torch_ops], torch_ops_total=extra, total=total)


PART_KERNELS = {"attention": "attention", "loss": "mgit_loss", "update": ""}  # inspect's --kernel filter per part


def compiled_facts(target: insp.Target, jobs: int, cache_dir: Optional[str], kernel: str = ""
                   ) -> Dict[str, List[Dict[str, Any]]]:
    """`mgit-fast inspect --shapes bench` rows by label, in launch order. It runs in a fresh
    process: compiling needs the kernels defined outside the interpreter."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        command = [sys.executable, "-m", "mgit_fast.inspect", "--shapes", "bench", "--arch", target.arch,
                   "--json", path, "--jobs", str(jobs), "--kernel", kernel]
        command += ["--cache-dir", cache_dir] if cache_dir else []
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"mgit_fast.inspect failed:\n{done.stderr[-2000:]}")
        with open(path) as f:
            rows = json.load(f)["rows"]
    by_label: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    return by_label


def bench_parts(quick: bool = False):
    """(part, shape, arguments) for the bench shapes (`quick`: one of each, for tests)."""
    attention = [(label, B, N, dim // H, H) for label, B, N, dim, H in insp.BENCH_ATTENTION]
    variants = ("plain", "lsa", "bias")
    loss = list(insp.LOSS_GRID)
    update = list(insp.UPDATE_PAIRS.items())
    if quick:
        attention, variants, loss, update = attention[:1], variants[:1], loss[:1], update[:1]
    parts = []
    for label, B, N, D, H in attention:
        for variant in variants:
            parts.append(("attention", f"{label} bf16 {variant}", dict(B=B, N=N, H=H, D=D, variant=variant)))
    for B, C in loss:
        parts.append(("loss", f"B={B} C={C} bf16", dict(B=B, C=C)))
    for name, (dim, depth, heads) in update:
        parts.append(("update", f"{name} pair", dict(dim=dim, depth=depth, heads=heads)))
    return parts


SMALL_ATTENTION = ((2, 1), (3, 1))  # (B, H) of the reduced runs: ≥ 2, so a shared gradient is summed with atomics at both, as at full size
SMALL_LOSS = (4, 8)  # rows


def small_loss_rows(B: int, C: int) -> Tuple[int, int]:
    """Rows of the two reduced loss runs: SMALL_LOSS, or, when the full size takes several
    programs, enough rows that the reduced runs do too (the same kernels launch)."""
    from mgit_fast.kernels import mgit_loss

    if B * C <= mgit_loss.SINGLE_PROGRAM_ELEMENTS:
        return SMALL_LOSS
    rows = max(SMALL_LOSS[0], mgit_loss.SINGLE_PROGRAM_ELEMENTS // C + 1)
    return rows, 2 * rows
SMALL_UPDATE = (8, 16)  # widths of the reduced ViT pair
SMALL_UPDATE_DEPTH = 2


def model_part(part: str, shape: str, a: Dict[str, Any], target: insp.Target, facts: Dict[str, List]
               ) -> Dict[str, Any]:
    if part == "attention":
        B, N, H, D, variant = a["B"], a["N"], a["H"], a["D"], a["variant"]
        work = insp.attention_launches(shape, B, N, H, D, torch.bfloat16, variant, target=target)
        result = ours_part(part, shape, lambda: attention_part(B, N, H, D, variant, real=False),
                           [(("attention", b, N, h, D, variant), lambda b=b, h=h: attention_part(b, N, h, D, variant, dtype=torch.float16))
                            for b, h in SMALL_ATTENTION],
                           work, target, facts, useful=attention_useful_flops(B, N, H, D))
        eager = eager_attention(B, N, H, D, variant)
        sdpa = sdpa_kernel_ops(B, N, H, D, variant) + sdpa_layout_ops(B, N, H, D, variant)
        result["peers"] = {"eager": _ops_totals(eager, target), "sdpa": _ops_totals(sdpa, target)}
        result["peer_ops"] = {"sdpa": [dataclasses.asdict(o) for o in sdpa], "eager": _by_name(eager)}
    elif part == "loss":
        B, C = a["B"], a["C"]
        work = insp.loss_launches(B, C, target=target)
        result = ours_part(part, shape, lambda: loss_part(B, C, real=False),
                           [(("loss", b, C), lambda b=b: loss_part(b, C)) for b in small_loss_rows(B, C)], work, target,
                           facts)
        eager = eager_loss(B, C)
        result["peers"] = {"eager": _ops_totals(eager, target)}
        result["peer_ops"] = {"eager": _by_name(eager)}
    else:
        dim, depth, heads = a["dim"], a["depth"], a["heads"]
        work = insp.update_launches(shape, dim, depth, heads, target)
        result = ours_part(part, shape, lambda: update_part(dim, depth, real=False),
                           [(("update", d), lambda d=d: update_part(d, SMALL_UPDATE_DEPTH, small=True)) for d in SMALL_UPDATE],
                           work, target, facts)
        n = update_size(dim, depth)
        ops = torch_update(dim, depth)
        result["peers"] = {"torch": _ops_totals(ops, target)}
        result["peer_ops"] = {"torch": [dataclasses.asdict(o) for o in ops]}
        result["parameters"] = n
        result["bytes_per_param"] = {"ours": result["total"]["bytes"] / n,
                                     "ours_torch_ops": result["torch_ops_total"]["bytes"] / n,
                                     "torch": result["peers"]["torch"]["bytes"] / n}
    for peer in result["peers"].values():  # the same work: the math's FLOPs
        peer["useful_flops"] = result["total"]["useful_flops"]
    return result


def build(target: insp.Target, *, quick: bool = False, jobs: int = 1, cache_dir: Optional[str] = None,
          parts: Optional[Sequence[Tuple[str, str, Dict[str, Any]]]] = None,
          facts: Optional[Dict[str, List[Dict[str, Any]]]] = None,
          progress: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """The model of `parts` (default: the bench shapes); `facts`: inspect rows by label
    (default: from `mgit-fast inspect --shapes bench`; {} leaves registers and occupancy out)."""
    if facts is None:
        facts = compiled_facts(target, jobs, cache_dir)
    results = []
    for part, shape, a in (bench_parts(quick) if parts is None else parts):
        started = time.perf_counter()
        results.append(model_part(part, shape, a, target, facts))
        progress(f"{part} {shape}: {time.perf_counter() - started:.1f} s")
    import triton

    return dict(modeled=True, commit=_git_head(), arch=target.arch, gpu=target.gpu, bandwidth=target.bandwidth, peak=target.peak,
                launch_us=LAUNCH_US, triton=triton.__version__, torch=torch.__version__,
                flash_tiles=FLASH, mem_efficient_tiles=MEM_EFFICIENT, parts=results)


def _git_head() -> str:
    """The last commit that changed kernels/ (with "+changes" when the working tree differs)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()

    head = git("log", "-1", "--format=%h", "--", "kernels") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--", "kernels") else "")


NOTES = """## Assumptions (all figures modeled)

- HBM bytes are the unique bytes a launch touches; re-reads within a launch (K and V tiles read
  by every query block, the loss's second pass over a long row) are assumed to hit L2 and are
  shown separately as L2-requested bytes. An atomically updated byte counts twice (read and
  write back).
- Our bytes: for each launch and tensor argument, the fraction of the argument's bytes that the
  memory checker saw read, written or updated atomically at two reduced sizes (attention: B × H
  = 2 × 1 and 3 × 1 at the bench N and D; loss: B = 4 and 8 at the bench C; update: a ViT pair of
  width 8 and 16), applied to the argument's size at the bench shape. `size spread` is the
  difference between the two reduced sizes' predictions.
- Eager peers: one launch per aten op that is not a view or an allocation; the reference computes
  in fp32, and its fp32 matmuls run on CUDA cores (PyTorch's default, no TF32).
- SDPA: FlashAttention-2's forward (1 launch) and backward (3 launches: dot(dO, O) with the fp32
  dQ accumulator cleared, the main kernel with 5 matmuls per tile and dQ by fp32 atomics, the dQ
  conversion). LSA folds the learnable scale into q (an elementwise op) and passes the diagonal
  as an additive [N, N] mask; the bias variant passes the bias cast to bf16, and the
  memory-efficient kernel's [B, H, N, N] bias gradient is summed over B by autograd.
- Torch update: `_fused_adamw_` reads p, g, m, v and writes p, m, v (its grads are written only
  when it unscales by a grad_scale); foreach and fused ops launch as PyTorch's
  multi_tensor_apply chunks them (65,536 elements per block, 320 blocks and 110/64/48/36/30
  tensors per launch by list depth); zero_grad(set_to_none=True) lets autograd's accumulation
  steal the fresh gradient (no op).
- Ours, update: zero_grad sets `.grad` to None, so autograd hands over each fresh gradient (no
  op); the kernels read the gradients where they lie, through a table of their addresses. Ops
  that would write into existing `.grad` storage during the backward are counted (none now).
"""


def format_markdown(model: Dict[str, Any]) -> str:
    t = model
    lines = [
        "# Modeled work and traffic (no GPU: every figure here is modeled, not measured)",
        "",
        f"Made by `python bench/model.py --arch {t['arch']}{' --part ' + t['part'] if t.get('part') else ''}` "
        f"from the kernels at commit {t.get('commit', '?')} "
        f"(Triton {t['triton']}, torch {t['torch']}). "
        f"Target: {t['gpu']}, published figures: {t['bandwidth'] / 1e12:.2f} TB/s HBM3, "
        f"{t['peak']['bf16'] / 1e12:.0f} TFLOP/s dense bf16/fp16 tensor, {t['peak']['tf32'] / 1e12:.1f} TF32, "
        f"{t['peak']['fp32'] / 1e12:.1f} fp32 non-tensor. Launch cost {t['launch_us']} µs per launch "
        "(back-to-back launches on one stream; the eager peers' host overhead per op, several µs, is not "
        "included, which favours them).",
        "",
        "modeled µs = Σ over launches of max(bytes / bandwidth, tensor FLOPs / tensor peak + CUDA-core FLOPs / "
        "fp32 peak) + launch cost. Bytes are HBM bytes (unique addresses per launch; an L2 is assumed to "
        "catch re-reads within a launch). Ours: Triton launches (bytes from the memory checker's recorded "
        "addresses at reduced size, scaled per tensor argument) plus the torch ops around them (dispatch mode). "
        "Eager: every aten op of `mgit_fast.reference`, one launch each. SDPA: FlashAttention-2 "
        f"(tiles fwd {tuple(t['flash_tiles']['fwd'])}, bwd {tuple(t['flash_tiles']['bwd'])}, PyTorch's flash "
        "backend for head dim 64) for plain; the memory-efficient kernel "
        f"(tiles {tuple(t['mem_efficient_tiles']['fwd'])}, assumed) for LSA and bias, which flash cannot take; "
        "plus the layout copies timm's Attention makes around the call. Torch update: "
        "`clip_grad_norm_(foreach)` ×2, foreach mixing of the paired gradients, `AdamW(fused=True)` ×2, "
        "zero_grad(set_to_none) and gradient accumulation (stolen, free).",
        "",
        "| part | shape | ours MB | ours GFLOP exec (useful) | ours launches | ours regs · blk/SM | "
        "ours µs* | peer | peer MB | peer GFLOP exec (useful) | peer launches | peer µs* | ours / peer µs* |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in t["parts"]:
        o = p["total"]
        regs = " ".join(f"{k['registers']}·{k['blocks_per_sm']}" for k in p["kernels"])
        first = True
        for peer, v in p["peers"].items():
            ours = (f"{o['bytes'] / 1e6:.2f} | {(o['tc_flops'] + o['fma_flops']) / 1e9:.2f} "
                    f"({o['useful_flops'] / 1e9:.2f}) | {o['launches']} | {regs} | {o['modeled_us']:.1f}"
                    if first else " | | | | ")
            lines.append(f"| {p['part'] if first else ''} | {p['shape'] if first else ''} | {ours} | {peer} | "
                         f"{v['bytes'] / 1e6:.2f} | {(v['tc_flops'] + v['fma_flops']) / 1e9:.3g} "
                         f"({v['useful_flops'] / 1e9:.3g}) | {v['launches']} | {v['modeled_us']:.1f} | "
                         f"{o['modeled_us'] / v['modeled_us']:.2f} |")
            first = False
    lines += ["", "µs* = modeled. regs·blk/SM: per Triton launch of ours, in launch order, from the sm_90a cubin.",
              "", "## Update traffic per parameter per step (modeled)", "",
              "| pair | parameters | ours B/param (of which torch ops: zero_grad, accumulation) | torch B/param |",
              "|---|---|---|---|"]
    for p in t["parts"]:
        if p["part"] == "update":
            b = p["bytes_per_param"]
            lines.append(f"| {p['shape']} | {p['parameters']:,} | {b['ours']:.1f} ({b['ours_torch_ops']:.1f}) | "
                         f"{b['torch']:.1f} |")
    lines += ["", "The update reads the gradients through a table of their addresses; the tensors the "
              "table points to are counted as regions of the launch that reads them (`pointees`)."]
    lines += ["", "## Our launches (modeled)", "",
              "| part | shape | kernel | grid | HBM MB | read / write / atomic MB | L2-requested MB | "
              "GFLOP exec (useful) | regs | blk/SM (limit) | µs* | size spread |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in t["parts"]:
        for k in p["kernels"]:
            lines.append(
                f"| {p['part']} | {p['shape']} | {k['kernel']} | {'×'.join(map(str, k['grid']))} | "
                f"{k['hbm_bytes'] / 1e6:.3f} | {k['read'] / 1e6:.3f} / {k['write'] / 1e6:.3f} / "
                f"{k['atomic'] / 1e6:.3f} | {k['requested'] / 1e6:.3f} | "
                f"{(k['tc_flops'] + k['fma_flops']) / 1e9:.3f} ({k['useful_flops'] / 1e9:.3f}) | {k['registers']} | "
                f"{k['blocks_per_sm']} ({k['limited_by']}) | {k['modeled_us']:.1f} | {k['size_spread']:.1%} |")
        if p["torch_ops"]:
            names = defaultdict(int)
            for op in p["torch_ops"]:
                names[op["name"]] += op["launches"]
            e = p["torch_ops_total"]
            lines.append(f"| {p['part']} | {p['shape']} | torch ops: "
                         f"{', '.join(f'{n}×{c}' for n, c in names.items())} | | {e['bytes'] / 1e6:.3f} | | | "
                         f"{(e['tc_flops'] + e['fma_flops']) / 1e9:.3f} | | | {e['modeled_us']:.1f} | |")
    lines += ["", "size spread: how far the two reduced sizes' byte predictions differ (0 % = the "
              "per-argument coverage is size-independent).", "", NOTES]
    return "\n".join(lines)


def format_comparison(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    """Ours before → after, per part and shape (both modeled)."""
    old = {(p["part"], p["shape"]): p["total"] for p in before["parts"]}
    lines = [f"## Ours: before (commit {before.get('commit', '?')}) → now (commit {after.get('commit', '?')}), modeled",
             "", "| part | shape | MB | launches | GFLOP executed | µs* |", "|---|---|---|---|---|---|"]
    for p in after["parts"]:
        b, a = old.get((p["part"], p["shape"])), p["total"]
        if b is None:
            continue
        lines.append(f"| {p['part']} | {p['shape']} | {b['bytes'] / 1e6:.2f} → {a['bytes'] / 1e6:.2f} | "
                     f"{b['launches']} → {a['launches']} | "
                     f"{(b['tc_flops'] + b['fma_flops']) / 1e9:.3g} → {(a['tc_flops'] + a['fma_flops']) / 1e9:.3g} | "
                     f"{b['modeled_us']:.1f} → {a['modeled_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/model.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for model.md and model.json")
    parser.add_argument("--arch", choices=sorted(insp.TARGETS), default="sm_90a")
    parser.add_argument("--name", default="model", help="file name stem (default model)")
    parser.add_argument("--quick", action="store_true", help="one shape per part (a smoke run)")
    parser.add_argument("--jobs", type=int, default=1, help="compile processes for the cubin facts")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "mgit_fast", "inspect"))
    parser.add_argument("--part", choices=sorted(PART_KERNELS),
                        help="only this part's shapes: DIR/model_PART.md and .json, compared with DIR/model.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target = _target(args.arch)
    name = f"model_{args.part}" if args.part and args.name == "model" else args.name
    parts = facts = None
    if args.part:
        parts = [p for p in bench_parts(args.quick) if p[0] == args.part]
        facts = compiled_facts(target, args.jobs, args.cache_dir, PART_KERNELS[args.part])
    model = build(target, quick=args.quick, jobs=args.jobs, cache_dir=args.cache_dir, parts=parts, facts=facts,
                  progress=lambda s: print(s, file=sys.stderr, flush=True))
    model["part"] = args.part
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(model, f, indent=1, default=str)
    text = format_markdown(model)
    before = os.path.join(args.out, "model.json" if args.part else "model_before.json")
    if name not in ("model_before", os.path.basename(before)[:-5]) and os.path.exists(before):
        with open(before) as f:
            text += "\n" + format_comparison(json.load(f), model)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    print(f"wrote {args.out}/{name}.md and .json (modeled)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
