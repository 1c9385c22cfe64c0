"""``mgit-fast``: the command line. ``mgit-fast train --help`` lists the options."""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import List, Optional

from .attention import ATTENTION_VARIANTS
from .data import DATASETS, check_dataset_name


def _mix(value: str):
    if value == "adaptive":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mix must be 'adaptive' or a number, got {value!r}") from None


def _defaults():
    from .train import TrainConfig

    return TrainConfig()


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2), like the argument checks."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: …)" to an option's help unless the help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="mgit-fast", description="MGiT training with fused kernels.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="MGiT against the same primary trained alone, over several seeds",
        formatter_class=_DefaultsFormatter,
    )
    commands.add_parser(
        "inspect", add_help=False,
        help="compile every kernel for sm_90a/sm_80 here (no GPU) and report registers, spills, occupancy, "
             "tensor cores, load widths, grids; `mgit-fast inspect --help`",
    )
    add = train.add_argument
    d = _defaults()
    add("--dataset", default=d.dataset,
        help=f"training data: {', '.join(DATASETS)}, or folder:PATH (one subfolder of images per class)")
    add("--data-dir", default=None, help="where the cifar10, cifar100 and svhn files are, or are downloaded to "
        "(default: $MGIT_FAST_DATA or ~/.cache/mgit_fast/data)")
    add("--train-per-class", type=int, default=None, help="few-shot: train on this many images per class, "
        "drawn per seed (default: all)")
    add("--model", default=d.model, help="the primary: vit (the built-in ViT, shaped by the options below) or "
        "timm:NAME (a timm ViT, e.g. timm:vit_tiny_patch16_224, built at the data's image size with --patch-size "
        "and --drop-path)")
    add("--epochs", type=int, default=d.epochs, help="passes over the training set")
    add("--eval-every", type=int, default=d.eval_every,
        help="measure test accuracy after every k-th epoch and after the last (evaluation can cost more "
             "than training on a few-shot set)")
    add("--seeds", type=int, default=len(d.seeds), help="number of seeds (0, 1, ...)")
    add("--batch-size", type=int, default=d.batch_size, help="images per step")
    add("--lr", type=float, default=d.lr, help="peak AdamW learning rate (warm-up, then cosine decay)")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (≥ 0)")
    add("--label-smoothing", type=float, default=d.label_smoothing, help="ε of both cross-entropies, in [0, 1)")
    add("--attention", choices=ATTENTION_VARIANTS, default="standard",
        help="attention variant: standard, lsa (locality self-attention), gmm (Gaussian-mixture bias), ibit "
             "(learned multiplicative mask, softmax(s) ⊙ M; with --model timm:NAME too)")
    add("--mask-rank", type=int, default=d.mask_rank, help="IBiT: learn the mask as 1 + U·Vᵀ of this rank "
        "(1 to the patches per image) instead of a full N×N mask per head (default: full)")
    add("--spt", action="store_true", help="shifted patch tokenization")
    add("--patch-size", type=int, default=d.patch_size, help="patch side in pixels")
    add("--depth", type=int, default=d.depth, help="primary's encoder blocks")
    add("--embed-dim", type=int, default=d.embed_dim, help="token width")
    add("--num-heads", type=int, default=d.num_heads, help="attention heads (must divide --embed-dim)")
    add("--drop-path", type=float, default=d.drop_path, help="stochastic depth rate, in [0, 1)")
    add("--aux-depth", type=int, default=d.aux_depth, help="auxiliary's encoder blocks (1 to --depth)")
    add("--js-weight", type=float, default=d.js_weight, help="λ on the JS divergence (≥ 0)")
    add("--temperature", type=float, default=d.temperature, help="softmax temperature of the JS term (> 0)")
    add("--mix", type=_mix, default="adaptive", help="'adaptive' or a fixed μ in [0, 1]")
    add("--mix-max", type=float, default=d.mix_max, help="largest adaptive μ, in [0, 1]")
    add("--pairing", choices=("head", "all", "none"), default="head", help="which parameters take the mixed gradient")
    add("--average", type=float, default=d.average, help="weighted averaging γ of paired weights, in [0, 1]")
    add("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip each model's gradient norm to this (> 0)")
    add("--no-baseline", action="store_true", help="skip the primary-alone arm")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (under torchrun: each rank's own GPU)")
    add("--graph", action="store_true", help="capture MGiT's training step in a CUDA graph (needs CUDA)")
    add("--compile", action="store_true", help="torch.compile MGiT's two forwards and loss (its first step compiles)")
    add("--out", default="runs/mgit", help="folder for metrics.json and training.png (created)")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def _in(value: float, low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> bool:
    if not math.isfinite(value):
        return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def validate(args: argparse.Namespace) -> Optional[str]:
    """The first problem with the train arguments, as one line naming the option, or None.
    Checks everything that would otherwise fail after training began; creates --out."""
    inf = math.inf
    ranges = [
        ("--epochs", args.epochs, 1, inf), ("--eval-every", args.eval_every, 1, inf), ("--seeds", args.seeds, 1, inf), ("--batch-size", args.batch_size, 1, inf),
        ("--patch-size", args.patch_size, 1, inf), ("--depth", args.depth, 1, inf), ("--embed-dim", args.embed_dim, 1, inf),
        ("--num-heads", args.num_heads, 1, inf), ("--weight-decay", args.weight_decay, 0, inf),
        ("--js-weight", args.js_weight, 0, inf), ("--mix-max", args.mix_max, 0, 1), ("--average", args.average, 0, 1),
    ]
    for name, value, low, high in ranges:
        if not _in(value, low, high):
            bound = f"≥ {low}" if high == inf else f"in [{low}, {high}]"
            return f"{name} must be {bound}, got {value}"
    for name, value in (("--lr", args.lr), ("--temperature", args.temperature)):
        if not _in(value, 0, inf, low_open=True):
            return f"{name} must be > 0, got {value}"
    for name, value in (("--label-smoothing", args.label_smoothing), ("--drop-path", args.drop_path)):
        if not _in(value, 0, 1, high_open=True):
            return f"{name} must be in [0, 1), got {value}"
    if args.max_grad_norm is not None and not _in(args.max_grad_norm, 0, inf, low_open=True):
        return f"--max-grad-norm must be > 0, got {args.max_grad_norm}"
    if args.mix != "adaptive" and not _in(args.mix, 0, 1):
        return f"--mix must be 'adaptive' or in [0, 1], got {args.mix}"
    if args.train_per_class is not None and args.train_per_class < 1:
        return f"--train-per-class must be ≥ 1, got {args.train_per_class}"
    problem = check_dataset_name(args.dataset)
    if problem:
        return f"--dataset: {problem}"
    if args.model != "vit":
        if not args.model.startswith("timm:") or len(args.model) == 5:
            return f"--model must be vit or timm:NAME, got {args.model!r}"
        try:
            import timm
        except ImportError as error:
            import importlib.util

            if importlib.util.find_spec("timm") is None:
                return "--model timm:...: timm is not installed (pip install --no-deps timm; see the README)"
            return (f"--model timm:...: timm is installed but does not import ({type(error).__name__}: {error}); "
                    "it needs a torchvision that imports beside this torch (see the README)")
        if not timm.is_model(args.model[5:]):
            return f"--model: timm has no model named {args.model[5:]!r}"
    if args.mask_rank is not None:
        if args.attention != "ibit":
            return f"--mask-rank applies to --attention ibit only, got --attention {args.attention}"
        size = _image_size(args.dataset)
        patches = (size // args.patch_size) ** 2
        if not 1 <= args.mask_rank <= max(patches, 1):
            return (f"--mask-rank must be in [1, {patches}] (the patches per {size}×{size} image at --patch-size "
                    f"{args.patch_size}), got {args.mask_rank}")
    if args.embed_dim % args.num_heads:
        return f"--num-heads ({args.num_heads}) must divide --embed-dim ({args.embed_dim})"
    if not 1 <= args.aux_depth <= args.depth:
        return f"--aux-depth must be in [1, --depth = {args.depth}], got {args.aux_depth}"
    device = _device_problem(args.device)
    if device:
        return device
    if args.graph and not (args.device.startswith("cuda") or (args.device == "auto" and _cuda_available())):
        return f"--graph needs a CUDA device, got --device {args.device}" + (
            " (no CUDA GPU here)" if args.device == "auto" else "")
    out = os.path.abspath(args.out)
    created = []  # the folders this check makes, deepest first: removed again (training makes them)
    while not os.path.exists(out) and out not in created:
        created.append(out)
        out = os.path.dirname(out)
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as exc:
        return f"--out: cannot write to {args.out}: {exc.strerror or exc}"
    finally:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                break
    return None


def _image_size(dataset: str) -> int:
    """The side of ``dataset``'s images: 8 for digits and synthetic, 28 for mnist5k, 32 otherwise
    (CIFAR, SVHN, image folders, which are resized to 32)."""
    return {"digits": 8, "synthetic": 8, "mnist5k": 28}.get(dataset, 32)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_problem(name: str) -> Optional[str]:
    if name in ("auto", "cpu"):
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"
    if device.type != "cuda":
        return f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"
    if not torch.cuda.is_available():
        return f"--device {name}: no CUDA GPU is available here"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        from .inspect import main as inspect_main

        return inspect_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .train import TrainConfig, format_table, train

    problem = validate(args)
    if problem:
        print(f"mgit-fast train: {problem}", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_per_class=args.train_per_class,
        model=args.model,
        epochs=args.epochs,
        eval_every=args.eval_every,
        seeds=list(range(args.seeds)),
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        attention=args.attention,
        mask_rank=args.mask_rank,
        spt=args.spt,
        patch_size=args.patch_size,
        depth=args.depth,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        drop_path=args.drop_path,
        aux_depth=args.aux_depth,
        js_weight=args.js_weight,
        temperature=args.temperature,
        mix=args.mix,
        mix_max=args.mix_max,
        pairing=args.pairing,
        average=args.average,
        max_grad_norm=args.max_grad_norm,
        baseline=not args.no_baseline,
        device=args.device,
        graph=args.graph,
        compile=args.compile,
    )
    from .data import DatasetError

    try:
        results = train(cfg, args.out, show_progress=not args.no_progress)
    except DatasetError as err:  # raised before training starts and before --out is created
        print(f"mgit-fast train: --dataset {args.dataset}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    print(format_table(results))
    if args.compile:
        seconds, compiles = results["mgit"]["compile_seconds"], results["mgit"]["compiles"]
        print(f"torch.compile: first MGiT step {seconds[0]:.1f} s (compiling, seed 0), {sum(compiles)} graph(s) compiled")
    print(f"{results['seconds']:.0f} s on {results['config']['device']}; wrote {args.out}/metrics.json and training.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
