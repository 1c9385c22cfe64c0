"""The whole MGiT step: both forwards under bf16 autocast, the loss, one backward, the update.

Ours: ``FusedMGiT(graph=True)`` (Triton kernels, the step replayed from one CUDA graph).
Peers, same inputs, same run:

- ``eager``: the reference step (``backend="torch"``), eager PyTorch;
- ``compiled``: ``torch.compile`` of the reference step, the fastest of the modes in
  ``MGIT_BENCH_COMPILE_MODES`` (default ``default,reduce-overhead``; the winner is recorded in
  ``compiled_mode``, each mode's time in ``compiled_<mode>_ms``);
- ``fused_no_graph``: ours without the CUDA graph (what the graph saves);
- ``fused_overlap``: ours with the auxiliary on a second stream (kept only if it wins).

Also recorded: images/s, MFU against the measured bf16 matmul peak, the step's own memory
(``step_memory_mib``, measured without the graph, whose pool is reserved at capture) against
the eager reference's (``memory_vs_eager``), and NVML energy per step.

FLOPs: per block, ``2·tokens·(4·width² + 2·width·mlp)`` for the linear layers plus
``4·tokens²·width`` for attention; training is three times the forward.
"""
import os

import pytest
import torch
from benchutil import median_ms, run, step_memory_mib

from mgit_fast import FusedMGiT, ViT

SETUPS = {
    "vit_s/4@32+1blk": (dict(img_size=32, patch_size=4, embed_dim=384, num_heads=6, depth=12, num_classes=100), 256),
    "vit_b/16@224+1blk": (dict(img_size=224, patch_size=16, embed_dim=768, num_heads=12, depth=12, num_classes=1000), 64),
}
COMPILE_MODES = os.environ.get("MGIT_BENCH_COMPILE_MODES", "default,reduce-overhead").split(",")


def train_flops(cfg, depth, batch):
    tokens = (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1
    width = cfg["embed_dim"]
    per_block = 2 * tokens * (4 * width * width + 2 * width * int(width * 2.0)) + 4 * tokens * tokens * width
    return 3 * batch * depth * per_block


@pytest.mark.parametrize("name", list(SETUPS))
def test_step(benchmark, gpu, name):
    cfg, batch = SETUPS[name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device="cuda")
    y = torch.randint(0, cfg["num_classes"], (batch,), device="cuda")

    def make(backend, **options):
        torch.manual_seed(0)
        return FusedMGiT(ViT(**cfg).cuda(), aux_seed=1, backend=backend, amp_dtype=torch.bfloat16, **options)

    ours = make("triton", graph=True)
    fused, overlapped, eager = make("triton"), make("triton", overlap=True, graph=True), make("torch")

    compiled_ms = {}
    for mode in COMPILE_MODES:
        step = torch.compile(make("torch").training_step, mode=mode)
        compiled_ms[mode] = (median_ms(lambda: step(x, y)), step)
    best_mode = min(compiled_ms, key=lambda m: compiled_ms[m][0])
    compiled_step = compiled_ms[best_mode][1]

    run(
        benchmark, gpu, lambda: ours.training_step(x, y),
        {
            "eager": lambda: eager.training_step(x, y),
            "compiled": lambda: compiled_step(x, y),
            "fused_no_graph": lambda: fused.training_step(x, y),
            "fused_overlap": lambda: overlapped.training_step(x, y),
        },
        flops=train_flops(cfg, cfg["depth"] + 1, batch), nbytes=0, setup=name, batch=batch,
    )
    info = benchmark.extra_info
    info["compiled_mode"] = best_mode
    info.update({f"compiled_{mode}_ms": ms for mode, (ms, _) in compiled_ms.items()})
    info["images_per_s"] = batch / info["median_ms"] * 1e3
    info["mfu"] = info["tflops"] / gpu.matmul_tflops
    info["step_memory_mib"] = step_memory_mib(lambda: fused.training_step(x, y))
    info["memory_vs_eager"] = info["step_memory_mib"] / info["eager_step_memory_mib"]
