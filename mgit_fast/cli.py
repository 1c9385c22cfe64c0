"""``mgit-fast``: the command line. ``mgit-fast train --help`` lists the options."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .data import DATASETS


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgit-fast", description="MGiT training with fused kernels.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="MGiT against the same primary trained alone, over several seeds",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands.add_parser(
        "inspect", add_help=False,
        help="compile every kernel for sm_90a/sm_80 here (no GPU) and report registers, spills, occupancy, "
             "tensor cores, load widths, grids; `mgit-fast inspect --help`",
    )
    add = train.add_argument
    d = _defaults()
    add("--dataset", choices=DATASETS, default=d.dataset)
    add("--epochs", type=int, default=d.epochs)
    add("--seeds", type=int, default=len(d.seeds), help="number of seeds (0, 1, ...)")
    add("--batch-size", type=int, default=d.batch_size)
    add("--lr", type=float, default=d.lr)
    add("--weight-decay", type=float, default=d.weight_decay)
    add("--label-smoothing", type=float, default=d.label_smoothing)
    add("--attention", choices=("standard", "lsa", "gmm"), default="standard")
    add("--spt", action="store_true", help="shifted patch tokenization")
    add("--patch-size", type=int, default=d.patch_size)
    add("--depth", type=int, default=d.depth, help="primary's encoder blocks")
    add("--embed-dim", type=int, default=d.embed_dim)
    add("--num-heads", type=int, default=d.num_heads)
    add("--drop-path", type=float, default=d.drop_path)
    add("--aux-depth", type=int, default=d.aux_depth, help="auxiliary's encoder blocks")
    add("--js-weight", type=float, default=d.js_weight, help="λ on the JS divergence")
    add("--temperature", type=float, default=d.temperature, help="softmax temperature of the JS term")
    add("--mix", type=_mix, default="adaptive", help="'adaptive' or a fixed μ in [0, 1]")
    add("--mix-max", type=float, default=d.mix_max)
    add("--pairing", choices=("head", "all", "none"), default="head")
    add("--average", type=float, default=d.average, help="weighted averaging γ of paired weights")
    add("--max-grad-norm", type=float, default=d.max_grad_norm)
    add("--no-baseline", action="store_true", help="skip the primary-alone arm")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (under torchrun: each rank's own GPU)")
    add("--graph", action="store_true", help="capture MGiT's training step in a CUDA graph")
    add("--out", default="runs/mgit", help="folder for metrics.json and training.png")
    add("--no-progress", action="store_true")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        from .inspect import main as inspect_main

        return inspect_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .train import TrainConfig, format_table, train

    if args.epochs < 1 or args.seeds < 1 or args.batch_size < 1:
        print("mgit-fast: --epochs, --seeds and --batch-size must be positive", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        dataset=args.dataset,
        epochs=args.epochs,
        seeds=list(range(args.seeds)),
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        attention=args.attention,
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
    )
    results = train(cfg, args.out, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    print(format_table(results))
    print(f"{results['seconds']:.0f} s on {results['config']['device']}; wrote {args.out}/metrics.json and training.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
