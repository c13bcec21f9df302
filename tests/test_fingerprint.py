"""Training-image fingerprints: exact copies are recognised, other images are not."""

from __future__ import annotations

import shutil

import numpy as np

from conftest import write_png
from flawscope.data.fingerprint import describe_seen, fingerprints, seen_before


def test_copies_are_found_and_others_not(tmp_path):
    rng = np.random.default_rng(0)
    paths = [write_png(tmp_path / f"train/{i}.png", rng.integers(0, 255, (16, 16), np.uint8))
             for i in range(4)]
    known = fingerprints(paths)
    assert known.dtype == np.int64 and len(set(known.tolist())) == 4
    copy = tmp_path / "calib/copy_of_2.png"
    copy.parent.mkdir()
    shutil.copy(paths[2], copy)
    fresh = write_png(tmp_path / "calib/new.png", rng.integers(0, 255, (16, 16), np.uint8))
    candidates = [fresh, copy]
    index = seen_before(candidates, known)
    assert index == [1]
    assert describe_seen(candidates, index) == "copy_of_2.png"
    assert seen_before(candidates, np.zeros(0, np.int64)) == []


def test_arrays_fingerprint_their_pixels():
    a = np.zeros((2, 1, 8, 8), np.uint8)
    a[1, 0, 0, 0] = 1
    f = fingerprints(a)
    assert f[0] != f[1] and fingerprints(a[:1])[0] == f[0]
