"""The whole MGiT step (both forwards under bf16 autocast, loss, backward, update) against the
eager reference step and torch.compile of it (mode "max-autotune-no-cudagraphs"), reporting
images/s, MFU against the measured bf16 matmul peak, peak memory and energy per step.

FLOPs: a ViT forward is about 2 · parameters · tokens per image plus attention's
4 · tokens² · width per block; training is three times the forward.
"""
import pytest
import torch
from benchutil import run

from mgit_fast import FusedMGiT, ViT

SETUPS = {
    "vit_s/4@32+1blk": (dict(img_size=32, patch_size=4, embed_dim=384, num_heads=6, depth=12, num_classes=100), 256),
    "vit_b/16@224+1blk": (dict(img_size=224, patch_size=16, embed_dim=768, num_heads=12, depth=12, num_classes=1000), 64),
}


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

    def make(backend):
        torch.manual_seed(0)
        return FusedMGiT(ViT(**cfg).cuda(), aux_seed=1, backend=backend, amp_dtype=torch.bfloat16)

    ours, eager, compiled = make("triton"), make("torch"), make("torch")
    compiled_step = torch.compile(compiled.training_step, mode="max-autotune-no-cudagraphs")
    flops = train_flops(cfg, cfg["depth"] + 1, batch)
    run(
        benchmark, gpu, lambda: ours.training_step(x, y),
        {"eager": lambda: eager.training_step(x, y), "compiled": lambda: compiled_step(x, y)},
        flops=flops, nbytes=0, setup=name, batch=batch,
    )
    info = benchmark.extra_info
    info["images_per_s"] = batch / info["median_ms"] * 1e3
    info["mfu"] = info["tflops"] / gpu.matmul_tflops
