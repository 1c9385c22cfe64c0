"""Turns pytest-benchmark JSON into BENCHMARKS.md (a table) and a PNG (speedups per peer).

    python bench/report.py bench/results/<run>.json [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

KEYS = ("shape", "setup", "model", "variant", "pass_", "batch", "classes", "tokens")
NOTES = {  # extra_info key: how the notes column shows it
    "images_per_s": lambda v: f"{v:,.0f} img/s",
    "mfu": lambda v: f"MFU {100 * v:.1f} %",
    "memory_vs_eager": lambda v: f"memory ×{v:.2f} of eager",
    "compiled_mode": lambda v: f"compiled: {v}",
}


def rows(results: dict) -> List[dict]:
    out = []
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "median_ms" not in info:
            continue
        work = bench["name"].split("[")[0].removeprefix("test_")
        shape = ", ".join(f"{k.rstrip('_')}={info[k]}" for k in KEYS if k in info)
        peers = {k[len("speedup_vs_"):]: v for k, v in info.items() if k.startswith("speedup_vs_")}
        peer_ms = {name: info.get(f"{name}_ms") for name in peers}
        out.append(dict(work=work, shape=shape, ours_ms=info["median_ms"], peers=peers, peer_ms=peer_ms,
                        floor=info.get("time_over_floor"), gpu=info.get("gpu", "?"),
                        notes="<br>".join(show(info[k]) for k, show in NOTES.items() if k in info)))
    return out


def table(entries: List[dict]) -> str:
    lines = ["| work | shape | ours (ms) | peers (ms) | speedup | time / floor | notes |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        peers = "<br>".join(f"{n}: {ms:.3f}" for n, ms in e["peer_ms"].items() if ms is not None)
        speed = "<br>".join(f"×{s:.2f} vs {n}" for n, s in e["peers"].items())
        floor = f"{e['floor']:.2f}" if e["floor"] is not None else "–"
        lines.append(f"| {e['work']} | {e['shape']} | {e['ours_ms']:.3f} | {peers} | {speed} | {floor} | {e['notes']} |")
    return "\n".join(lines)


def plot(entries: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{e['work']}\n{e['shape']}" for e in entries]
    peers = sorted({n for e in entries for n in e["peers"]})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(entries)), 4))
    width = 0.8 / max(1, len(peers))
    for k, name in enumerate(peers):
        values = [e["peers"].get(name, 0.0) for e in entries]
        ax.bar([i + k * width for i in range(len(entries))], values, width=width, label=f"vs {name}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(entries))], labels, rotation=90, fontsize=6)
    ax.set_ylabel("speedup of mgit_fast")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    results = json.loads(args.json.read_text())
    entries = rows(results)
    machine = results.get("machine_info", {})
    gpus = sorted({e["gpu"] for e in entries})
    png = args.out.with_suffix(".png")
    text = [
        "# Benchmarks",
        "",
        f"From `{args.json}` ({results.get('datetime', '?')}); GPU: {', '.join(gpus) or '?'}; "
        f"Python {machine.get('python_version', '?')}. Medians of CUDA-event timings (triton.testing.do_bench).",
        "",
        table(entries),
        "",
        f"![speedups]({png.name})",
        "",
    ]
    args.out.write_text("\n".join(text))
    plot(entries, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
