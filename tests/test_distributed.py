"""Two gloo ranks step like one process on the whole batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgit_fast import FusedMGiT, ViT

STEPS, BATCH = 3, 8


def build(compile=False):
    """No qkv bias: the key bias has an exactly-zero gradient, whose rounding noise (which
    differs between one all-reduced sum and one big batch) Adam would turn into lr-sized steps."""
    torch.manual_seed(0)
    primary = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                  attention="lsa", qkv_bias=False)
    return FusedMGiT(primary, aux_seed=1, backend="torch", js_weight=0.3, max_grad_norm=1.0, pairing="all",
                     compile=compile)


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 5, (BATCH,), generator=g)) for _ in range(STEPS)]


def worker(rank, world, init_file, out_file, compile=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with pytest.raises(ValueError, match="graph=True"):
            FusedMGiT(ViT(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=1, num_heads=2),
                      graph=True)
        mgit = build(compile)
        share = BATCH // world
        for x, y in batches():
            stats = mgit.training_step(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
        if rank == 0:
            torch.save({"params": [p.detach() for p in mgit.parameters()], "stats": stats, "compiles": mgit.compiles},
                       out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True])
def test_two_ranks_equal_one_process_on_the_full_batch(tmp_path, compile):
    """compile=True: each DDP-wrapped model compiles as one graph (no break inside a model)."""
    out_file = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out_file), compile), nprocs=2, join=True)
    ranks = torch.load(out_file)
    assert ranks["compiles"] == (2 if compile else 0)

    single = build()
    for x, y in batches():
        stats = single.training_step(x, y)
    for name, value in stats.items():
        torch.testing.assert_close(ranks["stats"][name].float(), value.float(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(single.named_parameters(), ranks["params"]):
        torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_main_job_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m mgit_fast train`: every rank trains on half of each
    global batch; both arms' training losses follow the single process's, and rank 0 alone
    reports and writes the files."""
    args = ["train", "--dataset", "synthetic", "--epochs", "3", "--seeds", "1", "--depth", "2", "--embed-dim", "32",
            "--num-heads", "2", "--batch-size", "64", "--attention", "lsa", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mgit_fast"]
    two = subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("MGiT primary") == 1  # one table, from rank 0
    one = subprocess.run([sys.executable, "-m", "mgit_fast"] + args + ["--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks, single = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("two", "one"))
    assert ranks["config"]["ranks"] == 2 and single["config"]["ranks"] == 1
    for arm in ("baseline", "mgit"):
        for key, values in single[arm]["history"][0].items():
            if "accuracy" not in key:
                assert ranks[arm]["history"][0][key] == pytest.approx(values, rel=1e-4), (arm, key)
    assert single["mgit"]["history"][0]["loss"][-1] < single["mgit"]["history"][0]["loss"][0]  # it trained


def test_each_rank_takes_its_own_equal_share():
    from mgit_fast.train import _Ranks

    shares = []
    for rank in range(3):
        ranks = object.__new__(_Ranks)
        ranks.rank, ranks.world = rank, 3
        shares.append(torch.arange(8)[ranks.part(8)].tolist())
    assert shares == [[0, 1], [2, 3], [4, 5]]  # the last 2 images of a short batch are dropped
