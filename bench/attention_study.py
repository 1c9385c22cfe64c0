"""Attention variants on digits, baseline and MGiT arms, paired by seed (issue "IBiT").

For every regime (full training set; ``--train-per-class 10``), attention variant
(``standard``, ``lsa``, ``gmm``, ``ibit``) and seed (0 … 9 by default), one run of the main
job (``mgit_fast.train.train``, default hyperparameters otherwise: the built-in ViT with 4×4
patches, width 64, depth 4, 4 heads; 20 epochs; both arms) writes
``runs/study/<regime>/<variant>/seed<k>/metrics.json``. The report
(``bench/results/attention_study.json`` and ``.md``) gives, per regime, variant and arm, the
mean ± std test accuracy, and paired differences (per seed; mean, 95 % Student-t confidence
interval, two-sided paired t-test p): (a) MGiT − baseline within each variant, (b) each
variant − standard within each arm.

Pairing: within a seed, every variant and both arms see the same training images (the
few-shot draw depends on the seed only), the same batches in the same order with the same
augmentation, and the same per-step RNG; the primaries start from the same weights for every
parameter the variants share (the variants' own parameters, LSA's scale and the GMM/IBiT
masks, draw nothing from the RNG); the script checks this and records it.

    python bench/attention_study.py                    # everything (resumes: finished runs are kept)
    python bench/attention_study.py --jobs 2           # two runs at a time, one thread each
    python bench/attention_study.py --report-only      # the report from the runs there are
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("standard", "lsa", "gmm", "ibit")
REGIMES = {"full": None, "fewshot10": 10}  # name → --train-per-class
REGIME_LABELS = {"full": "full data (1,347 training images)", "fewshot10": "10 images per class (100 training images)"}
ARMS = ("baseline", "mgit")
ARM_LABELS = {"baseline": "baseline (primary alone)", "mgit": "MGiT primary"}


def run_dir(runs: Path, regime: str, variant: str, seed: int) -> Path:
    return runs / regime / variant / f"seed{seed}"


def one_run(runs: str, regime: str, variant: str, seed: int, epochs: Optional[int]) -> Dict[str, object]:
    """One seed of the main job for one regime and variant; writes its metrics.json."""
    import torch

    torch.set_num_threads(1)  # runs reproduce whatever else shares the machine
    from mgit_fast.train import TrainConfig, train

    cfg = TrainConfig(attention=variant, train_per_class=REGIMES[regime], seeds=[seed], device="cpu")
    if epochs is not None:
        cfg.epochs = epochs
    out = run_dir(Path(runs), regime, variant, seed)
    results = train(cfg, out, show_progress=False)
    return {"regime": regime, "variant": variant, "seed": seed, "seconds": results["seconds"],
            "baseline": results["baseline"]["test_accuracy"][0], "mgit": results["mgit"]["test_accuracy"][0]}


def shared_init_is_identical(seed: int = 0) -> Dict[str, object]:
    """Whether, for one seed, the primaries of all variants start from the same weights for
    every parameter name they share (as ``train`` builds them: ``torch.manual_seed(seed)``,
    then the model)."""
    import torch

    from mgit_fast.data import load_dataset
    from mgit_fast.train import TrainConfig, build_model

    data = load_dataset("digits")
    states = {}
    for variant in VARIANTS:
        torch.manual_seed(seed)
        states[variant] = build_model(TrainConfig(attention=variant), data).state_dict()
    shared = set.intersection(*(set(s) for s in states.values()))
    identical = all(torch.equal(states[v][name], states["standard"][name]) for v in VARIANTS for name in shared)
    own = {v: sorted(set(states[v]) - shared) for v in VARIANTS}
    return {"seed": seed, "identical": identical, "shared_tensors": len(shared),
            "variant_only_tensors": {v: len(names) for v, names in own.items()}}


def _paired(treated: List[float], control: List[float]) -> Dict[str, object]:
    from mgit_fast.train import paired_statistics

    return paired_statistics(treated, control)


def _summary(values: List[float]) -> Dict[str, float]:
    from mgit_fast.train import _summary as summary

    return summary(values)


def collect(runs: Path, seeds: List[int]) -> Dict[str, object]:
    """Per regime and variant: the seeds with a finished run and their accuracies."""
    found: Dict[str, Dict[str, Dict[str, object]]] = {}
    for regime in REGIMES:
        for variant in VARIANTS:
            entry = {"seeds": [], "baseline": [], "mgit": [], "auxiliary": [], "seconds": []}
            for seed in seeds:
                path = run_dir(runs, regime, variant, seed) / "metrics.json"
                if not path.exists():
                    continue
                metrics = json.loads(path.read_text())
                entry["seeds"].append(seed)
                entry["baseline"].append(metrics["baseline"]["test_accuracy"][0])
                entry["mgit"].append(metrics["mgit"]["test_accuracy"][0])
                entry["auxiliary"].append(metrics["mgit"]["aux_test_accuracy"][0])
                entry["seconds"].append(metrics["seconds"])
            found.setdefault(regime, {})[variant] = entry
    return found


def report(runs: Path, seeds: List[int], meta: Dict[str, object]) -> Dict[str, object]:
    """Summaries and paired statistics over the seeds every variant of a regime finished."""
    found = collect(runs, seeds)
    out: Dict[str, object] = {"meta": meta, "accuracy_unit": "%", "regimes": {}}
    for regime, variants in found.items():
        common = sorted(set.intersection(*(set(e["seeds"]) for e in variants.values())))
        pick = {v: {arm: [e[arm][e["seeds"].index(s)] for s in common] for arm in ("baseline", "mgit", "auxiliary")}
                for v, e in variants.items()}
        section: Dict[str, object] = {"seeds": common, "per_variant": {}, "mgit_minus_baseline": {},
                                      "variant_minus_standard": {arm: {} for arm in ARMS}}
        for variant in VARIANTS:
            acc = pick[variant]
            section["per_variant"][variant] = {
                arm: {"per_seed": acc[arm], **(_summary(acc[arm]) if acc[arm] else {})}
                for arm in ("baseline", "mgit", "auxiliary")
            }
            section["mgit_minus_baseline"][variant] = _paired(acc["mgit"], acc["baseline"])
            if variant != "standard":
                for arm in ARMS:
                    section["variant_minus_standard"][arm][variant] = _paired(acc[arm], pick["standard"][arm])
        section["run_seconds"] = sum(sum(e["seconds"]) for e in variants.values())
        out["regimes"][regime] = section
    return out


def _signed(x: float) -> str:
    return f"{round(x, 2) + 0.0:+.2f}"  # no "−0.00"


def _ci(stats: Dict[str, object]) -> str:
    if stats["ci95"] is None:
        return f"{_signed(stats['mean'])} (n = {stats['n']})"
    lo, hi = stats["ci95"]
    p = stats["p_value"]
    return f"{_signed(stats['mean'])} [{_signed(lo)}, {_signed(hi)}], p = {p:.3f}"


def markdown(results: Dict[str, object]) -> str:
    meta = results["meta"]
    lines = [
        "# Attention variants on digits: baseline and MGiT arms (issue \"IBiT\")",
        "",
        f"Command: `{meta['command']}`  ",
        f"Hardware: {meta['hardware']}  ",
        f"Wall time: {meta['wall_seconds'] / 60:.1f} min for the runs made by the last invocation "
        f"({meta['runs_made']} runs, {meta['jobs']} at a time); compute in all runs: "
        f"{meta['run_seconds_total'] / 60:.1f} min  ",
        f"Code: mgit_fast at {meta['git_commit']}; torch {meta['torch']}; one torch thread per run  ",
        "",
        "Each run is `mgit_fast.train.train` with the defaults (built-in ViT: 4×4 patches so 5 tokens, width 64, "
        "depth 4, 4 heads; 20 epochs, batch 32, AdamW lr 1e-3 with warm-up and cosine decay, weight decay 0.05, "
        "label smoothing 0.1; MGiT: auxiliary depth 1, λ = 0.1, adaptive μ with mix_max 0.5, head pairing) "
        "and `attention=<variant>`. IBiT is the full learnable mask (`mask_rank=None`). Test set: 450 images "
        "(one image = 0.22 points). Accuracies in %, mean ± sample std over seeds; differences are paired by "
        "seed, with the 95 % Student-t confidence interval of the mean difference and the two-sided paired "
        "t-test p (no correction for the number of comparisons).",
        "",
        f"Pairing check: for seed {meta['init_check']['seed']} the primaries of all variants start from "
        f"identical weights for all {meta['init_check']['shared_tensors']} shared tensors: "
        f"**{meta['init_check']['identical']}** (the variants' own parameters, LSA's scale and the GMM/IBiT "
        "masks, start at fixed values); data, batch order, augmentation and per-step RNG depend on the seed only.",
    ]
    for regime, section in results["regimes"].items():
        seeds = section["seeds"]
        lines += ["", f"## {REGIME_LABELS[regime]}, {len(seeds)} seeds ({', '.join(map(str, seeds))})", ""]
        lines += ["| variant | baseline | MGiT primary | MGiT auxiliary | MGiT − baseline [95 % CI], p |",
                  "|---|---|---|---|---|"]
        for variant in VARIANTS:
            pv = section["per_variant"][variant]
            if not pv["baseline"]["per_seed"]:
                continue
            cells = [f"{pv[a]['mean']:.2f} ± {pv[a]['std']:.2f}" for a in ("baseline", "mgit", "auxiliary")]
            lines.append(f"| {variant} | {' | '.join(cells)} | {_ci(section['mgit_minus_baseline'][variant])} |")
        lines += ["", "Variant − standard, paired by seed [95 % CI], p:", "",
                  "| variant | baseline arm | MGiT arm |", "|---|---|---|"]
        for variant in VARIANTS[1:]:
            if not section["per_variant"][variant]["baseline"]["per_seed"]:
                continue
            cells = [_ci(section["variant_minus_standard"][arm][variant]) for arm in ARMS]
            lines.append(f"| {variant} − standard | {' | '.join(cells)} |")
        lines += ["", "Per seed (baseline / MGiT primary):", ""]
        for variant in VARIANTS:
            pv = section["per_variant"][variant]
            pairs = " ".join(f"{b:.2f}/{m:.2f}" for b, m in zip(pv["baseline"]["per_seed"], pv["mgit"]["per_seed"]))
            lines.append(f"- {variant}: {pairs}")
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- attention-study:start -->", "<!-- attention-study:end -->"


def readme_section(results: Dict[str, object]) -> str:
    """The README's study table: per regime and variant, both arms' mean ± std, MGiT − baseline
    and variant − standard in each arm (paired by seed: mean [95 % CI], p)."""
    meta = results["meta"]
    lines = [README_START, "", "### Study: attention variants, baseline and MGiT arms (digits)", "",
             f"`{meta['command']}` ({meta['hardware']}; {meta['wall_seconds'] / 60:.0f} min wall time, "
             f"{meta['jobs']} runs at a time, one torch thread each; code at {meta['git_commit']}). Default "
             "hyperparameters of `mgit-fast train` (20 epochs; ViT with 4×4 patches, so 5 tokens, width 64, depth 4, "
             "4 heads; IBiT with the full mask), seeds 0 … 9, both arms per run. Within a seed every variant and arm "
             "has the same data, batches, augmentation and per-step RNG, and the primaries start from identical "
             f"weights for every shared tensor (checked: {meta['init_check']['identical']}), so differences are "
             "paired by seed. Accuracy in % (one test image = 0.22 points), mean ± std over seeds; differences: "
             "mean [95 % t-interval], two-sided paired t-test p, uncorrected for the 12 comparisons per regime. "
             "Every number: `bench/results/attention_study.md` and `.json`."]
    for regime, section in results["regimes"].items():
        lines += ["", f"{REGIME_LABELS[regime]}, {len(section['seeds'])} seeds:", "",
                  "| variant | baseline | MGiT primary | MGiT − baseline | − standard, baseline arm "
                  "| − standard, MGiT arm |", "|---|---|---|---|---|---|"]
        for variant in VARIANTS:
            pv = section["per_variant"][variant]
            if not pv["baseline"]["per_seed"]:
                continue
            cells = [f"{pv[a]['mean']:.2f} ± {pv[a]['std']:.2f}" for a in ARMS]
            cells.append(_ci(section["mgit_minus_baseline"][variant]))
            for arm in ARMS:
                cells.append("" if variant == "standard" else _ci(section["variant_minus_standard"][arm][variant]))
            lines.append(f"| {variant} | {' | '.join(cells)} |")
    return "\n".join(lines + ["", README_END])


def update_readme(path: Path, results: Dict[str, object]) -> None:
    """Replaces the study section between the markers (or the ``<!-- attention-study -->``
    placeholder) in the README."""
    text = path.read_text()
    section = readme_section(results)
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + section + rest.split(README_END, 1)[1]
    elif "<!-- attention-study -->" in text:
        text = text.replace("<!-- attention-study -->", section, 1)
    else:
        raise ValueError(f"{path}: no study markers")
    path.write_text(text)


def _git_commit() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 … N−1 (default 10)")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--epochs", type=int, default=None, help="override the default 20 (for a smoke test)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one torch thread each")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "study"), help="folder of the runs' metrics.json")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"),
                        help="folder for attention_study.json and .md")
    parser.add_argument("--report-only", action="store_true", help="no new runs: the report from the runs there")
    parser.add_argument("--readme", default=None, help="also write the study table into this README")
    args = parser.parse_args(argv)
    runs, seeds = Path(args.runs), list(range(args.seeds))

    # few-shot first (quick), then seed-major so that a cut-short study keeps whole seeds
    todo = [(regime, variant, seed) for regime in reversed(list(REGIMES)) if regime in args.regimes
            for seed in seeds for variant in VARIANTS
            if not (run_dir(runs, regime, variant, seed) / "metrics.json").exists()]
    start = time.perf_counter()
    made = 0
    commit_file = runs / "commit.txt"  # the code the runs were made with (the report may come later)
    if not args.report_only and todo:
        runs.mkdir(parents=True, exist_ok=True)
        commit_file.write_text(_git_commit() + "\n")
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(one_run, str(runs), r, v, s, args.epochs) for r, v, s in todo]
            for future in futures:
                done = future.result()
                made += 1
                print(f"[{time.perf_counter() - start:7.0f} s] {made}/{len(todo)} {done['regime']:>9} "
                      f"{done['variant']:>8} seed {done['seed']}: baseline {done['baseline']:.2f}, "
                      f"MGiT {done['mgit']:.2f} ({done['seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - start

    import torch

    meta = {
        "command": "python bench/attention_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), shared with other "
                    "work, no GPU",
        "wall_seconds": wall,
        "runs_made": made,
        "jobs": args.jobs,
        "git_commit": commit_file.read_text().strip() if commit_file.exists() else _git_commit(),
        "torch": torch.__version__,
        "init_check": shared_init_is_identical(0),
    }
    previous = Path(args.results) / "attention_study.json"
    if made == 0 and previous.exists():  # a report of earlier runs: keep how they were made
        old = json.loads(previous.read_text())["meta"]
        meta.update({key: old[key] for key in ("command", "wall_seconds", "runs_made", "jobs", "hardware")
                     if key in old})
    results = report(runs, seeds, meta)
    meta["run_seconds_total"] = sum(s["run_seconds"] for s in results["regimes"].values())
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_study.json").write_text(json.dumps(results, indent=2))
    (out / "attention_study.md").write_text(markdown(results))
    if args.readme:
        update_readme(Path(args.readme), results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
