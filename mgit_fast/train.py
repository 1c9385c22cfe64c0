"""The main job: MGiT against the same primary trained alone, over several seeds.

Fairness, per seed: the baseline and MGiT's primary start from identical weights, see
identical batches in identical order with identical augmentation, and have the same global
RNG state before every step (drop path); the auxiliary is initialised from its own seed.
With ``js_weight=0, mix=0`` MGiT's primary is therefore the baseline, step for step.

Under ``torchrun --nproc_per_node=K`` every rank draws the same global batch and trains on its
K-th share (both models wrapped in DistributedDataParallel), so K ranks step like one process:
each batch is cut to a multiple of K (only a short last batch loses up to K − 1 images).
Rank 0 reports and writes the files.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from . import reference
from .data import load_dataset, random_shift
from .mgit import FusedMGiT
from .models import ViT, make_auxiliary
from .optim import MultiGradientAdamW

AUXILIARY_SEED_OFFSET = 1_000_003  # the auxiliary's initialisation: a stream of its own
STEP_SEED_STRIDE = 1_000_000  # per-step global seeds: seed·stride + step


@dataclass
class TrainConfig:
    """Everything a run depends on (written to ``metrics.json``)."""

    dataset: str = "digits"
    epochs: int = 20
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    max_shift: int = 1
    # the ViT (8×8 digits: 4×4 patches, 5 tokens)
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    attention: str = "standard"
    spt: bool = False
    drop_path: float = 0.0
    # MGiT
    aux_depth: int = 1
    js_weight: float = 0.1
    temperature: float = 1.0
    mix: Union[str, float] = "adaptive"
    mix_max: float = 0.5
    pairing: str = "head"
    average: float = 0.0
    max_grad_norm: Optional[float] = None
    baseline: bool = True
    device: str = "auto"
    graph: bool = False  # CUDA graphs for the MGiT arm (FusedMGiT(graph=True))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Ranks:
    """This process's place among the ranks ``torchrun`` started (one rank without it).

    Opens the process group when ``WORLD_SIZE`` > 1 and none is open (NCCL for CUDA, gloo for
    the CPU), and closes what it opened."""

    def __init__(self, device: torch.device):
        distributed = torch.distributed
        self.opened = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_initialized():
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.opened = True
        live = distributed.is_available() and distributed.is_initialized()
        self.rank = distributed.get_rank() if live else 0
        self.world = distributed.get_world_size() if live else 1
        self.device = device

    def part(self, batch: int) -> slice:
        """This rank's equal part of a global batch of ``batch`` items (cut to a multiple of the
        ranks), as a slice: indexing with it makes views, not copies."""
        per_rank = batch // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def close(self) -> None:
        if self.opened:
            torch.distributed.destroy_process_group()


def _cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class BaselineStep:
    """The primary trained alone: label-smoothed cross-entropy and AdamW with the same
    weight-decay rule and update code as MGiT's primary."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model = model
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.label_smoothing = cfg.label_smoothing
        self.optimizer = MultiGradientAdamW(model, None, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def training_step(self, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = reference.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        loss = loss.detach()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):  # report the global batch's
            torch.distributed.all_reduce(loss)
            loss = loss / torch.distributed.get_world_size()
        return {"loss": loss, "ce_primary": loss}


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct / len(x)


def _run_arm(
    trainer,
    evaluate: Dict[str, nn.Module],
    data,
    cfg: TrainConfig,
    seed: int,
    ranks: _Ranks,
    progress,
) -> Dict[str, List[float]]:
    """Trains one arm of one seed; returns per-epoch histories (training means, accuracies)."""
    device = ranks.device
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, _cosine(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch)
    )
    batches = torch.Generator().manual_seed(seed)  # order and augmentation, shared by both arms
    history: Dict[str, List[float]] = {}
    step = 0
    for _ in range(cfg.epochs):
        for m in evaluate.values():
            m.train()
        sums: Dict[str, Tensor] = {}
        order = torch.randperm(len(x_train), generator=batches).to(device)
        for start in range(0, len(x_train), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            x = random_shift(x_train[index], cfg.max_shift, batches)  # every rank: the global batch
            mine = ranks.part(len(index))
            if mine.stop == mine.start:
                continue
            torch.manual_seed(seed * STEP_SEED_STRIDE + step)  # the model's own randomness
            metrics = trainer.training_step(x[mine], y_train[index[mine]])
            scheduler.step()
            step += 1
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.float()
        for key, total in sums.items():  # one host synchronisation per epoch
            history.setdefault(key, []).append(float(total) / steps_per_epoch)
        for name, model in evaluate.items():
            history.setdefault(name, []).append(accuracy(model, x_test, y_test))
        progress.update(1)
    return history


def _summary(values: List[float]) -> Dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


def train(cfg: TrainConfig, out_dir: Optional[Union[str, Path]] = None, *, show_progress: bool = True) -> dict:
    """Runs both arms over ``cfg.seeds``; writes ``metrics.json`` and ``training.png`` to
    ``out_dir`` when given (rank 0), and returns the metrics dict (on every rank)."""
    if importlib.util.find_spec("tqdm") is None:  # pragma: no cover - depends on the install
        raise ImportError("the main job needs tqdm: pip install 'mgit-fast[train]'")
    ranks = _Ranks(_device(cfg.device))
    try:
        return _train(cfg, out_dir, show_progress and ranks.rank == 0, ranks)
    finally:
        ranks.close()


def _train(cfg: TrainConfig, out_dir, show_progress: bool, ranks: _Ranks) -> dict:
    from tqdm.auto import tqdm

    device = ranks.device
    data = load_dataset(cfg.dataset)
    results = {
        "baseline": {"test_accuracy": [], "history": []},
        "mgit": {"test_accuracy": [], "aux_test_accuracy": [], "history": []},
    }
    arms = 2 if cfg.baseline else 1
    start = time.perf_counter()
    with tqdm(total=arms * cfg.epochs * len(cfg.seeds), desc="mgit-fast train", disable=not show_progress) as bar:
        for seed in cfg.seeds:
            torch.manual_seed(seed)
            initial = ViT(
                img_size=data.x_train.shape[-1],
                patch_size=cfg.patch_size,
                in_chans=data.x_train.shape[1],
                num_classes=data.num_classes,
                embed_dim=cfg.embed_dim,
                depth=cfg.depth,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                attention=cfg.attention,
                spt=cfg.spt,
                drop_path=cfg.drop_path,
            ).to(device)
            if cfg.baseline:
                bar.set_postfix(seed=seed, arm="baseline")
                model = copy.deepcopy(initial)
                history = _run_arm(BaselineStep(model, cfg), {"test_accuracy": model}, data, cfg, seed, ranks, bar)
                results["baseline"]["test_accuracy"].append(history["test_accuracy"][-1])
                results["baseline"]["history"].append(history)

            bar.set_postfix(seed=seed, arm="mgit")
            primary = copy.deepcopy(initial)
            auxiliary = make_auxiliary(primary, cfg.aux_depth, seed=seed + AUXILIARY_SEED_OFFSET)
            mgit = FusedMGiT(
                primary,
                auxiliary,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                label_smoothing=cfg.label_smoothing,
                temperature=cfg.temperature,
                js_weight=cfg.js_weight,
                pairing=cfg.pairing,
                mix=cfg.mix,
                mix_max=cfg.mix_max,
                average=cfg.average,
                max_grad_norm=cfg.max_grad_norm,
                graph=cfg.graph,
            )
            history = _run_arm(
                mgit, {"test_accuracy": primary, "aux_test_accuracy": auxiliary}, data, cfg, seed, ranks, bar
            )
            results["mgit"]["test_accuracy"].append(history["test_accuracy"][-1])
            results["mgit"]["aux_test_accuracy"].append(history["aux_test_accuracy"][-1])
            results["mgit"]["history"].append(history)

    for arm in results.values():
        for key in [k for k in arm if k.endswith("accuracy")]:
            arm[key.replace("accuracy", "summary")] = _summary(arm[key]) if arm[key] else None
    results["config"] = dataclasses.asdict(cfg)
    results["config"].update(
        device=str(device),
        ranks=ranks.world,
        train_images=len(data.x_train),
        test_images=len(data.x_test),
        torch=torch.__version__,
    )
    results["seconds"] = time.perf_counter() - start
    if out_dir is not None and ranks.rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        plot(results, out / "training.png")
    return results


def format_table(results: dict) -> str:
    """The closing table: mean ± std per arm and the per-seed accuracies, in percent."""
    seeds = results["config"]["seeds"]
    rows = [("arm", "test accuracy (%)", "per seed " + ", ".join(str(s) for s in seeds))]

    def row(name, values):
        s = _summary(values)
        return (name, f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}", " ".join(f"{100 * v:.2f}" for v in values))

    if results["baseline"]["test_accuracy"]:
        rows.append(row("baseline (primary alone)", results["baseline"]["test_accuracy"]))
    rows.append(row("MGiT primary", results["mgit"]["test_accuracy"]))
    rows.append(row("MGiT auxiliary", results["mgit"]["aux_test_accuracy"]))
    if results["baseline"]["test_accuracy"]:
        gains = [m - b for m, b in zip(results["mgit"]["test_accuracy"], results["baseline"]["test_accuracy"])]
        rows.append(row("MGiT − baseline (paired)", gains))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Loss, test accuracy, JS and μ per epoch (mean over seeds) for both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(histories, key):
        curves = [h[key] for h in histories if key in h]
        return torch.tensor(curves, dtype=torch.float64).mean(0).tolist() if curves else None

    panels = [
        ("ce_primary", "primary's training cross-entropy"),
        ("test_accuracy", "test accuracy"),
        ("js", "JS divergence (training)"),
        ("mix", "mixing weight μ"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for arm, label in (("baseline", "baseline"), ("mgit", "MGiT primary" if key in ("ce_primary", "test_accuracy") else "MGiT")):
            curve = mean_curve(results[arm]["history"], key)
            if curve is not None:
                ax.plot(range(1, len(curve) + 1), curve, label=label)
        if key == "test_accuracy":
            curve = mean_curve(results["mgit"]["history"], "aux_test_accuracy")
            if curve is not None:
                ax.plot(range(1, len(curve) + 1), curve, label="MGiT auxiliary", linestyle="--")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['config']['dataset']}: mean over seeds {results['config']['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
