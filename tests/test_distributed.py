"""Two gloo ranks step like one process on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgit_fast import FusedMGiT, ViT

STEPS, BATCH = 3, 8


def build():
    """No qkv bias: the key bias has an exactly-zero gradient, whose rounding noise (which
    differs between one all-reduced sum and one big batch) Adam would turn into lr-sized steps."""
    torch.manual_seed(0)
    primary = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                  attention="lsa", qkv_bias=False)
    return FusedMGiT(primary, aux_seed=1, backend="torch", js_weight=0.3, max_grad_norm=1.0, pairing="all")


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 5, (BATCH,), generator=g)) for _ in range(STEPS)]


def worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mgit = build()
        share = BATCH // world
        for x, y in batches():
            stats = mgit.training_step(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
        if rank == 0:
            torch.save({"params": [p.detach() for p in mgit.parameters()], "stats": stats}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_full_batch(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    ranks = torch.load(out_file)

    single = build()
    for x, y in batches():
        stats = single.training_step(x, y)
    for name, value in stats.items():
        torch.testing.assert_close(ranks["stats"][name].float(), value.float(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(single.named_parameters(), ranks["params"]):
        torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6, msg=name)
