"""What the Triton kernels become on a GPU that is not here: `mgit-fast inspect`.

Capture: the real launchers run on meta tensors while `JITFunction.run` is replaced by a
recorder, which binds the arguments with Triton's own binder for the chosen target, so each
launch is recorded exactly as the JIT would specialise it (signature, constexprs, 16-byte
divisibility attributes, num_warps, num_stages) together with its grid; nothing runs and
nothing is allocated, so shapes far too large for this machine can be captured. Tensors get
the addresses the CUDA caching allocator would give them: aligned bases plus each view's
storage offset.

Compile and report: each distinct specialisation is compiled for the target
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 | 80, 32))`), and its cubin read
with the `cuobjdump` Triton ships: registers, spill bytes (ptxas), shared memory, blocks per
SM and what limits them, tensor-core instructions (HGMMA/HMMA), global load/store widths,
atomics and their memory order. With each launch's grid and its bytes and FLOPs this gives
waves over the SMs, the useful fraction of the attention tile work (information, not a goal),
and the modeled floor (max of FLOPs over peak and bytes over bandwidth, published H100 SXM /
A100 SXM figures). Off a GPU the attention launchers run the first of each kernel's candidate
configs; the gate shape set runs them all (`planning.every_config`), so every config the
autotuner could pick is compiled and gated.

    mgit-fast inspect [--arch sm_90a|sm_80] [--shapes bench|gate] [--json PATH] [--gate]

`--gate` exits 1 when a specialisation spills, an fp16/bf16 attention kernel misses the
tensor cores, a grid passes CUDA's limits, or an atomic is stronger than relaxed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target and the published figures of the GPU the report models."""

    arch: str
    capability: int
    gpu: str
    sms: int
    smem_per_sm: int  # bytes a multiprocessor's blocks may share
    bandwidth: float  # bytes/s
    peak: Dict[str, float]  # FLOP/s by operand precision


TARGETS = {
    "sm_90a": Target("sm_90a", 90, "H100 SXM", 132, 228 * 1024, 3.35e12,
                     {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    "sm_80": Target("sm_80", 80, "A100 SXM", 108, 164 * 1024, 2.039e12,
                    {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
}
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One kernel launch as the JIT would build it, plus what the shape set knows of its work."""

    kernel: str
    module: str
    signature: Dict[str, str]
    constexprs: Dict[Any, Any]
    attrs: Dict[Any, Any]
    options: Dict[str, Any]
    grid: Tuple[int, int, int]
    args: Dict[str, Any]  # scalar arguments by name; tensors as "<dtype>"
    label: str = ""
    work: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def constants(self) -> Dict[str, Any]:
        """The constexpr arguments by name."""
        return {k: v for k, v in self.args.items() if self.signature.get(k) == "constexpr"}

    def key(self, target: Target) -> str:
        """Identity of the compiled specialisation (the grid is not part of it)."""
        from triton import __version__

        fn = _jit_function(self.module, self.kernel)
        blob = repr((fn.cache_key, sorted(self.signature.items()), sorted(map(repr, self.constexprs.items())),
                     sorted(map(repr, self.attrs.items())), self.options["num_warps"], self.options["num_stages"],
                     target.arch, __version__))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _Pointer:
    """A tensor as the binder sees it: a dtype and an address. Bases are 512-byte aligned, as
    the CUDA caching allocator's are; a view adds its storage offset."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = (1 << 32) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


def _jit_function(module: str, name: str):
    """The kernel as a `JITFunction`, also when the module was imported under TRITON_INTERPRET."""
    import importlib

    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # triton.heuristics / autotune wrappers
        fn = fn.fn
    if isinstance(fn, JITFunction):
        return fn
    cache = _jit_function.__dict__.setdefault("cache", {})
    if (module, name) not in cache:  # the interpreter's function: the plain Python function left
        cache[(module, name)] = JITFunction(fn)
    return cache[(module, name)]


@contextlib.contextmanager
def capture(target: Target = TARGETS["sm_90a"]) -> Iterator[List[Launch]]:
    """Within the block, Triton launches are recorded (see the module docstring), not run."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    launches: List[Launch] = []
    backend = make_backend(GPUTarget("cuda", target.capability, 32))

    def record(self, *args, grid, warmup=False, **kwargs):
        fn = _jit_function(self.fn.__module__, self.fn.__name__)
        binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
        wrapped = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        kw = {k: (_Pointer(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        bound, specialization, options = binder(*wrapped, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        shown = {k: (str(v.dtype).replace("torch.", "") if isinstance(v, _Pointer) else v) for k, v in bound.items()}
        launches.append(Launch(
            kernel=self.fn.__name__, module=self.fn.__module__, signature=dict(signature), constexprs=constexprs,
            attrs=attrs, options=dict(options.__dict__), grid=grid, args=shown,
        ))
        return None

    patched = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patched.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    saved = [(cls, cls.run) for cls in patched]
    with contextlib.suppress(ImportError):  # the binder imports it lazily; it checks the mode on import
        import triton.experimental.gluon  # noqa: F401
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # launchers choose as they would on a GPU
    for cls in patched:
        cls.run = record
    try:
        yield launches
    finally:
        for cls, run in saved:
            cls.run = run
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def grid_problems(launch: Launch) -> List[str]:
    return [f"grid {'xyz'[i]} = {g:,} > {limit:,}" for i, (g, limit) in enumerate(zip(launch.grid, GRID_LIMITS))
            if g > limit or g < 1]


# --------------------------------------------------------------------------------------------
# shape sets: the real launchers on meta tensors, each launch labelled with its work
# --------------------------------------------------------------------------------------------
VITS = {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}
BENCH_ATTENTION = [(f"vit_{m}/4@32", 256, 65, *VITS[m]) for m in VITS] + [
    (f"vit_{m}/16@224", 128, 197, *VITS[m]) for m in VITS
]
LOSS_GRID = [(B, C) for B in (256, 4096) for C in (10, 100, 1000, 21843)]
UPDATE_PAIRS = {"vit_s": (384, 12, 6), "vit_b": (768, 12, 12)}
# the supported attention table, by (dtype, TF32 allowed, variants); each at N = 197 for every
# head dim, plus bf16 at N = 17 (the short-sequence tile) and N = 64 (no leftover), and
# GATE_ATTENTION_N65 at N = 65; tf32 and fp16 share their tiles and code paths with bf16 but for
# the operand type, so a few variants cover them
GATE_ATTENTION = [
    (torch.bfloat16, False, ("plain", "lsa", "bias", "bias_batch", "lsa_mask", "lsa_mask_batch")),
    (torch.float16, False, ("plain", "bias", "lsa_mask")),
    (torch.float32, False, ("plain", "lsa", "bias", "bias_batch", "lsa_mask", "lsa_mask_batch")),
    (torch.float32, True, ("plain", "bias", "lsa_mask")),
]
# N = 64 + 1: the last key / query (a lone class token's worth) in a 16-wide masked tail tile
GATE_ATTENTION_N65 = [
    (torch.bfloat16, False, v) for v in ("plain", "lsa", "bias", "bias_batch", "lsa_mask", "lsa_mask_batch")
] + [
    (torch.float16, False, "plain"), (torch.float32, False, "lsa"), (torch.float32, False, "bias"),
    (torch.float32, False, "lsa_mask"), (torch.float32, True, "plain"),
]
# N = 1 + 12²: 17 leftover keys (two 16-wide tail steps) and a 32-row query tail (fp16/bf16 at
# D = 32, 64, the ViT head dims)
GATE_ATTENTION_N145 = [
    (torch.bfloat16, False, v) for v in ("plain", "lsa", "bias", "bias_batch", "lsa_mask", "lsa_mask_batch")
] + [(torch.float16, False, "plain")]
META = torch.device("meta")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def tf32(allowed: bool):
    """Launchers see PyTorch's fp32 matmul choice as `allowed`; torch's own setting is left alone
    (setting it through the new API makes later legacy reads raise)."""
    from mgit_fast.kernels.attention import planning

    saved = planning.tf32_allowed
    planning.tf32_allowed = lambda: allowed
    try:
        yield
    finally:
        planning.tf32_allowed = saved


def _precision_name(dtype: torch.dtype, allow_tf32: bool) -> str:
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "fp32"
    return _DTYPE_NAMES[dtype]


def attention_launches(
    label: str, B: int, N: int, H: int, D: int, dtype: torch.dtype, variant: str, *, packed: bool = True,
    allow_tf32: bool = False, backward: bool = True, target: Target = TARGETS["sm_90a"],
    every_config: bool = False,
) -> List[Launch]:
    """Forward and backward of one attention call. `variant`: plain, lsa (learnable [H] scale and
    diagonal mask), bias (a learnable [H, N, N] bias, its gradient summed over the batch by the
    shared-gradient pass), bias_batch ([B, H, N, N], its gradient written by the dq kernel),
    lsa_mask (LSA with a learnable multiplicative [H, N, N] mask, its gradient from the
    shared-gradient pass) or lsa_mask_batch (LSA with a [B, H, N, N] mask; a Gaussian-mixture
    bias runs as bias, built in PyTorch). With `every_config`, each kernel
    is launched once per candidate config (`planning.every_config`), else with the first."""
    from mgit_fast.kernels.attention import op, planning

    new = lambda *shape, dt=dtype: torch.empty(shape, device=META, dtype=dt)  # noqa: E731
    q, k, v = (new(B, N, 3 * H * D), None, None) if packed else (new(B, H, N, D) for _ in range(3))
    lsa = variant.startswith("lsa")
    scale = new(H, dt=torch.float32) if lsa else None
    bias = {"bias": lambda: new(H, N, N, dt=torch.float32),
            "bias_batch": lambda: new(B, H, N, N, dt=torch.float32)}.get(variant, lambda: None)()
    mask = {"lsa_mask": lambda: new(H, N, N, dt=torch.float32),
            "lsa_mask_batch": lambda: new(B, H, N, N, dt=torch.float32)}.get(variant, lambda: None)()
    heads = H if packed else 0
    every = planning.every_config() if every_config else contextlib.nullcontext()
    with tf32(allow_tf32), every, capture(target) as launches:
        out, lse = op.run_forward(q, k, v, heads, scale, D**-0.5, bias, mask, lsa)
        if backward:
            op.run_backward(torch.empty_like(out), q, k, v, out, lse, heads, scale, D**-0.5, bias, lsa,
                            scale is not None, bias is not None, mask, mask is not None)
    precision = _precision_name(dtype, allow_tf32)
    size = torch.finfo(dtype).bits // 8
    # a score map (bias or mask) is read by each kernel; its gradient is written by the dq kernel
    # (per batch) or by the shared-gradient pass (one write or atomic per element per group)
    map_bytes = {name: (0 if t is None else t.numel() * 4) for name, t in (("bias", bias), ("mask", mask))}
    bias_bytes = sum(map_bytes.values())
    for launch in launches:
        if launch.kernel == "attention_fwd_kernel":
            mm, nbytes = 2, 4 * B * H * N * D * size + 4 * B * H * N + bias_bytes
        elif launch.kernel == "attention_bwd_dq_kernel":
            written = (map_bytes["bias"] * (launch.args["DBIAS"] is not None)
                       + map_bytes["mask"] * (launch.args["DMASK"] is not None))
            mm, nbytes = 3, 6 * B * H * N * D * size + 8 * B * H * N + bias_bytes + written
        elif launch.kernel == "attention_bwd_dkdv_kernel":
            mm, nbytes = 4, 6 * B * H * N * D * size + 8 * B * H * N + bias_bytes
        elif launch.kernel == "attention_bwd_shared_kernel":  # one write (or atomic) per element per group
            target = map_bytes["mask" if launch.args["GRAD_OF_MASK"] else "bias"]
            contributors = {0: B * H, 1: B, 2: H}[launch.args["GRAD_LAYOUT"]]
            groups = -(-contributors // launch.args["GROUP"])
            mm, nbytes = 2, 4 * B * H * N * D * size + 8 * B * H * N + bias_bytes + target * groups
        else:
            continue
        tiles = attention_tile_area(N, launch.constants)
        per_area = 2 * mm * B * H * D
        launch.label = f"{label} {_DTYPE_NAMES[dtype] if precision != 'tf32' else 'tf32'} {variant}"
        launch.work = dict(flops=per_area * N * N, executed_flops=per_area * tiles, bytes=nbytes, precision=precision)
    return launches


def attention_tile_area(N: int, constants: Dict[str, Any]) -> int:
    """Per head and matmul, the (owned × streamed) positions the tiles cover, N² of them useful
    (`kernels.attention.planning`): full BLOCK_M blocks plus one TAIL_M-row tile on the owned
    side; on the streamed side full BLOCK_N blocks plus TAIL_N-wide steps (the shared-gradient
    pass: one TAIL_N-wide tile, as wide as the rest)."""
    bm, bn = constants["BLOCK_M"], constants["BLOCK_N"]
    tail_m, tail_n = constants["TAIL_M"], constants["TAIL_N"]
    owned = (N // bm) * bm + (tail_m if N % bm else 0)
    rest = N % bn
    streamed = (N // bn) * bn + (-(-rest // tail_n) * tail_n if rest else 0)
    return owned * streamed


def loss_launches(B: int, C: int, dtype: torch.dtype = torch.bfloat16, target: Target = TARGETS["sm_90a"],
                  *, every_output: bool = False) -> List[Launch]:
    """The loss forward and the backward of `loss.backward()` (an upstream gradient for `loss`
    only); with `every_output`, the backward's specialisation for gradients of all four outputs
    too (labelled "4 grads"): the gate compiles both."""
    from mgit_fast.kernels import mgit_loss as kernel

    z, w = (torch.empty(B, C, device=META, dtype=dtype) for _ in range(2))
    y = torch.empty(B, device=META, dtype=torch.int64)
    scalar = lambda: torch.empty((), device=META)  # noqa: E731
    with capture(target) as launches:  # with gradients: stored (C ≤ 2,048) and scaled, or recomputed from row stats
        *_, aux, saved_z, saved_w = kernel.forward(z, w, y, 0.1, 2.0, 0.1, -100, needs_grad=True)
        kernel.backward((scalar(), None, None, None), aux, saved_z, saved_w, z, w, y, 0.1, -100, tempered=True)
        if every_output:
            kernel.backward(tuple(scalar() for _ in range(4)), aux, saved_z, saved_w, z, w, y, 0.1, -100,
                            tempered=True)
    size = torch.finfo(dtype).bits // 8
    stored = kernel.stores_gradients(C, True)
    reads = 1 if stored else 2  # a row longer than a chunk: a log-sum-exp pass and a JS pass
    for launch in launches:
        launch.label = f"loss B={B} C={C} {_DTYPE_NAMES[dtype]}"
        if launch.kernel == "_mgit_loss_fwd_kernel":
            launch.work = dict(bytes=2 * (reads + stored) * B * C * size + (8 if stored else 32) * B,
                               flops=30 * B * C, precision="fp32")
        elif launch.kernel == "_mgit_loss_bwd_kernel":
            launch.work = dict(bytes=4 * B * C * size + (0 if stored else 24 * B),
                               flops=(2 if stored else 20) * B * C, precision="fp32")
    if every_output:
        launches[-1].label += " 4 grads"
    return launches


def _vit_shapes(dim: int, depth: int, classes: int = 1000, img: int = 224, patch: int = 16) -> List[torch.Size]:
    tokens = (img // patch) ** 2 + 1
    shapes = [torch.Size([1, 1, dim]), torch.Size([1, tokens, dim]), torch.Size([dim, 3, patch, patch]),
              torch.Size([dim])]
    for _ in range(depth):
        shapes += [torch.Size([dim]), torch.Size([dim]), torch.Size([3 * dim, dim]), torch.Size([3 * dim]),
                   torch.Size([dim, dim]), torch.Size([dim]), torch.Size([dim]), torch.Size([dim]),
                   torch.Size([4 * dim, dim]), torch.Size([4 * dim]), torch.Size([dim, 4 * dim]), torch.Size([dim])]
    return shapes + [torch.Size([dim]), torch.Size([dim]), torch.Size([classes, dim]), torch.Size([classes])]


def update_launches(name: str, dim: int, depth: int, heads: int, target: Target = TARGETS["sm_90a"]
                    ) -> List[Launch]:
    """One multi-gradient AdamW step of a ViT and its one-block auxiliary, heads paired."""
    from mgit_fast.kernels import multi_gradient_adamw as kernel

    primary, auxiliary = _vit_shapes(dim, depth), _vit_shapes(dim, 1)
    pairs = [(len(primary) - 2, len(auxiliary) - 2), (len(primary) - 1, len(auxiliary) - 1)]
    layout = kernel.FlatLayout(primary, auxiliary, pairs, [len(s) >= 2 for s in primary],
                               [len(s) >= 2 for s in auxiliary], META)
    scalar = lambda dt=torch.float32: torch.empty((), device=META, dtype=dt)  # noqa: E731
    with capture(target) as launches:
        layout.step(step=scalar(torch.int64), skipped_steps=scalar(torch.int64), last_mix=scalar(),
                    lr=(scalar(), scalar()), betas=(0.9, 0.999), eps=1e-8, weight_decay=(0.05, 0.05),
                    mix="adaptive", mix_max=0.5, ce_primary=scalar(), ce_auxiliary=scalar(), average=0.0,
                    max_grad_norm=1.0)
    n = sum(layout.numels)  # gradients are read in place (unpadded); params and moments are padded flat buffers
    traffic = {"_sumsq_kernel": 4 * n + 16 * layout.geometry[5],
               "_update_kernel": 4 * n + 24 * layout.total + 48 * layout.items.shape[0]}
    for launch in launches:
        launch.label = f"update {name} pair"
        launch.work = dict(bytes=traffic.get(launch.kernel, 0), flops=0, precision="fp32")
    return launches


def shape_set(name: str, target: Target = TARGETS["sm_90a"]) -> List[Launch]:
    """`bench`: the benchmark shapes (bf16 attention, LSA, bias and masked LSA variants; the loss
    grid; the update of a ViT-S and a ViT-B pair). `gate`: every specialisation the supported shape table
    produces (head dims 16–128, fp32 with and without TF32, fp16, bf16, every variant)."""
    launches: List[Launch] = []
    if name == "bench":
        for label, B, N, dim, H in BENCH_ATTENTION:
            for variant in ("plain", "lsa", "bias", "lsa_mask"):
                launches += attention_launches(label, B, N, H, dim // H, torch.bfloat16, variant, target=target)
        for B, C in LOSS_GRID:
            launches += loss_launches(B, C, target=target)
        for pair, (dim, depth, heads) in UPDATE_PAIRS.items():
            launches += update_launches(pair, dim, depth, heads, target)
    elif name == "gate":  # every candidate config of each attention kernel, as the autotuner may pick any
        every = dict(target=target, every_config=True)
        for D in (16, 32, 64, 128):
            for dtype, allow, variants in GATE_ATTENTION:
                for variant in variants:
                    launches += attention_launches(f"D={D} N=197", 8, 197, 4, D, dtype, variant, allow_tf32=allow,
                                                   **every)
            for N in (17, 64):  # a sequence shorter than a block; one that blocks divide (no tail)
                launches += attention_launches(f"D={D} N={N}", 8, N, 4, D, torch.bfloat16, "plain", **every)
            for dtype, allow, variant in GATE_ATTENTION_N65:  # a 16-wide tail tile for the last key / query
                launches += attention_launches(f"D={D} N=65", 8, 65, 4, D, dtype, variant, allow_tf32=allow, **every)
            for dtype, allow, variant in GATE_ATTENTION_N145 if D in (32, 64) else ():
                launches += attention_launches(f"D={D} N=145", 8, 145, 4, D, dtype, variant, allow_tf32=allow, **every)
        for B, C in LOSS_GRID:
            for dtype in (torch.bfloat16, torch.float32):
                launches += loss_launches(B, C, dtype, target, every_output=True)
        for pair, (dim, depth, heads) in UPDATE_PAIRS.items():
            launches += update_launches(pair, dim, depth, heads, target)
    else:
        raise ValueError(f"shapes must be 'bench' or 'gate', got {name!r}")
    return launches


# --------------------------------------------------------------------------------------------
# compile and read the cubin
# --------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _width(op: str) -> int:
    for bits in ("128", "64", "U16", "S16", "U8", "S8"):
        if f".{bits}" in op:
            return int(re.sub(r"\D", "", bits))
    return 32


def compile_facts(module: str, kernel: str, signature, constexprs, attrs, options, capability: int) -> Dict[str, Any]:
    """Compiles one specialisation and reads its resources and instructions."""
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(module, kernel)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers, stack, spill bytes
    started = time.perf_counter()

    def compile_(always: bool):
        """(compiled kernel, ptxas's log: empty on a hit in Triton's cache unless `always`)."""
        log, before = io.StringIO(), knobs.compilation.always_compile
        knobs.compilation.always_compile = always or before
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                          target=GPUTarget("cuda", capability, 32), options=options)
        finally:
            knobs.compilation.always_compile = before
        return compiled, log.getvalue()

    spill_line = r"(\d+) bytes spill stores, (\d+) bytes spill loads"
    try:
        compiled, log = compile_(False)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
        ops = re.findall(r"\b(HGMMA|HMMA|LDGSTS[.\w]*|LDG[.\w]*|STG[.\w]*|LDL[.\w]*|STL[.\w]*|ATOMG?[.\w]*|"
                         r"REDG?[.\w]*|MEMBAR[.\w]*|UTMALDG[.\w]*)", sass)
        counts = Counter(op.split(".")[0] for op in ops)
        if not re.search(spill_line, log) and counts["LDL"] + counts["STL"]:
            # a cache hit skipped ptxas, and the kernel uses local memory: compile again for the bytes
            compiled, log = compile_(True)
    except Exception as exc:  # noqa: BLE001 - the report shows why a specialisation failed
        return {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    spills = [int(a) + int(b) for a, b in re.findall(spill_line, log)]
    resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx_atomics = re.findall(r"\b(?:atom|red)\.[\w.]+", compiled.asm["ptx"])
    return {
        "status": "ok",
        "compile_s": round(time.perf_counter() - started, 2),
        "registers": int(resources.get("REG", 0)),
        "stack": int(resources.get("STACK", 0)),
        "spill_bytes": max(spills, default=int(resources.get("LOCAL", 0))),
        "shared": int(compiled.metadata.shared) + int(resources.get("SHARED", 0)),
        "num_warps": int(compiled.metadata.num_warps),
        "tensor_core": {"HGMMA": counts["HGMMA"], "HMMA": counts["HMMA"]},
        "load_bits": sorted({_width(op) for op in ops if op.startswith("LDG") and not op.startswith("LDGSTS")}),
        "store_bits": sorted({_width(op) for op in ops if op.startswith("STG")}),
        "async_copies": counts["LDGSTS"] + counts["UTMALDG"],
        "local_ops": counts["LDL"] + counts["STL"],
        "atomics": sorted(set(ptx_atomics)),
        "strong_atomics": sorted({a for a in ptx_atomics if re.search(r"\.(acq_rel|acquire|release|sc)\b", a)}),
        "gpu_fences": sum(1 for op in ops if op.startswith("MEMBAR") and "GPU" in op),
    }


def _compile_task(task):
    return task[0], compile_facts(*task[1:])


def occupancy(facts: Dict[str, Any], target: Target) -> Tuple[int, str]:
    """Resident blocks per SM and the resource that limits them."""
    warps = facts["num_warps"]
    regs_per_warp = math.ceil(max(facts["registers"], 1) * 32 / 256) * 256
    limits = {
        "registers": (REGISTERS_PER_SM // regs_per_warp) // warps,
        "threads": THREADS_PER_SM // (32 * warps),
        "shared": target.smem_per_sm // facts["shared"] if facts["shared"] else BLOCKS_PER_SM,
        "blocks": BLOCKS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def analyse(launches: Sequence[Launch], target: Target, *, cache_dir: Optional[str] = None, jobs: int = 0,
            progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Compiles every distinct specialisation (cached by key in `cache_dir`) and returns one row
    per launch."""
    cache_path = os.path.join(cache_dir, f"facts-{target.arch}.json") if cache_dir else None
    cache: Dict[str, Any] = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    keys = [launch.key(target) for launch in launches]
    crashed: Dict[str, Any] = {}
    todo = {}
    for key, launch in zip(keys, launches):
        if key not in cache and key not in todo:
            todo[key] = (key, launch.module, launch.kernel, launch.signature, launch.constexprs, launch.attrs,
                         launch.options, target.capability)
    if progress:
        progress(f"{len(launches)} launches, {len(set(keys))} specialisations, {len(todo)} to compile "
                 f"for {target.arch}")
    if todo:
        jobs = jobs or max(1, os.cpu_count() or 1)
        if jobs == 1:
            results = map(_compile_task, todo.values())
        else:
            import multiprocessing

            pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init)
            results = _crash_tolerant(pool, todo)
        for done, (key, facts) in enumerate(results, 1):
            if facts.get("status") == "ok" or not facts["status"].startswith("failed: compiler process"):
                cache[key] = facts
            else:
                crashed[key] = facts
            if progress and done % 10 == 0:
                progress(f"  compiled {done}/{len(todo)}")
        if jobs != 1:
            pool.shutdown()
        if cache_path:
            os.makedirs(cache_dir, exist_ok=True)
            with open(cache_path, "w") as f:
                json.dump(cache, f)
    return [row(launch, cache.get(key) or crashed[key], target) for launch, key in zip(launches, keys)]


def _crash_tolerant(pool, todo):
    """Results in order; a compiler that aborts the worker (an LLVM error) fails its task only."""
    from concurrent.futures.process import BrokenProcessPool

    futures = [(key, pool.submit(_compile_task, task)) for key, task in todo.items()]
    for key, future in futures:
        try:
            yield future.result()
        except BrokenProcessPool:
            yield key, {"status": "failed: compiler process crashed (rerun with --jobs 1 to see its message)"}


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def row(launch: Launch, facts: Dict[str, Any], target: Target) -> Dict[str, Any]:
    """The report's row for one launch: compiled facts, occupancy, waves, and the modeled floor."""
    out: Dict[str, Any] = {
        "kernel": launch.kernel.strip("_").replace("_kernel", ""), "label": launch.label, "arch": target.arch,
        "grid": list(launch.grid), "num_warps": launch.options["num_warps"],
        "num_stages": launch.options["num_stages"], "constexprs": launch.constants,
        "grid_problems": grid_problems(launch), **facts,
    }
    if facts.get("status") != "ok":
        return out
    blocks, limiter = occupancy(facts, target)
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    out.update(blocks_per_sm=blocks, limited_by=limiter, programs=programs,
               waves=programs / (target.sms * max(blocks, 1)))
    work = launch.work
    if work:
        flop_time = work.get("executed_flops", work.get("flops", 0)) / target.peak[work["precision"]]
        byte_time = work["bytes"] / target.bandwidth
        out.update(modeled_floor_us=1e6 * max(flop_time, byte_time),
                   bound="compute" if flop_time > byte_time else "memory", bytes=work["bytes"])
        if "executed_flops" in work:  # of the tile work: information only, no goal or gate
            out["useful_fraction"] = work["flops"] / work["executed_flops"]
    return out


# the kernels built on tile matmuls (tl.dot): with fp16/bf16 operands they must use tensor cores
TILE_MATMUL_KERNELS = ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv", "attention_bwd_shared")


def gate_failures(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """What the CI gate refuses: failed compiles, spills, fp16/bf16 tile matmuls (the attention
    kernels, `TILE_MATMUL_KERNELS`) without tensor cores, grids past CUDA's limits, atomics
    stronger than relaxed."""
    failures = []
    for r in rows:
        where = f"{r['arch']} {r['kernel']} [{r['label']}{_config(r)}]"
        if r.get("status") != "ok":
            failures.append(f"{where}: {r.get('status')}")
            continue
        if r["spill_bytes"] or r["local_ops"]:
            failures.append(f"{where}: spills {r['spill_bytes']} B ({r['local_ops']} local-memory instructions)")
        if r["kernel"] in TILE_MATMUL_KERNELS and re.search(r"\b(bf16|fp16)\b", r["label"]):
            if not (r["tensor_core"]["HGMMA"] or r["tensor_core"]["HMMA"]):
                failures.append(f"{where}: no tensor-core instruction")
        failures += [f"{where}: {p}" for p in r["grid_problems"]]
        if r["strong_atomics"]:
            failures.append(f"{where}: atomics stronger than relaxed: {', '.join(r['strong_atomics'])}")
    return failures


def _config(r: Dict[str, Any]) -> str:
    """The launch config of an attention row (the gate compiles several per shape), else ""."""
    c = r.get("constexprs") or {}
    if "BLOCK_M" not in c or "BLOCK_N" not in c:
        return ""
    return (f" BLOCK_M={c['BLOCK_M']} BLOCK_N={c['BLOCK_N']} TAIL_M={c.get('TAIL_M')} TAIL_N={c.get('TAIL_N')}"
            f" warps={r.get('num_warps')} stages={r.get('num_stages')}")


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ("kernel", "shape", "warps", "regs", "spill B", "smem KB", "blk/SM (limit)", "TC", "ld/st bits",
            "grid", "waves", "useful", "floor µs*")
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append((r["kernel"], r["label"], str(r["num_warps"]), r.get("status", "?")[:60]) + ("",) * 9)
            continue
        tc = "HGMMA" if r["tensor_core"]["HGMMA"] else ("HMMA" if r["tensor_core"]["HMMA"] else "-")
        grid = "×".join(f"{g:,}" for g in r["grid"] if g != 1) or "1"
        lines.append((
            r["kernel"], r["label"], str(r["num_warps"]), str(r["registers"]), str(r["spill_bytes"]),
            f"{r['shared'] / 1024:.1f}", f"{r['blocks_per_sm']} ({r['limited_by']})", tc,
            f"{'/'.join(map(str, r['load_bits'])) or '-'} | {'/'.join(map(str, r['store_bits'])) or '-'}",
            grid + (" !" if r["grid_problems"] else ""), f"{r['waves']:.2f}",
            _useful(r),
            f"{r['modeled_floor_us']:.1f}" if "modeled_floor_us" in r else "",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _useful(r: Dict[str, Any]) -> str:
    """The useful fraction of the tile work (information only)."""
    return f"{r['useful_fraction']:.2f}" if "useful_fraction" in r else ""


def _unique_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    seen, out = set(), []
    for r in rows:
        ident = (r["kernel"], r["label"], tuple(r["grid"]), r["num_warps"], r["num_stages"])
        if ident not in seen:
            seen.add(ident)
            out.append(r)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgit-fast inspect",
        description="Compile every kernel specialisation for a GPU target on this machine (no GPU needed) "
                    "and report registers, spills, shared memory, occupancy, tensor cores, load widths, "
                    "grids and the modeled floor.",
    )
    parser.add_argument("--arch", choices=sorted(TARGETS), default="sm_90a", help="compile target (default sm_90a)")
    parser.add_argument("--shapes", choices=("bench", "gate"), default="bench",
                        help="bench: the benchmark shapes (default); gate: the whole supported shape table")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "mgit_fast", "inspect"),
                        help="where compiled facts are kept between runs (default ~/.cache/mgit_fast/inspect)")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per CPU)")
    parser.add_argument("--gate", action="store_true", help="exit 1 if any specialisation fails the compile gate")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this text")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 0:
        print("mgit-fast inspect: --jobs must be ≥ 0", file=sys.stderr)
        return 2
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.access(folder, os.W_OK):
            print(f"mgit-fast inspect: --json: cannot write to {folder}", file=sys.stderr)
            return 2
    os.environ.pop("TRITON_INTERPRET", None)
    target = TARGETS[args.arch]
    launches = [launch for launch in shape_set(args.shapes, target) if args.kernel in launch.kernel]
    rows = analyse(launches, target, cache_dir=args.cache_dir, jobs=args.jobs,
                   progress=lambda msg: print(msg, file=sys.stderr))
    import triton

    print(f"{target.arch} ({target.gpu}, {target.sms} SMs), Triton {triton.__version__}, shapes '{args.shapes}'. "
          "floor µs* = modeled: max(FLOPs / peak, bytes / bandwidth), published figures, not a measurement.")
    print(format_table(_unique_rows(rows)))
    failures = gate_failures(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": target.arch, "gpu": target.gpu, "triton": triton.__version__, "shapes": args.shapes,
                       "rows": rows, "gate_failures": failures}, f, indent=1, default=str)
    print(f"compile gate: {'pass' if not failures else f'{len(failures)} failures'}")
    for failure in sorted(set(failures))[:50]:
        print("  " + failure)
    return 1 if (args.gate and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
