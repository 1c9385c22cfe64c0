"""Benchmarks run on a CUDA GPU only; elsewhere every one is skipped with the reason, unless
MGIT_BENCH_DRY=1 (tiny shapes on the CPU, see benchutil)."""
import pytest
import torch

import benchutil


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or benchutil.DRY:
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (none visible to torch)")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu():
    """The device and its measured ceilings (bf16 matmul rate, copy bandwidth)."""
    return benchutil.GPU.measure()


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Each benchmark compiles its own graphs from an empty dynamo cache, so no function
    reaches the recompile limit across tests and silently falls back to eager."""
    torch._dynamo.reset()


def pytest_runtest_makereport(item, call):
    """A benchmark's results go to MGIT_BENCH_JSONL as soon as it ends."""
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    if call.when == "call" and benchmark is not None and "wall_ms" in benchmark.extra_info:
        benchutil.record(item.nodeid, dict(benchmark.extra_info))
