"""The benchmark suite collects and skips cleanly without a GPU; report.py renders results;
bench/host_overhead.py runs and reports both ratios."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_bench_suite_skips_without_a_gpu():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench"), "--benchmark-only", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" not in done.stdout and "benchmarks need a CUDA GPU" in done.stdout


def test_report_renders_a_table_and_a_plot(tmp_path):
    fake = {
        "datetime": "2026-11-21",
        "machine_info": {"python_version": "3.11"},
        "benchmarks": [
            {"name": "test_loss[256-10]", "extra_info": {"median_ms": 0.05, "batch": 256, "classes": 10, "gpu": "G",
                                                          "speedup_vs_eager": 4.0, "eager_ms": 0.2, "time_over_floor": 3.0}},
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
    assert "| loss | batch=256, classes=10 | 0.050 | eager: 0.200 | ×4.00 vs eager | 3.00 |  |" in text
    assert "×1.60 vs stock_pytorch" in text and "test_skipped" not in text
    assert "128,000 img/s<br>MFU 41.0 %<br>memory ×0.60 of eager" in text
    assert (tmp_path / "BENCHMARKS.png").stat().st_size > 5_000


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
