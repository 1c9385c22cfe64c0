"""The whole MGiT step: both forwards under bf16 autocast, the loss, one backward, the update.

Setups: the built-in ``ViT`` and timm's ``VisionTransformer`` (when timm is installed), each
with a one-block auxiliary. Ours: ``FusedMGiT(graph=True)`` (Triton kernels, the step replayed
from one CUDA graph; eager on the CPU). Peers, same inputs, same run:

- ``eager``: plain-PyTorch MGiT (``backend="torch"``; a timm model keeps its own SDPA attention);
- ``compiled``: ``torch.compile`` of that step, the fastest of the modes in
  ``MGIT_BENCH_COMPILE_MODES`` (default ``default,reduce-overhead``; the winner is recorded in
  ``compiled_mode``, each mode's time in ``compiled_<mode>_ms``, its compile time in
  ``compiled_<mode>_compile_s``);
- ``fused_no_graph``: ours without the CUDA graph (what the graph saves);
- ``fused_overlap``: ours with the auxiliary on a second stream;
- ``mgit_compiled`` ("MGiT step, compiled"): ours with ``compile=True`` (both forwards and the
  loss through torch.compile, Inductor's default mode, our kernels as custom ops), in the CUDA
  graph too; its first step's seconds (compiling) in ``mgit_compiled_compile_s``, the graphs it
  compiled in ``mgit_compiled_graphs``; ``mgit_compiled_over_single_compiled`` (goal ≤ 1.0) and
  ``eager_over_mgit_compiled`` (goal ≥ 4) are wall-time ratios;
- ``single_eager`` / ``single_compiled`` (timm setups; "single model, compiled"): the primary
  alone, one ordinary training step (cross-entropy, ``AdamW(fused=True)``), eager and compiled:
  what MGiT costs over it.

Also recorded: images/s, MFU against the measured bf16 matmul peak, the step's own memory
(``step_memory_mib``, measured without the graph, whose pool is reserved at capture) against
the eager reference's (``memory_vs_eager``).

FLOPs: per block, ``2·tokens·(4·width² + 2·width·mlp)`` for the linear layers plus
``4·tokens²·width`` for attention; training is three times the forward.
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F
from benchutil import DEVICE, compiled, measure, pick, run, step_memory_mib

from mgit_fast import FusedMGiT, ViT

VIT_S4 = dict(img_size=32, patch_size=4, embed_dim=384, num_heads=6, depth=12, num_classes=100)
VIT_B16 = dict(img_size=224, patch_size=16, embed_dim=768, num_heads=12, depth=12, num_classes=1000)
TINY = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=2, num_classes=10)
SETUPS = pick(
    {
        "vit_s/4@32+1blk": ("builtin", VIT_S4, 256),
        "timm_vit_s/4@32+1blk": ("timm", VIT_S4, 256),
        "vit_b/16@224+1blk": ("builtin", VIT_B16, 64),
    },
    {"tiny+1blk": ("builtin", TINY, 4), "timm_tiny+1blk": ("timm", TINY, 4)},
)
COMPILE_MODES = pick(os.environ.get("MGIT_BENCH_COMPILE_MODES", "default,reduce-overhead").split(","), ["default"])


def train_flops(cfg, depth, batch):
    tokens = (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1
    width = cfg["embed_dim"]
    per_block = 2 * tokens * (4 * width * width + 2 * width * int(width * 2.0)) + 4 * tokens * tokens * width
    return 3 * batch * depth * per_block


def build(kind, cfg):
    if kind == "builtin":
        return ViT(**cfg).to(DEVICE)
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**cfg, mlp_ratio=2.0).to(DEVICE)  # the built-in ViT's MLP width


def single_step(model, amp):
    """One ordinary training step of ``model`` alone."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=amp):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@pytest.mark.parametrize("name", list(SETUPS))
def test_step(benchmark, gpu, name):
    kind, cfg, batch = SETUPS[name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device=DEVICE)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=DEVICE)

    def make(backend, **options):
        torch.manual_seed(0)
        if kind == "timm" and backend == "torch":
            options["fuse_attention"] = False  # plain PyTorch: timm's own attention
        return FusedMGiT(build(kind, cfg), aux_seed=1, backend=backend, amp_dtype=torch.bfloat16, **options)

    on_gpu = DEVICE == "cuda"
    ours = make("triton", graph=on_gpu)
    fused, overlapped, eager = make("triton"), make("triton", overlap=True, graph=on_gpu), make("torch")

    def fastest_compile(fn):
        """(the fastest compiled version of fn, its mode, {mode: (ms, compile s)})."""
        results = {}
        for mode in COMPILE_MODES:
            step = compiled(fn, mode=mode)
            start = time.perf_counter()
            step(x, y)
            seconds = time.perf_counter() - start
            results[mode] = (measure(lambda: step(x, y))["wall_ms"], seconds, step)
        best = min(results, key=lambda m: results[m][0])
        return results[best][2], best, {m: r[:2] for m, r in results.items()}

    compiled_step, best_mode, modes = fastest_compile(make("torch").training_step)
    mgit_compiled = make("triton", graph=on_gpu, compile=True)
    start = time.perf_counter()
    mgit_compiled.training_step(x, y)  # compiles (a dry run too: Inductor on the CPU)
    mgit_compiled_s = time.perf_counter() - start
    peers = {
        "eager": lambda: eager.training_step(x, y),
        "compiled": lambda: compiled_step(x, y),
        "fused_no_graph": lambda: fused.training_step(x, y),
        "fused_overlap": lambda: overlapped.training_step(x, y),
        "mgit_compiled": lambda: mgit_compiled.training_step(x, y),
    }
    if kind == "timm":
        torch.manual_seed(0)
        peers["single_eager"] = (lambda step: lambda: step(x, y))(single_step(build(kind, cfg), torch.bfloat16))
        torch.manual_seed(0)
        single, _, _ = fastest_compile(single_step(build(kind, cfg), torch.bfloat16))
        peers["single_compiled"] = lambda: single(x, y)

    run(
        benchmark, gpu, lambda: ours.training_step(x, y), peers,
        flops=train_flops(cfg, cfg["depth"] + 1, batch), nbytes=0, setup=name, batch=batch,
    )
    info = benchmark.extra_info
    info["compiled_mode"] = best_mode
    for mode, (ms, seconds) in modes.items():
        info[f"compiled_{mode}_ms"], info[f"compiled_{mode}_compile_s"] = ms, seconds
    info["mgit_compiled_compile_s"], info["mgit_compiled_graphs"] = mgit_compiled_s, mgit_compiled.compiles
    if info.get("mgit_compiled_ms") and info.get("single_compiled_ms"):
        info["mgit_compiled_over_single_compiled"] = info["mgit_compiled_ms"] / info["single_compiled_ms"]
    if info.get("mgit_compiled_ms") and info.get("eager_ms"):
        info["eager_over_mgit_compiled"] = info["eager_ms"] / info["mgit_compiled_ms"]
    info["images_per_s"] = batch / info["median_ms"] * 1e3
    info["mfu"] = info["tflops"] / gpu.matmul_tflops
    info["step_memory_mib"] = step_memory_mib(lambda: fused.training_step(x, y))
    if info["step_memory_mib"] is not None:
        info["memory_vs_eager"] = info["step_memory_mib"] / info["eager_step_memory_mib"]
