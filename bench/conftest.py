"""Benchmarks run on a CUDA GPU only; elsewhere every one is skipped with the reason."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (none visible to torch)")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu():
    """The device and its measured ceilings (bf16 matmul rate, copy bandwidth)."""
    from benchutil import GPU

    return GPU.measure()
