"""Triton kernels of mgit_fast, installed as ``mgit_fast.kernels``.

One file per fused operation (DESIGN.md §6): attention, the MGiT loss, and the multi-gradient
AdamW update. Each is reached through ``mgit_fast.functional`` with ``backend="triton"``.
"""
if __name__ == "kernels":
    # Imported as a top-level `kernels` because the repository root is on sys.path (python -c from
    # there, a notebook there): this folder is not that package. Hand the import over to the next
    # `kernels` on sys.path (Hugging Face's kernel hub, which transformers imports), or fail as if
    # this folder were not there.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is mgit_fast.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what the import statement returns
    _spec.loader.exec_module(_module)
else:
    import contextlib

    import torch

    def on_device(t: torch.Tensor):
        """Triton launches on the current CUDA device, not on the tensors' one: launch inside this
        context (a no-op for CPU and meta tensors)."""
        return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
