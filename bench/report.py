"""Benchmark results as Markdown: a table (and a PNG of the speedups), or a GPU session's summary.

    python3 bench/report.py RESULTS [--out BENCHMARKS.md]    # pytest-benchmark JSON or our JSONL
    python3 bench/report.py --session DIR                     # DIR/99_summary.md from a gpu_session.sh run
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import List, Optional

# the first GPU run (H200): attention fwd+bwd device ms of the two-kernel backward and of SDPA, per
# shape and variant; attention's goals are set against it
ATTENTION_BASELINE = Path(__file__).resolve().parent / "results" / "gpu-20261204" / "device_time_attention.jsonl"
CUDNN_GOAL, BASELINE_GOAL, WALL_GOAL = 0.5, 1.0, 1.3  # ours / cuDNN, ours / two-kernel, wall / device
CUDNN_SHAPES, WALL_SHAPES = ("vit_s/4@32", "vit_s/16@224"), ("vit_s/16@224",)

KEYS = ("shape", "setup", "model", "variant", "pass_", "batch", "classes", "tokens")
NOTES = {  # extra_info key: how the notes column shows it
    "images_per_s": lambda v: f"{v:,.0f} img/s",
    "mfu": lambda v: f"MFU {100 * v:.1f} %",
    "memory_vs_eager": lambda v: f"memory ×{v:.2f} of eager",
    "compiled_mode": lambda v: f"compiled: {v}",
    "mgit_compiled_over_single_compiled": lambda v: f"MGiT compiled / single compiled ×{v:.2f} (goal ≤ 1)",
    "eager_over_mgit_compiled": lambda v: f"eager MGiT / MGiT compiled ×{v:.2f} (goal ≥ 4)",
    "mgit_compiled_compile_s": lambda v: f"MGiT compile {v:.1f} s",
    "kernels_per_call": lambda v: f"{v:g} kernels/call",
}


def load(path: Path) -> dict:
    """pytest-benchmark's JSON, or MGIT_BENCH_JSONL lines (a run cut short has only those)."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return {"benchmarks": [json.loads(line) for line in text.splitlines() if line.strip()]}
    return json.loads(text)


def _ms(wall: Optional[float], device: Optional[float]) -> str:
    return f"{wall:.3f}" + (f" / {device:.3f}" if device is not None else "")


def rows(results: dict) -> List[dict]:
    out = []
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "median_ms" not in info:
            continue
        work = bench["name"].split("::")[-1].split("[")[0].removeprefix("test_")
        shape = ", ".join(f"{k.rstrip('_')}={info[k]}" for k in KEYS if k in info)
        peers = {k[len("speedup_vs_"):]: v for k, v in info.items() if k.startswith("speedup_vs_")}
        out.append(dict(
            work=work, shape=shape, ours=(info.get("wall_ms", info["median_ms"]), info.get("device_ms")),
            peers=peers, device_speedups={n: info.get(f"device_speedup_vs_{n}") for n in peers},
            peer_ms={n: (info.get(f"{n}_ms"), info.get(f"{n}_device_ms")) for n in peers},
            floor=info.get("time_over_floor"), gpu=info.get("gpu", "?"),
            notes="<br>".join([show(info[k]) for k, show in NOTES.items() if info.get(k) is not None]
                              + [f"{k[5:]}: {v}" for k, v in info.items() if k.startswith("peer_")]),
        ))
    return out


def table(entries: List[dict]) -> str:
    lines = ["| work | shape | ours (ms, wall / device) | peers (ms, wall / device) | speedup (wall / device) "
             "| device time / floor | notes |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        peers = "<br>".join(f"{n}: {_ms(*ms)}" for n, ms in e["peer_ms"].items() if ms[0] is not None)
        speed = "<br>".join(
            f"×{s:.2f}" + (f" / ×{e['device_speedups'][n]:.2f}" if e["device_speedups"].get(n) else "") + f" vs {n}"
            for n, s in e["peers"].items())
        floor = f"{e['floor']:.2f}" if e["floor"] is not None else "–"
        lines.append(f"| {e['work']} | {e['shape']} | {_ms(*e['ours'])} | {peers} | {speed} | {floor} | {e['notes']} |")
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
    ax.set_ylabel("speedup of mgit_fast (wall)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_goals(benchmarks: List[dict], baseline: Path = ATTENTION_BASELINE) -> str:
    """Attention fwd+bwd against its goals: device time over SDPA cuDNN's (plain, at the
    CUDNN_SHAPES), each variant's device time over the baseline run's two-kernel figure, and wall
    over device time (at the WALL_SHAPES), each beside its *_GOAL."""
    base = {}
    if baseline.exists():
        for line in baseline.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                base[row["shape"], row["variant"]] = row["ours_two_kernel_ms"]

    def check(value, goal):
        return f"{value:.2f} ({'met' if value <= goal else 'MISSED'})"

    lines = [f"| shape | variant | GPU | ours ms (wall / device) | ÷ SDPA cuDNN (≤ {CUDNN_GOAL:g}) "
             f"| ÷ two-kernel on H200 (≤ {BASELINE_GOAL:g}) | wall ÷ device (≤ {WALL_GOAL:g}) |", "|---|---|---|---|---|---|---|"]
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if not bench.get("name", "").split("::")[-1].startswith("test_attention[") or info.get("pass_") != "fwd+bwd":
            continue
        shape, variant, device, wall = info.get("shape"), info.get("variant"), info.get("device_ms"), info["wall_ms"]
        cudnn = info.get("sdpa_cudnn_device_ms")
        ratios = [
            check(device / cudnn, CUDNN_GOAL) if device and cudnn and shape in CUDNN_SHAPES else "–",
            check(device / base[shape, variant], BASELINE_GOAL) if device and (shape, variant) in base else "–",
            check(wall / device, WALL_GOAL) if device and shape in WALL_SHAPES else "–",
        ]
        lines.append(f"| {shape} | {variant} | {info.get('gpu', '?')} | {_ms(wall, device)} | {' | '.join(ratios)} |")
    if len(lines) == 2:
        return "(no attention fwd+bwd results)"
    return "\n".join(lines + ["", f"Two-kernel figures: `{baseline.relative_to(baseline.parents[3])}` "
                                   "(an H200; on another GPU that column compares across machines)."])


def host_times(records: List[dict]) -> str:
    """host_overhead.py's results (µs per call, median, and / tiny SDPA) as a table."""
    lines = []
    for record in records:
        result = record["host_overhead"]
        how = "real launches" if result.get("stub") is None else f"launches stubbed at {result['stub']!r}"
        lines += [f"{result.get('device', '?')}, {how}:", "", "| case | µs per call | ÷ sdpa |", "|---|---|---|"]
        sdpa = result["median_us"]["sdpa"]
        lines += [f"| {name} | {us:.1f} | {us / sdpa:.2f} |" for name, us in result["median_us"].items()]
        lines.append("")
    return "\n".join(lines).strip() or "(not measured)"


def session_summary(folder: Path) -> str:
    """The summary of a gpu_session.sh run: stages, correctness, timings, cuda tests, sanitizer."""

    def read(name: str) -> str:
        path = folder / name
        return path.read_text(errors="replace") if path.exists() else ""

    text = ["# GPU session", "", "```", read("00_session.txt").strip() or "(no 00_session.txt)", "```", ""]
    cases = [json.loads(line) for line in read("10_correct.jsonl").splitlines() if line.strip()]
    failed = [c for c in cases if not c.get("ok")]
    text += [f"## Correctness against float64: {len(cases) - len(failed)}/{len(cases)} ok", ""]
    for case in failed:
        text.append(f"- FAILED {case['case']}: {case.get('error') or case.get('errors')}")
    worst = {}
    for case in cases:
        for key, value in case.get("errors", {}).items():
            worst[key] = max(worst.get(key, 0.0), value)
    if worst:
        text.append("- largest relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    text.append("")
    bench = folder / "20_bench.jsonl"
    results = load(bench)["benchmarks"] if bench.exists() else []
    host = [r for r in results if r.get("name") == "host_overhead"]
    entries = rows({"benchmarks": results})
    text += [f"## Timings ({len(entries)} benchmarks)", "", table(entries) if entries else "(none)", ""]
    text += ["## Attention goals", "", attention_goals(results), ""]
    text += ["## Host time per call (bench/host_overhead.py)", "", host_times(host), ""]
    cuda = read("30_cuda_tests.log")
    verdicts = re.findall(r"^=*\s*(\d+ \w+.* in [\d.]+s.*?)\s*=*$", cuda, re.MULTILINE)
    text += ["## cuda tests", "", verdicts[-1] if verdicts else "(no summary line)", ""]
    text += [line for line in cuda.splitlines() if line.startswith(("FAILED", "ERROR"))] + [""]
    sanitizer = read("40_sanitizer.txt")
    lines = sanitizer.splitlines()
    found = [line for line in lines if "SUMMARY" in line or line.startswith(("FAIL", "sanitizer:"))]
    done = sum(line.startswith(("ok ", "FAIL")) for line in lines)
    text += ["## Sanitizer", "", f"{done} small cases ran", *found, ""] if lines else ["## Sanitizer", "", "(not run)", ""]
    return "\n".join(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="?", help="pytest-benchmark JSON or a .jsonl of results")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--session", type=Path, help="a gpu_session.sh output folder: writes its 99_summary.md")
    args = parser.parse_args(argv)
    if args.session is not None:
        (args.session / "99_summary.md").write_text(session_summary(args.session))
        return 0
    if args.results is None:
        parser.error("give a results file or --session DIR")
    results = load(args.results)
    entries = rows(results)
    machine = results.get("machine_info", {})
    gpus = sorted({e["gpu"] for e in entries})
    png = args.out.with_suffix(".png")
    text = [
        "# Benchmarks",
        "",
        f"From `{args.results}` ({results.get('datetime', '?')}); GPU: {', '.join(gpus) or '?'}; "
        f"Python {machine.get('python_version', '?')}. Wall: calls queued back to back, one synchronise; "
        "device: the GPU kernels' durations (torch.profiler); medians.",
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
