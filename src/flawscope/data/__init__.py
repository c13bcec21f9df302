"""Data layer: image decoding, dataset layouts, splits and the embedded synthetic dataset."""

from flawscope.data.dataset import Dataset, Sample, open_dataset, split_good
from flawscope.data.images import load_images, read_image, read_mask

__all__ = [
    "Dataset",
    "Sample",
    "load_images",
    "open_dataset",
    "read_image",
    "read_mask",
    "split_good",
]
