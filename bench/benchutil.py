"""Shared benchmark helpers: device and wall time, measured ceilings, telemetry, results.

Every benchmark times its own implementation and its peers on the same inputs with
``measure``: **wall** time (host included: calls queued back to back, then one synchronise; the
median of a few rounds per call) and **device** time (the sum of the GPU kernels' durations per
call, from ``torch.profiler``). At ViT shapes the two differ by the host's overhead. ``run``
records our row in pytest-benchmark and puts in ``extra_info``: both times of ours and of each
peer, ``speedup_vs_<peer>`` (wall) and ``device_speedup_vs_<peer>``, achieved TFLOP/s and GB/s
(from device time), the floor (FLOPs over the measured bf16 matmul rate, bytes over the
measured copy bandwidth), peak memory and, where NVML answers, clocks, power and energy.

``MGIT_BENCH_JSONL=<file>``: each result is also appended there as one JSON line as soon as it
exists (a run cut short keeps what finished). ``MGIT_BENCH_DRY=1``: the suite runs on the CPU
on tiny shapes, kernels in Triton's interpreter (set ``TRITON_INTERPRET=1`` too), compiles
with the "eager" backend, no device time: it checks the benchmarks' code, not speed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Dict, Optional

import torch

DRY = os.environ.get("MGIT_BENCH_DRY") == "1"
DEVICE = "cpu" if DRY else "cuda"
JSONL = os.environ.get("MGIT_BENCH_JSONL")


def pick(full, dry):
    """``full`` on a GPU, ``dry`` in a dry run."""
    return dry if DRY else full


# the benchmark shapes, shared by the benchmarks and bench/correctness.py
WIDTHS = {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}  # (width, heads)
ATTENTION_SHAPES = pick(  # (name, B, N, width, heads), bf16
    [(f"vit_{m}/4@32", 256, 65, *WIDTHS[m]) for m in WIDTHS]
    + [(f"vit_{m}/16@224", 128, 197, *WIDTHS[m]) for m in WIDTHS],
    [("tiny", 2, 17, 32, 2)],
)
LOSS_BATCHES, LOSS_CLASSES = pick([256, 1024, 4096], [8]), pick([10, 100, 1000, 21843], [10, 3000])
UPDATE_MODELS = pick(  # primary configurations (the auxiliary: one block)
    {
        "vit_s/4@32": dict(img_size=32, patch_size=4, embed_dim=384, num_heads=6, depth=12, num_classes=100),
        "vit_b/16@224": dict(img_size=224, patch_size=16, embed_dim=768, num_heads=12, depth=12, num_classes=1000),
    },
    {"tiny": dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=2, num_classes=10)},
)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def compiled(fn, mode: Optional[str] = None, **options):
    """``torch.compile(fn)``; in a dry run with the "eager" backend (no C++ toolchain needed)."""
    if DRY:
        return torch.compile(fn, backend="eager", **options)
    return torch.compile(fn, mode=mode, **options)


@dataclasses.dataclass
class GPU:
    name: str
    matmul_tflops: float  # measured dense bf16, 8192³
    copy_gbps: float  # measured device-to-device copy, bytes read + written

    @classmethod
    def measure(cls) -> "GPU":
        n = pick(8192, 64)
        a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        src = torch.randn(pick(256 * 2**20, 2**16), device=DEVICE)  # 1 GiB on a GPU
        dst = torch.empty_like(src)
        matmul, copy = measure(lambda: a @ b), measure(lambda: dst.copy_(src))
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
        matmul_ms, copy_ms = matmul["device_ms"] or matmul["wall_ms"], copy["device_ms"] or copy["wall_ms"]
        return cls(name=name, matmul_tflops=2 * n**3 / matmul_ms / 1e9, copy_gbps=2 * src.numel() * 4 / copy_ms / 1e6)

    def floor_ms(self, flops: float, nbytes: float) -> float:
        return max(flops / (self.matmul_tflops * 1e9), nbytes / (self.copy_gbps * 1e6))


def measure(fn: Callable[[], object], calls: Optional[int] = None, rounds: Optional[int] = None) -> Dict[str, object]:
    """Wall ms per call (median over ``rounds`` of ``calls`` back-to-back calls and one
    synchronise), device ms per call (sum of GPU kernel durations under the profiler; None
    without a GPU) and GPU kernels (and copies) per call."""
    calls, rounds = calls or pick(20, 1), rounds or pick(7, 1)
    for _ in range(pick(3, 1)):  # compiles, autotunes, fills caches
        fn()
    synchronize()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize()
        per_call.append((time.perf_counter() - start) * 1e3 / calls)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled = pick(5, 1)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(profiled):
            fn()
        synchronize()
    on_device = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.time_range.elapsed_us() for e in on_device)  # kernels, copies, memsets
    return {
        "wall_ms": statistics.median(per_call),
        "device_ms": device_us / 1e3 / profiled if on_device else None,
        "kernels_per_call": len(on_device) / profiled,
    }


def step_memory_mib(fn: Callable[[], object]) -> Optional[float]:
    """Memory one call allocates beyond what was live before it (activations, workspaces);
    None without a GPU. A CUDA-graph replay allocates nothing (its pool was reserved at
    capture): measure the same step without the graph instead."""
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def telemetry(fn: Callable[[], object], iterations: int = 200) -> Dict[str, object]:
    """Peak memory of one call, and energy per call, power and clocks over ``iterations``
    calls where NVML reports them; a counter the GPU lacks is named in ``telemetry``."""
    info: Dict[str, object] = {}
    peak = step_memory_mib(fn)
    if peak is not None:
        info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    try:
        import pynvml
    except ImportError:
        info["telemetry"] = "nvidia-ml-py not installed"
        return info
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if DEVICE == "cuda" else 0)
        start = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # mJ
        for _ in range(iterations):
            fn()
        synchronize()
        info["energy_per_iter_mj"] = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - start) / iterations
        info.update(
            power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
        )
    except Exception as error:  # NVMLError_NotSupported and kin: the timings stand without it
        info["telemetry"] = f"partial: {type(error).__name__}: {error}"
    return info


def record(name: str, info: Dict[str, object]) -> None:
    """Appends one result to ``MGIT_BENCH_JSONL`` (when set), flushed at once (conftest.py
    calls it when each benchmark ends)."""
    if JSONL:
        with open(JSONL, "a") as f:
            f.write(json.dumps({"name": name, "extra_info": info}, default=str) + "\n")


def run(
    benchmark,
    gpu: GPU,
    ours: Callable[[], object],
    peers: Dict[str, Optional[Callable[[], object]]],
    *,
    flops: float,
    nbytes: float,
    **extra,
) -> None:
    """Measures ``ours`` and every peer on the same inputs, records ``ours`` in
    pytest-benchmark and fills ``extra_info`` (see the module docstring). A peer given as None
    (not installed) or failing is noted in ``peer_<name>``."""
    mine = measure(ours)
    info = benchmark.extra_info
    info.update(extra)
    device_ms = mine["device_ms"]
    timed_ms = device_ms or mine["wall_ms"]
    floor = gpu.floor_ms(flops, nbytes)
    info.update(
        gpu=gpu.name,
        median_ms=mine["wall_ms"],
        wall_ms=mine["wall_ms"],
        device_ms=device_ms,
        kernels_per_call=mine["kernels_per_call"],
        tflops=flops / timed_ms / 1e9,
        gbps=nbytes / timed_ms / 1e6,
        floor_ms=floor,
        time_over_floor=timed_ms / floor,
        matmul_peak_tflops=gpu.matmul_tflops,
        copy_peak_gbps=gpu.copy_gbps,
    )
    for name, fn in peers.items():
        if fn is None:
            info[f"peer_{name}"] = "not installed"
            continue
        try:
            theirs = measure(fn)
        except Exception as error:  # one peer's failure (a backend this GPU lacks) keeps the rest
            info[f"peer_{name}"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            continue
        info[f"{name}_ms"] = info[f"{name}_wall_ms"] = theirs["wall_ms"]
        info[f"{name}_device_ms"] = theirs["device_ms"]
        info[f"speedup_vs_{name}"] = theirs["wall_ms"] / mine["wall_ms"]
        if device_ms and theirs["device_ms"]:
            info[f"device_speedup_vs_{name}"] = theirs["device_ms"] / device_ms
        info[f"{name}_step_memory_mib"] = step_memory_mib(fn)
    info.update(telemetry(ours, iterations=pick(200, 1)))

    def synchronised():
        ours()
        synchronize()

    benchmark.pedantic(synchronised, rounds=pick(30, 1), warmup_rounds=pick(5, 0), iterations=1)
