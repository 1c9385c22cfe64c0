"""MGiTModule under the installed Lightning release, on the CPU: it steps as FusedMGiT does,
logs the statistics, resumes from a checkpoint, schedules the learning rate, and two DDP
processes step like one process on the doubled batch."""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

L = pytest.importorskip("lightning", reason="the lightning extra (installed with the test extra)")
import torch
from conftest import assert_rel_close
from torch.utils.data import DataLoader, TensorDataset

from mgit_fast import FusedMGiT, ViT
from mgit_fast.data import load_dataset
from mgit_fast.integrations.lightning import MGiTModule

ROOT = Path(__file__).resolve().parents[1]
STATS = ("loss", "ce_primary", "ce_auxiliary", "js", "mix", "skipped")


def vit():
    torch.manual_seed(0)
    return ViT(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def loaders(images=128, batch_size=32):
    data = load_dataset("digits")
    train = TensorDataset(data.x_train[:images], data.y_train[:images])
    return DataLoader(train, batch_size=batch_size), DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=150)


def trainer(**options):
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     logger=False, enable_checkpointing=False, **options)


def parameters(module):
    return [p.detach().clone() for p in module.parameters()]


def test_steps_as_fused_mgit_and_logs_the_statistics():
    train, val = loaders()
    module = MGiTModule(vit(), aux_seed=1, lr=3e-3)
    mgit = FusedMGiT(vit(), aux_seed=1, lr=3e-3)
    run = trainer(max_epochs=2)
    run.fit(module, train, val)
    for _ in range(2):
        for x, y in train:
            last = mgit.training_step(x, y)
    assert run.global_step == 8 and int(module.mgit.optimizer.step_count) == 8
    for got, expected in zip(parameters(module.mgit), parameters(mgit)):
        assert torch.equal(got, expected)  # the same operations in the same order
    metrics = run.callback_metrics
    for name in STATS:
        assert torch.equal(metrics[f"train/{name}_step"], last[name].float()), name
        assert f"train/{name}_epoch" in metrics
    with torch.no_grad():
        x, y = val.dataset.tensors
        expected = (mgit.primary(x).argmax(-1) == y).float().mean() * 100
    assert float(metrics["val/accuracy"]) == pytest.approx(float(expected), abs=1e-4)


def test_a_checkpoint_resumes_as_the_uninterrupted_run(tmp_path):
    """Both models, the optimizer (moments, step count) and the scheduler come back: the next
    epoch equals the uninterrupted run's bit for bit."""
    train, _ = loaders()
    schedule = dict(aux_seed=1, lr=3e-3, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5))
    whole = MGiTModule(vit(), **schedule)
    trainer(max_epochs=2).fit(whole, train)
    first = MGiTModule(vit(), **schedule)
    run = trainer(max_epochs=1)
    run.fit(first, train)
    run.save_checkpoint(tmp_path / "one.ckpt")
    resumed = MGiTModule(vit(), **schedule)
    trainer(max_epochs=2).fit(resumed, train, ckpt_path=tmp_path / "one.ckpt")
    assert int(resumed.mgit.optimizer.step_count) == 8
    assert resumed.mgit.optimizer.param_groups[0]["lr"] == whole.mgit.optimizer.param_groups[0]["lr"] == 3e-3 / 4
    for got, expected in zip(parameters(resumed.mgit), parameters(whole.mgit)):
        assert torch.equal(got, expected)


def test_an_epoch_scheduler_steps_once_per_epoch():
    train, _ = loaders()
    module = MGiTModule(vit(), aux_seed=1, lr=1e-3, scheduler=lambda o: {
        "scheduler": torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.1 ** epoch), "interval": "epoch"})
    trainer(max_epochs=2).fit(module, train)
    assert [g["lr"] for g in module.mgit.optimizer.param_groups] == pytest.approx([1e-5, 1e-5])


def test_what_it_does_not_support_is_refused():
    with pytest.raises(ValueError, match="graph"):
        MGiTModule(vit(), graph=True)
    with pytest.raises(TypeError, match="scheduler"):
        MGiTModule(vit(), scheduler="cosine")
    module = MGiTModule(vit())
    before = parameters(module)
    with pytest.raises(ValueError, match="amp_dtype"):
        trainer(max_epochs=1, precision="bf16-mixed").fit(module, loaders()[0])
    assert all(torch.equal(a, b) for a, b in zip(parameters(module), before))


@pytest.mark.slow
def test_two_ddp_processes_step_like_one_process_on_the_doubled_batch(tmp_path):
    """Trainer(strategy="ddp", devices=2) on the CPU (gloo), launched as a user would run a
    script: each rank takes every other image (a DistributedSampler without shuffling; Lightning's
    own shuffles), 32 per step."""
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, lightning as L
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_lightning import MGiTModule, loaders, parameters, vit
        devices, batch = int(sys.argv[1]), int(sys.argv[2])
        torch.set_num_threads(1)
        module = MGiTModule(vit(), aux_seed=1, lr=3e-3)
        train, _ = loaders(batch_size=batch)
        run = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False, use_distributed_sampler=False)
        if devices > 1:
            from torch.utils.data import DataLoader, DistributedSampler
            train = DataLoader(train.dataset, batch_size=batch, sampler=DistributedSampler(
                train.dataset, num_replicas=devices, rank=run.global_rank, shuffle=False))
        run.fit(module, train)
        if run.global_rank == 0:
            torch.save([parameters(module.mgit), float(run.callback_metrics["train/ce_primary_step"])], sys.argv[3])
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "LOCAL_RANK", "WORLD_SIZE"))}
    for devices, batch, out in ((2, 32, "two.pt"), (1, 64, "one.pt")):
        done = subprocess.run([sys.executable, str(script), str(devices), str(batch), str(tmp_path / out)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    (two, ce_two), (one, ce_one) = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert ce_two == pytest.approx(ce_one, rel=1e-5)
    # over all parameters together: Adam's normalisation turns the rounding noise of a gradient
    # that is zero in exact arithmetic (the key bias: softmax ignores it) into lr-sized steps
    assert_rel_close(torch.cat([a.flatten() for a in two]), torch.cat([b.flatten() for b in one]), 1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(one, parameters(MGiTModule(vit(), aux_seed=1).mgit)))
