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
import platform
import subprocess
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from . import reference
from .data import draw_shifts, load_dataset, per_class_subset, shift_images
from .mgit import FusedMGiT
from .models import ViT, make_auxiliary
from .optim import MultiGradientAdamW

AUXILIARY_SEED_OFFSET = 1_000_003  # the auxiliary's initialisation: a stream of its own
STEP_SEED_STRIDE = 1_000_000  # per-step global seeds: seed·stride + step


@dataclass
class TrainConfig:
    """Everything a run depends on (written to ``metrics.json``)."""

    dataset: str = "digits"
    data_dir: Optional[str] = None  # cifar10, cifar100, svhn files (default ~/.cache/mgit_fast/data)
    train_per_class: Optional[int] = None  # few-shot: this many training images per class, drawn per seed
    model: str = "vit"  # the built-in ViT, or "timm:NAME" (a timm model at the data's image size)
    epochs: int = 20
    eval_every: int = 1  # test accuracy after every k-th epoch and after the last
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
    mask_rank: Optional[int] = None  # IBiT (attention="ibit"): the mask's rank, None for a full mask
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
    compile: bool = False  # torch.compile for the MGiT arm (FusedMGiT(compile=True))


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
    """Top-1 accuracy in percent (the unit of every accuracy the main job reports)."""
    was_training = model.training
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum() for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return 100.0 * int(correct) / len(x)  # one host synchronisation


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
    for epoch in range(1, cfg.epochs + 1):
        for m in evaluate.values():
            m.train()
        sums: Dict[str, Tensor] = {}
        order, shifts = _epoch_draws(len(x_train), cfg.max_shift, batches, device)
        for start in range(0, len(x_train), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            shift = shifts[2 * start : 2 * (start + len(index))]
            x = shift_images(x_train[index], shift, cfg.max_shift)  # every rank: the global batch
            mine = ranks.part(len(index))
            if mine.stop == mine.start:
                continue
            torch.manual_seed(seed * STEP_SEED_STRIDE + step)  # the model's own randomness
            metrics = trainer.training_step(x[mine], y_train[index[mine]])
            scheduler.step()
            step += 1
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.float()
        if sums:  # one host synchronisation per epoch
            means = torch.stack(list(sums.values())).tolist()
            for key, total in zip(sums, means):
                history.setdefault(key, []).append(total / steps_per_epoch)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:  # evaluation draws no random numbers
            history.setdefault("eval_epochs", []).append(epoch)
            for name, model in evaluate.items():
                history.setdefault(name, []).append(accuracy(model, x_test, y_test))
        progress.update(1)
    return history


def _epoch_draws(images: int, max_shift: int, generator: torch.Generator, device: torch.device):
    """An epoch's image order and shifts (``draw_shifts``), drawn on the CPU from ``generator``
    in the order per-batch draws would take them, and copied to ``device`` in one transfer
    that does not block the host."""
    order = torch.randperm(images, generator=generator)
    shifts = draw_shifts(images, max_shift, generator)
    both = torch.cat([order, shifts])
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    else:
        both = both.to(device)
    return both[:images], both[images:]


def _summary(values: List[float]) -> Dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


def paired_statistics(treated: List[float], control: List[float]) -> Dict[str, object]:
    """Per-seed differences ``treated − control`` with their mean, sample std, 95 % confidence
    interval of the mean (Student t, n − 1 degrees of freedom) and the two-sided paired t-test
    p-value; interval and p are None below two seeds."""
    from scipy import stats

    diffs = [a - b for a, b in zip(treated, control)]
    n = len(diffs)
    summary = _summary(diffs) if diffs else {"mean": float("nan"), "std": 0.0}
    out: Dict[str, object] = {"differences": diffs, "n": n, **summary, "ci95": None, "t": None, "p_value": None}
    if n >= 2:
        sem = summary["std"] / math.sqrt(n)
        half = float(stats.t.ppf(0.975, n - 1)) * sem
        out["ci95"] = [summary["mean"] - half, summary["mean"] + half]
        if sem > 0:
            t = summary["mean"] / sem
            out["t"], out["p_value"] = t, float(2 * stats.t.sf(abs(t), n - 1))
        else:  # identical differences: no spread to test against
            out["p_value"] = 1.0 if summary["mean"] == 0 else 0.0
    return out


def build_model(cfg: TrainConfig, data) -> nn.Module:
    """The primary for ``data``'s image size, channels and classes: the built-in ViT from the
    config, or ``timm:NAME`` through ``timm.create_model`` (no pretrained weights)."""
    size, chans, classes = data.x_train.shape[-1], data.x_train.shape[1], data.num_classes
    if cfg.model.startswith("timm:"):
        import timm

        model = timm.create_model(cfg.model[5:], pretrained=False, img_size=size, in_chans=chans,
                                  num_classes=classes, patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path)
        if cfg.attention == "ibit":  # timm's attention → FusedAttention with an IBiT mask sized from the model
            from .patching import patch_vit

            patch_vit(model, variant="ibit", mask_rank=cfg.mask_rank)
        return model
    return ViT(
        img_size=size,
        patch_size=cfg.patch_size,
        in_chans=chans,
        num_classes=classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        attention=cfg.attention,
        spt=cfg.spt,
        drop_path=cfg.drop_path,
        mask_rank=cfg.mask_rank,
    )


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
    full = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    results = {
        "baseline": {"test_accuracy": [], "history": []},
        "mgit": {"test_accuracy": [], "aux_test_accuracy": [], "history": [], "compile_seconds": [], "compiles": []},
    }
    arms = 2 if cfg.baseline else 1
    saved = {}  # (arm, seed): what models/<arm>_seed<seed>.pt holds (CPU copies)
    shape = {"image": list(full.x_train.shape[1:]), "num_classes": full.num_classes}

    def save(arm, seed, primary, whole=None):
        state = {"primary": {k: v.detach().cpu().clone() for k, v in primary.state_dict().items()}, **shape}
        if whole is not None:
            state["mgit"] = _to_cpu(whole.state_dict())
        saved[arm, seed] = state

    start = time.perf_counter()
    with tqdm(total=arms * cfg.epochs * len(cfg.seeds), desc="mgit-fast train", disable=not show_progress) as bar:
        for seed in cfg.seeds:
            data = full
            if cfg.train_per_class is not None:  # few-shot: a per-class draw of its own for each seed
                chosen = per_class_subset(full.y_train, cfg.train_per_class, seed)
                data = full._replace(x_train=full.x_train[chosen], y_train=full.y_train[chosen])
            torch.manual_seed(seed)
            initial = build_model(cfg, data).to(device)
            if cfg.baseline:
                bar.set_postfix(seed=seed, arm="baseline")
                model = copy.deepcopy(initial)
                history = _run_arm(BaselineStep(model, cfg), {"test_accuracy": model}, data, cfg, seed, ranks, bar)
                results["baseline"]["test_accuracy"].append(history["test_accuracy"][-1])
                results["baseline"]["history"].append(history)
                save("baseline", seed, model)

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
                compile=cfg.compile,
            )
            history = _run_arm(
                mgit, {"test_accuracy": primary, "aux_test_accuracy": auxiliary}, data, cfg, seed, ranks, bar
            )
            results["mgit"]["test_accuracy"].append(history["test_accuracy"][-1])
            results["mgit"]["aux_test_accuracy"].append(history["aux_test_accuracy"][-1])
            results["mgit"]["history"].append(history)
            results["mgit"]["compile_seconds"].append(mgit.compile_seconds)  # None without compile
            results["mgit"]["compiles"].append(mgit.compiles)
            save("mgit", seed, primary, mgit)

    for arm in results.values():
        for key in [k for k in arm if k.endswith("accuracy")]:
            arm[key.replace("accuracy", "summary")] = _summary(arm[key]) if arm[key] else None
    if cfg.baseline:
        results["paired"] = {
            "mgit_minus_baseline": paired_statistics(results["mgit"]["test_accuracy"],
                                                     results["baseline"]["test_accuracy"]),
        }
    results["accuracy_unit"] = "%"
    results["config"] = dataclasses.asdict(cfg)
    results["config"].update(
        device=str(device),
        ranks=ranks.world,
        train_images=len(data.x_train),
        test_images=len(data.x_test),
        torch=torch.__version__,
        mgit_fast=_version(),
        torch_threads=torch.get_num_threads(),
        cpu=_cpu_name(),
        git_commit=_git_commit(),
    )
    results["seconds"] = time.perf_counter() - start
    if out_dir is not None and ranks.rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        plot(results, out / "training.png")
        (out / "models").mkdir(exist_ok=True)
        for (arm, seed), state in saved.items():
            torch.save(state, out / "models" / f"{arm}_seed{seed}.pt")
    return results


def load_trained(out_dir: Union[str, Path], arm: str = "mgit", seed: int = 0) -> nn.Module:
    """The primary that ``mgit-fast train --out OUT_DIR`` trained for ``arm`` ("mgit" or
    "baseline") and ``seed``, rebuilt from ``metrics.json``'s config and loaded from
    ``models/<arm>_seed<seed>.pt`` (on the CPU, in eval mode). That file also holds, for the
    MGiT arm, the whole ``FusedMGiT`` state (``"mgit"``: both models, the optimizer's moments
    and step) for ``FusedMGiT.load_state_dict`` to resume from."""
    out = Path(out_dir)
    path = out / "models" / f"{arm}_seed{seed}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (arm is 'mgit' or 'baseline'; the seeds run are in metrics.json)")
    config = json.loads((out / "metrics.json").read_text())["config"]
    cfg = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig) if f.name in config})
    state = torch.load(path, map_location="cpu", weights_only=True)
    shape = types.SimpleNamespace(x_train=torch.empty(1, *state["image"]), num_classes=state["num_classes"])
    model = build_model(cfg, shape)
    model.load_state_dict(state["primary"])
    return model.eval()


def _to_cpu(value):
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical)" if names else platform.processor() or "unknown"
    except OSError:
        return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    """The commit of the source tree this package runs from, when it is a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mgit-fast")
    except Exception:  # pragma: no cover - running from a source tree
        return "unknown"


def format_table(results: dict) -> str:
    """The closing table: mean ± std per arm and the per-seed accuracies (percent), then the
    paired MGiT − baseline statistics."""
    seeds = results["config"]["seeds"]
    rows = [("arm", "test accuracy (%)", "per seed " + ", ".join(str(s) for s in seeds))]

    def row(name, values):
        s = _summary(values)
        return (name, f"{s['mean']:.2f} ± {s['std']:.2f}", " ".join(f"{v:.2f}" for v in values))

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
    paired = results.get("paired", {}).get("mgit_minus_baseline")
    if paired and paired["ci95"] is not None:
        lo, hi = paired["ci95"]
        t = f"t = {paired['t']:.2f}, " if paired["t"] is not None else ""
        lines.append(f"paired MGiT − baseline over {paired['n']} seeds: {paired['mean']:+.2f} points, "
                     f"95 % CI [{lo:+.2f}, {hi:+.2f}], {t}p = {paired['p_value']:.3f} (two-sided paired t-test)")
    return "\n".join(lines)


ARM_COLORS = {"baseline": "tab:blue", "mgit": "tab:orange", "auxiliary": "tab:green"}  # the same in every panel


def plot(results: dict, path: Path) -> None:
    """Training cross-entropy, test accuracy, JS and μ per epoch for both arms: the mean over
    seeds as a line, the range over seeds as a band; each arm has one colour in every panel,
    and the accuracy axis spans the second half of training (where the arms differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(results, plt)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(results: dict, plt):
    """The figure ``plot`` saves."""

    def curves(histories, key):
        rows = [h[key] for h in histories if key in h]
        return torch.tensor(rows, dtype=torch.float64) if rows else None

    def draw(ax, values, label, color, epochs=None, **style):
        epochs = epochs or range(1, values.shape[1] + 1)
        ax.plot(epochs, values.mean(0).tolist(), label=label, color=color, **style)
        if values.shape[0] > 1:
            ax.fill_between(epochs, values.min(0).values.tolist(), values.max(0).values.tolist(),
                            color=color, alpha=0.2, linewidth=0)

    panels = [
        ("ce_primary", "primary's training cross-entropy", "cross-entropy (nats)"),
        ("test_accuracy", "test accuracy", "accuracy (%)"),
        ("js", "JS divergence (training)", "JS divergence (nats)"),
        ("mix", "mixing weight μ", "μ"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, title, ylabel) in zip(axes, panels):
        drawn = []
        # accuracies exist at the evaluated epochs (the same for every arm and seed), the rest per epoch
        at = results["mgit"]["history"][0].get("eval_epochs") if key == "test_accuracy" else None
        for arm, label in (("baseline", "baseline"),
                           ("mgit", "MGiT primary" if key in ("ce_primary", "test_accuracy") else "MGiT")):
            values = curves(results[arm]["history"], key)
            if values is not None:
                draw(ax, values, label, ARM_COLORS[arm], at)
                drawn.append(values)
        if key == "test_accuracy":
            values = curves(results["mgit"]["history"], "aux_test_accuracy")
            if values is not None:
                draw(ax, values, "MGiT auxiliary", ARM_COLORS["auxiliary"], at, linestyle="--")
                drawn.append(values)
            late = [v[:, v.shape[1] // 2:] for v in drawn if v.shape[1]]
            if late:
                low, high = min(float(v.min()) for v in late), max(float(v.max()) for v in late)
                ax.set_ylim(max(0.0, low - 2.0), min(100.0, high + 2.0))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    seeds = results["config"]["seeds"]
    fig.suptitle(f"{results['config']['dataset']}: mean over {len(seeds)} seeds (line) and their range (band)")
    fig.tight_layout()
    return fig
