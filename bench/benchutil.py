"""Shared benchmark helpers: measured ceilings, floors, NVML telemetry, extra_info.

Every benchmark times its own implementation and its peers on the same inputs with
``triton.testing.do_bench`` (CUDA events, median), records the pytest-benchmark statistics for
its own row, and puts in ``extra_info``: the GPU, achieved TFLOP/s and GB/s, the floor
(max of FLOPs over the measured bf16 matmul rate and bytes over the measured copy bandwidth),
time/floor, ``speedup_vs_<peer>``, each peer's ``<peer>_step_memory_mib``, and NVML clocks,
power, energy per iteration and peak memory.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch


@dataclasses.dataclass
class GPU:
    name: str
    matmul_tflops: float  # measured dense bf16, 8192³
    copy_gbps: float  # measured device-to-device copy, bytes read + written

    @classmethod
    def measure(cls) -> "GPU":
        from triton.testing import do_bench

        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
        src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
        dst = torch.empty_like(src)
        copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
        return cls(
            name=torch.cuda.get_device_name(),
            matmul_tflops=2 * n**3 / ms / 1e9,
            copy_gbps=2 * src.numel() * 4 / copy_ms / 1e6,
        )

    def floor_ms(self, flops: float, nbytes: float) -> float:
        return max(flops / (self.matmul_tflops * 1e9), nbytes / (self.copy_gbps * 1e6))


def median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def step_memory_mib(fn: Callable[[], object]) -> float:
    """Memory one call allocates beyond what was live before it (activations, workspaces).
    A CUDA-graph replay allocates nothing (its pool was reserved at capture): measure the
    same step without the graph instead."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _nvml_reading():
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml, handle
    except Exception:  # nvidia-ml-py missing or no NVML: telemetry is left out
        return None, None


def telemetry(fn: Callable[[], object], iterations: int = 200) -> Dict[str, float]:
    """Energy per iteration, power and clocks over a run of ``iterations`` calls, and the
    peak memory of one call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    info = {"peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20}
    pynvml, handle = _nvml_reading()
    if pynvml is None:
        return info
    start = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # mJ
    for _ in range(iterations):
        fn()
    torch.cuda.synchronize()
    energy_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - start
    info.update(
        energy_per_iter_mj=energy_mj / iterations,
        power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
        sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
    )
    return info


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
    """Times ``ours`` and every peer on the same inputs, records ``ours`` in pytest-benchmark,
    and fills ``extra_info``. A peer given as None (not installed) is listed as skipped."""
    ours_ms = median_ms(ours)
    info = benchmark.extra_info
    info.update(extra)
    floor = gpu.floor_ms(flops, nbytes)
    info.update(
        gpu=gpu.name,
        median_ms=ours_ms,
        tflops=flops / ours_ms / 1e9,
        gbps=nbytes / ours_ms / 1e6,
        floor_ms=floor,
        time_over_floor=ours_ms / floor,
        matmul_peak_tflops=gpu.matmul_tflops,
        copy_peak_gbps=gpu.copy_gbps,
    )
    for name, fn in peers.items():
        if fn is None:
            info[f"peer_{name}"] = "not installed"
            continue
        peer_ms = median_ms(fn)
        info[f"{name}_ms"] = peer_ms
        info[f"speedup_vs_{name}"] = peer_ms / ours_ms
        info[f"{name}_step_memory_mib"] = step_memory_mib(fn)
    info.update(telemetry(ours))

    def synchronised():
        ours()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronised, rounds=30, warmup_rounds=5, iterations=1)
