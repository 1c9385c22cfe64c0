"""The benchmark suite collects and skips cleanly without a GPU; its dry run (bench/gpu_session.sh
--dry: every stage of the GPU session on tiny shapes on the CPU) passes; report.py renders
results; telemetry survives a GPU without an energy counter; bench/host_overhead.py runs and
reports both ratios."""
import json
import math
import re
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def outside_xdist():
    """This environment without pytest-xdist's worker variables (with them, pytest-benchmark in a
    child process thinks it runs under xdist and refuses --benchmark-only)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}


def bench_module(name):
    """A module of bench/ (which is not a package), imported with bench/ on sys.path: last, so
    `conftest` stays the tests' own (bench/ has one too) for this process and the processes it
    spawns, which import test modules by name."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"mgit_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_bench_suite_skips_without_a_gpu():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench"), "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist"],
        capture_output=True, text=True, cwd=ROOT, env=outside_xdist(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" not in done.stdout and "benchmarks need a CUDA GPU" in done.stdout


def test_report_renders_a_table_and_a_plot(tmp_path):
    fake = {
        "datetime": "2026-11-21",
        "machine_info": {"python_version": "3.11"},
        "benchmarks": [
            {"name": "test_loss[256-10]", "extra_info": {"median_ms": 0.05, "wall_ms": 0.05, "device_ms": 0.02,
                                                          "batch": 256, "classes": 10, "gpu": "G",
                                                          "speedup_vs_eager": 4.0, "eager_ms": 0.2,
                                                          "eager_device_ms": 0.1, "device_speedup_vs_eager": 5.0,
                                                          "time_over_floor": 3.0}},
            {"name": "test_update[vit_s]", "extra_info": {"median_ms": 1.0, "model": "vit_s", "gpu": "G",
                                                           "speedup_vs_stock_pytorch": 1.6, "stock_pytorch_ms": 1.6}},
            {"name": "test_step[vit_s]", "extra_info": {"median_ms": 2.0, "setup": "vit_s", "gpu": "G", "mfu": 0.41,
                                                         "images_per_s": 128000.0, "memory_vs_eager": 0.6}},
            {"name": "test_skipped", "extra_info": {}},
        ],
    }
    source = tmp_path / "run.json"
    source.write_text(json.dumps(fake))
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(source), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "| loss | batch=256, classes=10 | 0.050 / 0.020 | eager: 0.200 / 0.100 | ×4.00 / ×5.00 vs eager | 3.00 |  |" in text
    assert "×1.60 vs stock_pytorch" in text and "test_skipped" not in text
    assert "128,000 img/s<br>MFU 41.0 %<br>memory ×0.60 of eager" in text
    assert (tmp_path / "BENCHMARKS.png").stat().st_size > 5_000
    # the same results as JSON lines (what a session cut short leaves) give the same table
    lines = tmp_path / "run.jsonl"
    lines.write_text("".join(json.dumps(b) + "\n" for b in fake["benchmarks"]))
    again = tmp_path / "again.md"
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(lines), "--out", str(again)], check=True)
    assert text.split("\n\n")[2] == again.read_text().split("\n\n")[2]


def test_session_summary_checks_attention_goals():
    """The summary's goal table divides fwd+bwd device time by SDPA cuDNN's and by the first GPU
    run's two-kernel figure of the same shape and variant, and wall by device time, and flags a
    missed goal; forward-only results stay out."""
    report = bench_module("report")
    base = {(r["shape"], r["variant"]): r["ours_two_kernel_ms"]
            for r in map(json.loads, report.ATTENTION_BASELINE.read_text().splitlines())}

    def result(shape, variant, pass_, wall, device, cudnn=None):
        info = dict(shape=shape, variant=variant, pass_=pass_, wall_ms=wall, median_ms=wall, device_ms=device,
                    gpu="G", sdpa_cudnn_device_ms=cudnn)
        return {"name": f"bench/test_attention.py::test_attention[{shape}-{pass_}-{variant}]", "extra_info": info}

    plain = 0.8 * base["vit_s/16@224", "plain"]
    slow_bias = 1.25 * base["vit_s/4@32", "bias"]
    text = report.attention_goals([
        result("vit_s/16@224", "plain", "fwd+bwd", 1.5 * plain, plain, cudnn=4 * plain),
        result("vit_s/4@32", "bias", "fwd+bwd", 1.1 * slow_bias, slow_bias),
        result("vit_s/4@32", "plain", "fwd", 1.0, 0.5, cudnn=0.1),
        {"name": "bench/test_loss.py::test_loss[256-10]", "extra_info": {"wall_ms": 1.0}},
    ])
    rows = [line for line in text.splitlines() if line.startswith("| vit")]
    assert len(rows) == 2, text
    assert rows[0].endswith("| 0.25 (met) | 0.80 (met) | 1.50 (MISSED) |"), rows[0]
    assert rows[1].endswith("| – | 1.25 (MISSED) | – |"), rows[1]
    assert report.attention_goals([]) == "(no attention fwd+bwd results)"


def test_gpu_session_dry_run(tmp_path):
    """Every stage of bench/gpu_session.sh on tiny shapes on the CPU: each ends with rc 0, the
    correctness cases pass, each benchmark family leaves wall-time results, the summary names
    every section; at most 8 files."""
    out = tmp_path / "session"
    env = {k: v for k, v in os.environ.items() if k not in ("MGIT_BENCH_JSONL", "STAGES", "BUDGET")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--dry"], env={**env, "OUT": str(out)},
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "00_session.txt").read_text()
    stages = [line for line in log.splitlines() if line.startswith("stage ")]
    assert [line.split(":")[0] for line in stages] == ["stage B", "stage C", "stage D", "stage H", "stage E",
                                                       "stage F"], log
    assert all(": rc 0," in line for line in stages), log
    cases = [json.loads(line) for line in (out / "10_correct.jsonl").read_text().splitlines()]
    assert len(cases) >= 9 and all(c["ok"] for c in cases), cases
    results = [json.loads(line) for line in (out / "20_bench.jsonl").read_text().splitlines()]
    host = [r["host_overhead"] for r in results if r["name"] == "host_overhead"]  # stage H
    assert len(host) == 1 and set(host[0]["median_us"]) == {"sdpa", "attention", "loss", "fwd_launch", "noop_launch"}
    results = [r for r in results if r["name"] != "host_overhead"]
    families = {r["name"].split("::")[1].split("[")[0] for r in results}
    assert families == {"test_update", "test_loss", "test_attention", "test_step"}, families
    assert all(r["extra_info"]["wall_ms"] > 0 for r in results)
    assert any("speedup_vs_stock_pytorch" in r["extra_info"] for r in results)  # the update's peer pairs heads
    assert any(r["extra_info"].get("flex_graphs") for r in results)  # FlexAttention compiled
    steps = [r["extra_info"] for r in results if "test_step" in r["name"]]
    assert steps and all(s["mgit_compiled_ms"] > 0 and s["mgit_compiled_graphs"] == 1 for s in steps)  # MGiT compiled
    summary = (out / "99_summary.md").read_text()
    for section in ("## Correctness against float64: ", "## Timings", "## Attention goals", "## Host time per call",
                    "## cuda tests", "## Sanitizer"):
        assert section in summary
    assert "| fwd_launch |" in summary
    assert len(list(out.iterdir())) <= 8


def test_gpu_session_refuses_an_unknown_argument_before_any_work(tmp_path):
    out = tmp_path / "never"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--fast"],
                          env={**os.environ, "OUT": str(out)}, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "usage" in done.stderr
    assert not out.exists()


def test_update_peer_pairs_the_heads_by_name():
    """The stock-PyTorch update peer mixes the heads of a 12-block and a 1-block model (zipping
    their parameter lists found none)."""
    from mgit_fast import ViT

    update = bench_module("test_update")
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, num_classes=10)
    primary, auxiliary = ViT(**cfg, depth=3), ViT(**cfg, depth=1)
    pairs = update.head_pairs(primary, auxiliary)
    assert [p.shape for p, _ in pairs] == [primary.head.weight.shape, primary.head.bias.shape]
    assert all(p is getattr(primary.head, n) and a is getattr(auxiliary.head, n)
               for (p, a), n in zip(pairs, ("weight", "bias")))


def test_telemetry_survives_a_gpu_without_an_energy_counter(monkeypatch):
    """NVML reporting NotSupported for the energy counter leaves the timings and names the gap."""
    benchutil = bench_module("benchutil")

    class NotSupported(Exception):
        pass

    def unsupported(handle):
        raise NotSupported("Not Supported")

    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu0",
                                 nvmlDeviceGetTotalEnergyConsumption=unsupported)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(benchutil, "DEVICE", "cpu")
    calls = []
    info = benchutil.telemetry(lambda: calls.append(1), iterations=3)
    assert info["telemetry"].startswith("partial: NotSupported")


def test_host_overhead_reports_both_ratios(tmp_path):
    """A smoke run of the host-overhead benchmark (few repeats: CI machines are noisy, so the
    goals are not checked): it prints both op / SDPA ratios, finite and positive, and the JSON
    holds them."""
    out = tmp_path / "host.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "host_overhead.py"), "--repeats", "3", "--inner", "3",
         "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("attention", "loss"):
        found = re.search(rf"^{name}/sdpa ratio: (\S+) \(goal <= ", done.stdout, re.MULTILINE)
        assert found, done.stdout
        ratio = float(found.group(1))
        assert math.isfinite(ratio) and ratio > 0, done.stdout
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == {"attention", "loss"}
    assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values())


@pytest.mark.parametrize("argv, says", [(["--gpu", "--stub", "grid"], "takes no --stub"),
                                         (["--repeats", "0"], "must be >= 1"),
                                         pytest.param(["--gpu"], "no CUDA GPU here", marks=pytest.mark.skipif(
                                             torch.cuda.is_available(), reason="checks the no-GPU refusal"))])
def test_host_overhead_refuses_bad_arguments_in_one_line(tmp_path, argv, says):
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "host_overhead.py"), *argv, "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert not out.exists()


def test_a_failing_peer_is_noted_and_the_rest_is_measured(monkeypatch):
    """A peer that raises (an SDPA backend this GPU lacks) is noted; ours and the others are timed."""
    benchutil = bench_module("benchutil")
    monkeypatch.setattr(benchutil, "DEVICE", "cpu")
    monkeypatch.setattr(benchutil, "DRY", True)

    class Benchmark:
        extra_info = {}

        def pedantic(self, fn, **kwargs):
            fn()

    def unsupported():
        raise RuntimeError("No available kernel")

    x = torch.randn(64, 64)
    gpu = benchutil.GPU(name="cpu", matmul_tflops=1.0, copy_gbps=1.0)
    bench = Benchmark()
    benchutil.run(bench, gpu, lambda: x @ x, {"broken": unsupported, "plain": lambda: x + x}, flops=1.0, nbytes=1.0)
    info = bench.extra_info
    assert info["peer_broken"].startswith("failed: RuntimeError: No available kernel")
    assert info["wall_ms"] > 0 and info["plain_wall_ms"] > 0 and "speedup_vs_plain" in info
