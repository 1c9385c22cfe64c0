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
    # from an unrelated folder, so the repository root is not on sys.path
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kernels') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0


def test_public_names():
    for name in ("FusedMGiT", "FusedAttention", "MGiTLoss", "MultiGradientAdamW", "ViT", "make_auxiliary"):
        assert hasattr(mgit_fast, name), name
    assert importlib.util.find_spec("mgit_fast.functional") and importlib.util.find_spec("mgit_fast.reference")
