"""Shared fixtures: a small synthetic dataset generated once per session, real-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flawscope.data.dataset import Dataset, open_dataset
from flawscope.data.images import read_mask
from flawscope.data.source import to_array
from flawscope.data.synthetic import generate_dataset

try:  # the "export" extra (onnx, onnxruntime) is optional
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    _NO_ONNX = ""
except ImportError as exc:
    _NO_ONNX = f"onnx / onnxruntime not installed ({exc}): pip install 'flawscope[export]'"

#: mark for tests that run onnxruntime; they skip, saying why, without the export extra
needs_ort = pytest.mark.skipif(bool(_NO_ONNX), reason=_NO_ONNX or "installed")

# `fit` and `calibrate` export every model they write to ONNX for onnxruntime (seconds per
# model): the suite turns that off, and tests/test_fastruntime.py turns it on where it is the
# point. Exports go to a temporary cache, never the user's ~/.cache.
os.environ["FLAWSCOPE_PREPARE_RUNTIME"] = "0"


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Path:
    """``$FLAWSCOPE_CACHE`` for the session: a temporary folder."""
    root = tmp_path_factory.mktemp("flawscope-cache")
    os.environ["FLAWSCOPE_CACHE"] = str(root)
    return root


SHARED_DATA = Path(os.environ.get("FLAWSCOPE_DATA", Path(__file__).parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Both synthetic categories, small: 24 train / 8 test-good / 3 per defect, 64 px."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_dataset(root / "data", n_train=24, n_test_good=8, n_test_per_defect=3,
                            image_size=64, seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared 2-core machine, two spinning threads stall
    each other. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tile(synthetic_root) -> Dataset:
    """The synthetic gray ``tile`` category."""
    return open_dataset(synthetic_root / "tile")


@pytest.fixture(scope="session")
def tile_arrays(tile) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``tile`` at 64 px, gray: train images, test images, test labels, test masks."""
    train = to_array(tile.train, 64, 1)
    test = to_array(tile.test, 64, 1)
    labels = np.array([s.label for s in tile.test])
    masks = np.stack([read_mask(s.mask_path, (64, 64)) for s in tile.test])
    return train, test, labels, masks


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
