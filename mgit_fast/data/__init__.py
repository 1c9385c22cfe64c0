"""Small datasets for the main job: scikit-learn's bundled digits, and a synthetic set."""
from .datasets import DATASETS, Split, load_dataset, random_shift

__all__ = ["DATASETS", "Split", "load_dataset", "random_shift"]
