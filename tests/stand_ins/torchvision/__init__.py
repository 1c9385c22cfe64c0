"""A stand-in for torchvision, so the tests can import timm's model code beside the CPU torch.

PyPI's torchvision wheels are CUDA builds whose import fails against a CPU torch, and timm
imports torchvision at module level for its data pipeline. This package gives those imports
what they name and nothing more: ``FrozenBatchNorm2d``, ``InterpolationMode``, and placeholder
classes for transforms and datasets that raise if anything tries to use them. ``conftest.py``
puts it on ``sys.path`` only when no real torchvision imports.
"""
__version__ = "0.0.0+stand-in"
