"""Shared test helpers.

- ``rel_err(a, b)``: ``‖a − b‖ / ‖b‖`` computed in float64 (inf when either side is not finite,
  so a NaN can never pass a tolerance check); ``assert_rel_close(out, ref, tol)`` wraps it.
- Tests marked ``@pytest.mark.cuda`` are skipped when no CUDA GPU is available; without one,
  ``TRITON_INTERPRET=1`` is set so the Triton kernels run (slowly) on the CPU.
- Without a torchvision that imports, timm is imported with ``tests/stand_ins`` (a torchvision
  stand-in) on ``sys.path``, which is withdrawn afterwards (see below).
- Every test starts from a torch seed derived from its node id (``seed`` fixture, autouse), so
  inputs are random but reproducible and differ between tests.
- Under the interpreter every kernel launch is memory-checked (``memcheck.py``: out-of-bounds
  accesses, races between programs, atomic/plain mixes fail the launch); a test marked
  ``@pytest.mark.no_memcheck`` runs unchecked, ``memcheck.allowed`` lists known (kernel, rule) pairs.

Import the helpers with ``from conftest import rel_err, assert_rel_close`` (pytest puts this
directory on ``sys.path``; keep ``tests/`` without an ``__init__.py``).
"""
from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

import memcheck

# Without a GPU the Triton kernels run on the CPU in Triton's interpreter; it must be chosen
# before the kernels are defined (mgit_fast imports them on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETING:
    memcheck.install()

# timm imports torchvision at module level, and PyPI's torchvision does not import beside the
# CPU torch: without a working one, timm is imported here with the stand-in in tests/stand_ins,
# which is then withdrawn, so libraries that run without torchvision (transformers, Lightning's
# torchmetrics) see none rather than a stand-in they would import more of.
def _torchvision_works() -> bool:
    try:
        import torchvision
    except Exception:  # ImportError, or a CUDA build's operator registration failing
        return False
    return not str(getattr(torchvision, "__version__", "")).endswith("+stand-in")  # (PYTHONPATH may hold it)


if not _torchvision_works():
    def _forget_torchvision():
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    _forget_torchvision()
    _stand_ins = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand_ins")
    sys.path.insert(0, _stand_ins)
    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _stand_ins]
        _forget_torchvision()

# The tests use tiny tensors: one intra-op thread is faster than two and cannot stall when
# another process holds a core.
torch.set_num_threads(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64; inf if either tensor holds a NaN/inf; 0 if both are 0."""
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """Asserts both tensors are finite and ``rel_err(out, ref) < tol``."""
    out_t, ref_t = torch.as_tensor(out).detach(), torch.as_tensor(ref).detach()
    assert torch.isfinite(out_t).all(), f"{what}: output holds non-finite values"
    assert torch.isfinite(ref_t).all(), f"{what}: reference holds non-finite values"
    err = rel_err(out_t, ref_t)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_memcheck: run the test's kernel launches without the memory checker")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Collecting must not switch the process to or from the interpreter: kernels defined after
    such a switch would run interpreted on CUDA tensors (or compiled on CPU ones)."""
    now = os.environ.get("TRITON_INTERPRET") == "1"
    other_mode = [name for name, module in list(sys.modules.items())
                  if name.startswith("mgit_fast.kernels") and (not INTERPRETING) in _kernel_modes(module)]
    if now != INTERPRETING or other_mode:
        raise pytest.UsageError(
            f"collecting the tests changed TRITON_INTERPRET (was {INTERPRETING}, now {now}) or defined kernels "
            f"in the other mode ({', '.join(other_mode) or 'none yet'}): a test module must not set it"
        )


def _kernel_modes(module) -> set:
    """For each Triton kernel in the module: True if it was defined for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    modes = set()
    for value in vars(module).values():
        while hasattr(value, "fn") and not isinstance(value, (JITFunction, InterpretedFunction)):
            value = value.fn  # triton.heuristics / autotune wrappers
        if isinstance(value, (JITFunction, InterpretedFunction)):
            modes.add(isinstance(value, InterpretedFunction))
    return modes


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch from the test's node id; returns the seed."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def memory_check(request: pytest.FixtureRequest):
    """Checks every interpreted launch of the test unless it is marked ``no_memcheck``."""
    memcheck.enabled = request.node.get_closest_marker("no_memcheck") is None
    yield
    memcheck.enabled = True
