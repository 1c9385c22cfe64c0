"""Datasets held as tensors in memory, split once with a fixed seed."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("digits", "synthetic")


class Split(NamedTuple):
    """Images ``[N, C, H, W]`` (float32, standardised by training statistics) and labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def load_dataset(name: str = "digits", *, test_fraction: float = 0.25, split_seed: int = 0) -> Split:
    """``digits``: scikit-learn's 1,797 real 8×8 handwritten digits (bundled, no download),
    split stratified by class. ``synthetic``: 1,200 noisy 8×8 images of 10 random class
    templates, for quick runs. The split depends on ``split_seed`` only."""
    if name == "digits":
        images, labels = _digits()
    elif name == "synthetic":
        images, labels = _synthetic()
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the main job needs scikit-learn: pip install 'mgit-fast[train]'") from err
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    mean, std = x_train.mean(), x_train.std()
    as_tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))[:, None]  # noqa: E731
    return Split(
        as_tensor(x_train),
        torch.from_numpy(y_train.astype(np.int64)),
        as_tensor(x_test),
        torch.from_numpy(y_test.astype(np.int64)),
        int(labels.max()) + 1,
    )


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the digits dataset needs scikit-learn: pip install 'mgit-fast[train]'") from err
    digits = load_digits()
    return digits.images.astype(np.float64), digits.target


def _synthetic(num_classes: int = 10, per_class: int = 120, size: int = 8):
    rng = np.random.default_rng(1234)
    templates = rng.normal(size=(num_classes, size, size))
    labels = np.repeat(np.arange(num_classes), per_class)
    images = templates[labels] + 1.5 * rng.normal(size=(len(labels), size, size))
    return images, labels


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translates each image by up to ``max_shift`` pixels in each direction (zero fill),
    drawing the shifts from ``generator`` (on the CPU) so two runs can see identical batches."""
    if max_shift == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    batch = torch.arange(B, device=x.device)[:, None, None, None]
    channel = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]
