"""Attention variants, baseline and MGiT arms, paired by seed: one study per dataset.

``--dataset digits`` (the default; issue "IBiT"): regimes full training set and 10 images per
class; variants ``standard``, ``lsa``, ``gmm``, ``ibit``; the main job's defaults (the built-in
ViT with 4×4 patches, so 5 tokens, width 64, depth 4, 4 heads; 20 epochs).
``--dataset mnist5k``: 28×28 MNIST digits at 4×4 patches (a 7×7 grid + the class token: 50
tokens), regimes 10 and 50 images per class, variants ``standard``, ``lsa``, ``ibit``, the
epochs of ``STUDIES`` (sized so training converges), test accuracy after the last epoch only.

For every regime, variant and seed (0 … 9 by default), one run of the main job
(``mgit_fast.train.train``, both arms) writes ``<runs>/<regime>/<variant>/seed<k>/metrics.json``
(``runs/study`` for digits, ``runs/study-<dataset>`` otherwise). The report
(``bench/results/attention_study[_<dataset>].json`` and ``.md``) gives, per regime, variant and
arm, the mean ± std test accuracy and the final training cross-entropy, and paired differences
(per seed; mean, 95 % Student-t confidence interval, two-sided paired t-test p): (a) MGiT −
baseline within each variant, (b) each variant − standard within each arm.

Pairing: within a seed, every variant and both arms see the same training images (the
few-shot draw depends on the seed only), the same batches in the same order with the same
augmentation, and the same per-step RNG; the primaries start from the same weights for every
parameter the variants share (the variants' own parameters, LSA's scale and the GMM/IBiT
masks, draw nothing from the RNG); the script checks this and records it.

    python bench/attention_study.py                    # everything (resumes: finished runs are kept)
    python bench/attention_study.py --jobs 2           # two runs at a time, one thread each
    python bench/attention_study.py --dataset mnist5k --jobs 2
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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("baseline", "mgit")
ARM_LABELS = {"baseline": "baseline (primary alone)", "mgit": "MGiT primary"}


@dataclass(frozen=True)
class Study:
    regimes: Dict[str, Optional[int]]  # name → --train-per-class (None: the whole training set)
    labels: Dict[str, str]
    variants: Tuple[str, ...]
    setup: str  # what every run is, for the report
    epochs: Dict[str, int] = field(default_factory=dict)  # per regime; absent: the main job's default
    config: Dict[str, object] = field(default_factory=dict)  # TrainConfig fields besides the defaults

    def train_config(self, regime: str, variant: str, seed: int, epochs: Optional[int]):
        from mgit_fast.train import TrainConfig

        cfg = TrainConfig(attention=variant, train_per_class=self.regimes[regime], seeds=[seed], device="cpu",
                          **self.config)
        cfg.epochs = epochs or self.epochs.get(regime, cfg.epochs)
        if self.config.get("dataset", "digits") != "digits":
            cfg.eval_every = cfg.epochs  # the test set only after the last epoch
        return cfg


_MAIN_JOB = ("label smoothing 0.1, batch 32, AdamW lr 1e-3 with a 1-epoch warm-up and cosine decay, weight decay "
             "0.05; ViT width 64, depth 4, 4 heads; MGiT: auxiliary depth 1, λ = 0.1, adaptive μ with mix_max 0.5, "
             "head pairing; IBiT with the full learnable mask (`mask_rank=None`)")
STUDIES = {
    "digits": Study(
        regimes={"full": None, "fewshot10": 10},
        labels={"full": "full data (1,347 training images)", "fewshot10": "10 images per class (100 training images)"},
        variants=("standard", "lsa", "gmm", "ibit"),
        setup="Each run is `mgit_fast.train.train` with the defaults (8×8 digits, 4×4 patches so 5 tokens; 20 "
              f"epochs; {_MAIN_JOB}) and `attention=<variant>`. Test set: 450 images (one image = 0.22 points).",
    ),
    "mnist5k": Study(
        regimes={"fewshot10": 10, "fewshot50": 50},
        labels={"fewshot10": "10 images per class (100 training images)",
                "fewshot50": "50 images per class (500 training images)"},
        variants=("standard", "lsa", "ibit"),
        epochs={"fewshot10": 400, "fewshot50": 150},
        config={"dataset": "mnist5k"},
        setup="Each run is `mgit_fast.train.train` on `mnist5k` (28×28 MNIST digits, 4×4 patches so a 7×7 grid + "
              "the class token = 50 tokens; 400 epochs at 10 images per class, 150 at 50, i.e. 1,600 and 2,400 "
              f"steps; {_MAIN_JOB}) and `attention=<variant>`. Test set: the fixed 1,250-image split (one image "
              "= 0.08 points), measured after the last epoch.",
    ),
}


def run_dir(runs: Path, regime: str, variant: str, seed: int) -> Path:
    return runs / regime / variant / f"seed{seed}"


def one_run(runs: str, dataset: str, regime: str, variant: str, seed: int, epochs: Optional[int]) -> Dict[str, object]:
    """One seed of the main job for one regime and variant; writes its metrics.json."""
    import torch

    torch.set_num_threads(1)  # runs reproduce whatever else shares the machine
    from mgit_fast.train import train

    cfg = STUDIES[dataset].train_config(regime, variant, seed, epochs)
    results = train(cfg, run_dir(Path(runs), regime, variant, seed), show_progress=False)
    return {"regime": regime, "variant": variant, "seed": seed, "seconds": results["seconds"],
            "baseline": results["baseline"]["test_accuracy"][0], "mgit": results["mgit"]["test_accuracy"][0]}


def shared_init_is_identical(dataset: str, seed: int = 0) -> Dict[str, object]:
    """Whether, for one seed, the primaries of all variants start from the same weights for
    every parameter name they share (as ``train`` builds them: ``torch.manual_seed(seed)``,
    then the model)."""
    import torch

    from mgit_fast.data import load_dataset
    from mgit_fast.train import build_model

    study = STUDIES[dataset]
    data = load_dataset(dataset)
    states = {}
    for variant in study.variants:
        torch.manual_seed(seed)
        states[variant] = build_model(study.train_config(next(iter(study.regimes)), variant, seed, None),
                                      data).state_dict()
    shared = set.intersection(*(set(s) for s in states.values()))
    identical = all(torch.equal(states[v][name], states["standard"][name]) for v in states for name in shared)
    own = {v: sorted(set(states[v]) - shared) for v in states}
    return {"seed": seed, "identical": identical, "shared_tensors": len(shared),
            "variant_only_tensors": {v: len(names) for v, names in own.items()}}


def _paired(treated: List[float], control: List[float]) -> Dict[str, object]:
    from mgit_fast.train import paired_statistics

    return paired_statistics(treated, control)


def _summary(values: List[float]) -> Dict[str, float]:
    from mgit_fast.train import _summary as summary

    return summary(values)


def collect(study: Study, runs: Path, seeds: List[int]) -> Dict[str, object]:
    """Per regime and variant: the seeds with a finished run, their accuracies and final
    training cross-entropies (the primary's, per arm)."""
    found: Dict[str, Dict[str, Dict[str, object]]] = {}
    for regime in study.regimes:
        for variant in study.variants:
            entry = {key: [] for key in ("seeds", "baseline", "mgit", "auxiliary", "seconds",
                                         "baseline_ce", "mgit_ce")}
            for seed in seeds:
                path = run_dir(runs, regime, variant, seed) / "metrics.json"
                if not path.exists():
                    continue
                metrics = json.loads(path.read_text())
                entry["seeds"].append(seed)
                entry["baseline"].append(metrics["baseline"]["test_accuracy"][0])
                entry["mgit"].append(metrics["mgit"]["test_accuracy"][0])
                entry["auxiliary"].append(metrics["mgit"]["aux_test_accuracy"][0])
                for arm in ARMS:
                    entry[f"{arm}_ce"].append(metrics[arm]["history"][0]["ce_primary"][-1])
                entry["seconds"].append(metrics["seconds"])
            found.setdefault(regime, {})[variant] = entry
    return found


def report(study: Study, runs: Path, seeds: List[int], meta: Dict[str, object]) -> Dict[str, object]:
    """Summaries and paired statistics over the seeds every variant of a regime finished."""
    found = collect(study, runs, seeds)
    out: Dict[str, object] = {"meta": meta, "accuracy_unit": "%", "regimes": {}}
    for regime, variants in found.items():
        common = sorted(set.intersection(*(set(e["seeds"]) for e in variants.values())))
        keys = ("baseline", "mgit", "auxiliary", "baseline_ce", "mgit_ce")
        pick = {v: {key: [e[key][e["seeds"].index(s)] for s in common] for key in keys} for v, e in variants.items()}
        section: Dict[str, object] = {"seeds": common, "per_variant": {}, "mgit_minus_baseline": {},
                                      "variant_minus_standard": {arm: {} for arm in ARMS}}
        for variant in study.variants:
            acc = pick[variant]
            section["per_variant"][variant] = {key: {"per_seed": acc[key], **(_summary(acc[key]) if acc[key] else {})}
                                               for key in keys}
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


def markdown(study: Study, results: Dict[str, object]) -> str:
    meta = results["meta"]
    lines = [
        f"# Attention variants on {meta['dataset']}: baseline and MGiT arms",
        "",
        f"Command: `{meta['command']}`  ",
        f"Hardware: {meta['hardware']}  ",
        f"Wall time: {meta['wall_seconds'] / 60:.1f} min for the runs made by the last invocation "
        f"({meta['runs_made']} runs, {meta['jobs']} at a time); compute in all runs: "
        f"{meta['run_seconds_total'] / 60:.1f} min  ",
        f"Code: mgit_fast at {meta['git_commit']}; torch {meta['torch']}; one torch thread per run  ",
        "",
        f"{study.setup} Accuracies in %, mean ± sample std over seeds; the primary's training cross-entropy "
        "(nats, label-smoothed, mean over the last epoch) shows how far training went; differences are paired "
        "by seed, with the 95 % Student-t confidence interval of the mean difference and the two-sided paired "
        "t-test p (no correction for the number of comparisons).",
        "",
        f"Pairing check: for seed {meta['init_check']['seed']} the primaries of all variants start from "
        f"identical weights for all {meta['init_check']['shared_tensors']} shared tensors: "
        f"**{meta['init_check']['identical']}** (the variants' own parameters, LSA's scale and the GMM/IBiT "
        "masks, start at fixed values); data, batch order, augmentation and per-step RNG depend on the seed only.",
    ]
    for regime, section in results["regimes"].items():
        seeds = section["seeds"]
        lines += ["", f"## {study.labels[regime]}, {len(seeds)} seeds ({', '.join(map(str, seeds))})", ""]
        lines += ["| variant | baseline | MGiT primary | MGiT auxiliary | MGiT − baseline [95 % CI], p "
                  "| final training CE, baseline / MGiT |", "|---|---|---|---|---|---|"]
        for variant in study.variants:
            pv = section["per_variant"][variant]
            if not pv["baseline"]["per_seed"]:
                continue
            cells = [f"{pv[a]['mean']:.2f} ± {pv[a]['std']:.2f}" for a in ("baseline", "mgit", "auxiliary")]
            cells += [_ci(section["mgit_minus_baseline"][variant]),
                      f"{pv['baseline_ce']['mean']:.3f} / {pv['mgit_ce']['mean']:.3f}"]
            lines.append(f"| {variant} | {' | '.join(cells)} |")
        lines += ["", "Variant − standard, paired by seed [95 % CI], p:", "",
                  "| variant | baseline arm | MGiT arm |", "|---|---|---|"]
        for variant in study.variants[1:]:
            if not section["per_variant"][variant]["baseline"]["per_seed"]:
                continue
            cells = [_ci(section["variant_minus_standard"][arm][variant]) for arm in ARMS]
            lines.append(f"| {variant} − standard | {' | '.join(cells)} |")
        lines += ["", "Per seed (baseline / MGiT primary):", ""]
        for variant in study.variants:
            pv = section["per_variant"][variant]
            pairs = " ".join(f"{b:.2f}/{m:.2f}" for b, m in zip(pv["baseline"]["per_seed"], pv["mgit"]["per_seed"]))
            lines.append(f"- {variant}: {pairs}")
    return "\n".join(lines) + "\n"


def markers(dataset: str) -> Tuple[str, str]:
    """The README markers around a study's table."""
    name = "attention-study" if dataset == "digits" else f"attention-study-{dataset}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def results_name(dataset: str) -> str:
    return "attention_study" if dataset == "digits" else f"attention_study_{dataset}"


def readme_section(study: Study, results: Dict[str, object]) -> str:
    """The README's study table: per regime and variant, both arms' mean ± std, MGiT − baseline
    and variant − standard in each arm (paired by seed: mean [95 % CI], p)."""
    meta = results["meta"]
    start, end = markers(meta["dataset"])
    comparisons = 3 * len(study.variants) - 2
    lines = [start, "", f"### Study: attention variants, baseline and MGiT arms ({meta['dataset']})", "",
             f"`{meta['command']}` ({meta['hardware']}; {meta['wall_seconds'] / 60:.0f} min wall time, "
             f"{meta['jobs']} runs at a time, one torch thread each; code at {meta['git_commit']}). {study.setup} "
             "Seeds 0 … 9, both arms per run. Within a seed every variant and arm has the same data, batches, "
             "augmentation and per-step RNG, and the primaries start from identical weights for every shared tensor "
             f"(checked: {meta['init_check']['identical']}), so differences are paired by seed. Accuracy in %, "
             "mean ± std over seeds; differences: mean [95 % t-interval], two-sided paired t-test p, uncorrected "
             f"for the {comparisons} comparisons per regime. Every number: "
             f"`bench/results/{results_name(meta['dataset'])}.md` and `.json`."]
    for regime, section in results["regimes"].items():
        lines += ["", f"{study.labels[regime]}, {len(section['seeds'])} seeds:", "",
                  "| variant | baseline | MGiT primary | MGiT − baseline | − standard, baseline arm "
                  "| − standard, MGiT arm |", "|---|---|---|---|---|---|"]
        for variant in study.variants:
            pv = section["per_variant"][variant]
            if not pv["baseline"]["per_seed"]:
                continue
            cells = [f"{pv[a]['mean']:.2f} ± {pv[a]['std']:.2f}" for a in ARMS]
            cells.append(_ci(section["mgit_minus_baseline"][variant]))
            for arm in ARMS:
                cells.append("" if variant == "standard" else _ci(section["variant_minus_standard"][arm][variant]))
            lines.append(f"| {variant} | {' | '.join(cells)} |")
    return "\n".join(lines + ["", end])


def update_readme(path: Path, study: Study, results: Dict[str, object]) -> None:
    """Replaces the study's section between its markers (or its ``<!-- attention-study… -->``
    placeholder) in the README."""
    text = path.read_text()
    section = readme_section(study, results)
    start, end = markers(results["meta"]["dataset"])
    placeholder = start.replace(":start", "")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    elif placeholder in text:
        text = text.replace(placeholder, section, 1)
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
    parser.add_argument("--dataset", default="digits", choices=list(STUDIES))
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 … N−1 (default 10)")
    parser.add_argument("--regimes", nargs="+", default=None, help="some of the dataset's regimes (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="override the study's epochs (for a smoke test)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one torch thread each")
    parser.add_argument("--runs", default=None, help="folder of the runs' metrics.json (default runs/study[-DATASET])")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"),
                        help="folder for attention_study[_DATASET].json and .md")
    parser.add_argument("--report-only", action="store_true", help="no new runs: the report from the runs there")
    parser.add_argument("--readme", default=None, help="also write the study table into this README")
    args = parser.parse_args(argv)
    study = STUDIES[args.dataset]
    regimes = args.regimes or list(study.regimes)
    unknown = sorted(set(regimes) - set(study.regimes))
    if unknown:
        parser.error(f"--regimes: {args.dataset} has {', '.join(study.regimes)}, not {', '.join(unknown)}")
    default_runs = "study" if args.dataset == "digits" else f"study-{args.dataset}"
    runs, seeds = Path(args.runs or ROOT / "runs" / default_runs), list(range(args.seeds))

    # few-shot first (quick), then seed-major so that a cut-short study keeps whole seeds
    order = sorted(study.regimes, key=lambda r: study.regimes[r] or float("inf"))
    todo = [(regime, variant, seed) for regime in order if regime in regimes
            for seed in seeds for variant in study.variants
            if not (run_dir(runs, regime, variant, seed) / "metrics.json").exists()]
    start = time.perf_counter()
    made = 0
    commit_file = runs / "commit.txt"  # the code the runs were made with (the report may come later)
    if not args.report_only and todo:
        runs.mkdir(parents=True, exist_ok=True)
        commit_file.write_text(_git_commit() + "\n")
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(one_run, str(runs), args.dataset, r, v, s, args.epochs) for r, v, s in todo]
            for future in futures:
                done = future.result()
                made += 1
                print(f"[{time.perf_counter() - start:7.0f} s] {made}/{len(todo)} {done['regime']:>9} "
                      f"{done['variant']:>8} seed {done['seed']}: baseline {done['baseline']:.2f}, "
                      f"MGiT {done['mgit']:.2f} ({done['seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - start

    import torch

    meta = {
        "dataset": args.dataset,
        "command": "python bench/attention_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), shared with other "
                    "work, no GPU",
        "wall_seconds": wall,
        "runs_made": made,
        "jobs": args.jobs,
        "git_commit": commit_file.read_text().strip() if commit_file.exists() else _git_commit(),
        "torch": torch.__version__,
        "init_check": shared_init_is_identical(args.dataset),
    }
    out = Path(args.results)
    previous = out / f"{results_name(args.dataset)}.json"
    if made == 0 and previous.exists():  # a report of earlier runs: keep how they were made
        old = json.loads(previous.read_text())["meta"]
        meta.update({key: old[key] for key in ("command", "wall_seconds", "runs_made", "jobs", "hardware")
                     if key in old})
    results = report(study, runs, seeds, meta)
    meta["run_seconds_total"] = sum(s["run_seconds"] for s in results["regimes"].values())
    out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(results, indent=2))
    (out / f"{results_name(args.dataset)}.md").write_text(markdown(study, results))
    if args.readme:
        update_readme(Path(args.readme), study, results)
    print(markdown(study, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
