"""Shared fixtures: a small synthetic dataset generated once per session, real-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.data.synthetic import generate_dataset

SHARED_DATA = Path(os.environ.get("FLAWSCOPE_DATA", Path(__file__).parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Both synthetic categories, small: 24 train / 8 test-good / 3 per defect, 64 px."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_dataset(root / "data", n_train=24, n_test_good=8, n_test_per_defect=3,
                            image_size=64, seed=0)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def shared_data(name: str) -> Path:
    """Path of a real dataset under FLAWSCOPE_DATA, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (set FLAWSCOPE_DATA to its parent folder)")
    return path
