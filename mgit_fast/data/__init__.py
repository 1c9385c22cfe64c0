"""Small datasets for the main job: scikit-learn's bundled digits, a synthetic set, CIFAR-10/100
and SVHN from their standard files, and image folders (``folder:PATH``)."""
from .datasets import (
    DATASETS,
    DatasetError,
    Split,
    check_dataset_name,
    dataset_choices_help,
    default_data_dir,
    draw_shifts,
    load_dataset,
    per_class_subset,
    random_shift,
    shift_images,
)

__all__ = [
    "DATASETS",
    "DatasetError",
    "Split",
    "check_dataset_name",
    "dataset_choices_help",
    "default_data_dir",
    "draw_shifts",
    "load_dataset",
    "per_class_subset",
    "random_shift",
    "shift_images",
]
