"""The install layout: kernels/ ships as mgit_fast.kernels and nothing named `kernels`."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import mgit_fast


def test_kernels_install_under_the_package():
    import mgit_fast.kernels

    assert Path(mgit_fast.kernels.__file__).parent.name == "kernels"


def test_no_top_level_kernels_module(tmp_path):
    # from an unrelated folder, so the repository root is not on sys.path; a `kernels` there may be
    # Hugging Face's (transformers installs it), never this repository's folder
    ours = Path(__file__).resolve().parents[1] / "kernels"
    code = ("import importlib.util, pathlib, sys; spec = importlib.util.find_spec('kernels'); "
            f"sys.exit(spec is not None and pathlib.Path(spec.origin).resolve().parent == pathlib.Path({str(ours)!r}))")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0


def test_public_names():
    for name in ("FusedMGiT", "FusedAttention", "MGiTLoss", "MultiGradientAdamW", "ViT", "make_auxiliary"):
        assert hasattr(mgit_fast, name), name
    assert importlib.util.find_spec("mgit_fast.functional") and importlib.util.find_spec("mgit_fast.reference")


def test_collecting_the_suite_on_a_gpu_machine_keeps_the_kernels_compiled(tmp_path):
    """Where torch sees a GPU, collecting every test module leaves TRITON_INTERPRET unset and
    defines no kernel for the interpreter (bench/model.py, imported by a test module, once set it
    and the cuda tests under xdist ran interpreted on CUDA tensors). The GPU is faked with a
    plugin; nothing runs."""
    import os

    (tmp_path / "fake_gpu.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "fake_gpu", "-p", "no:cacheprovider", str(tests)],
        cwd=tests.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tests collected" in result.stdout
