"""Hardening: edited model files are refused naming the field; one image-decoding policy
(pixel limit checked before decoding, EXIF orientation applied) for library, CLI and service."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from safetensors import safe_open
from safetensors.torch import save_file

from flawscope.cli import main
from flawscope.data import open_dataset
from flawscope.data.images import (
    MAX_PIXELS_ENV,
    decode_image,
    image_dimensions,
    max_image_pixels,
    read_image,
    set_max_image_pixels,
)
from flawscope.errors import ImageReadError, ModelFileError
from flawscope.modelfile import (
    FORMAT_VERSION,
    _header_digest,
    load_model,
    read_metadata,
    upgrade_model_file,
)
from flawscope.pipeline import Inspector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
        "epochs": 1, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def model_file(synthetic_root, tmp_path_factory) -> Path:
    inspector = Inspector.train(open_dataset(synthetic_root / "tile"), "ncae", **TINY)
    return inspector.save(tmp_path_factory.mktemp("hardening") / "tile.safetensors")


def _read(path: Path) -> tuple[dict[str, str], dict]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def edited(
    src: Path, dst: Path, change: Callable[[dict], None], *, reseal: bool = False
) -> Path:
    """A copy of ``src`` with its configuration changed by ``change`` (in place); with
    ``reseal`` the header checksum is recomputed, as a deliberate forger would."""
    meta, tensors = _read(src)
    config = json.loads(meta["config"])
    change(config)
    meta["config"] = json.dumps(config, sort_keys=True)  # NaN/Infinity as Python writes them
    if reseal:
        meta["header_sha256"] = _header_digest(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set(*keys: str, value: object) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        node = config
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


# ---------------------------------------------------------------------------- model files
def test_untouched_file_loads_in_current_format(model_file, caplog):
    meta = read_metadata(model_file)
    assert meta["format_version"] == str(FORMAT_VERSION) and "header_sha256" in meta
    with caplog.at_level(logging.WARNING):
        inspector = Inspector.load(model_file, device="cpu")
    assert not [r for r in caplog.records if "model format" in r.getMessage()]
    assert np.isfinite(inspector.threshold.value)


EDITS = {
    "threshold-nan": (("threshold", "value"), float("nan"), "threshold.value"),
    "threshold-inf": (("threshold", "value"), float("inf"), "threshold.value"),
    "threshold-minus-inf": (("threshold", "value"), float("-inf"), "threshold.value"),
    "threshold-string": (("threshold", "value"), "abc", "threshold.value"),
    "threshold-null": (("threshold", "value"), None, "threshold.value"),
    "threshold-rule": (("threshold", "rule"), "always-ok", "threshold.rule"),
    "normalization-nan": (("normalization", "low"), float("nan"), "normalization.low"),
    "input-size-huge": (("input_size",), [65536, 65536], "input_size"),
    "image-size-huge": (("architecture", "params", "image_size"), 65536,
                        "architecture.params.image_size"),
    "channels": (("channels",), 4, "channels"),
    "unknown-model": (("model",), "resnet-backdoor", "model"),
}


@pytest.mark.parametrize("reseal", [False, True], ids=["plain-edit", "checksum-recomputed"])
@pytest.mark.parametrize("case", list(EDITS))
def test_edited_setting_refused_naming_file_and_field(model_file, tmp_path, case, reseal):
    keys, value, field = EDITS[case]
    bad = edited(model_file, tmp_path / f"{case}.safetensors", _set(*keys, value=value),
                 reseal=reseal)
    with pytest.raises(ModelFileError) as info:
        Inspector.load(bad, device="cpu")
    message = str(info.value)
    assert message.startswith(f"{bad}: {field}: "), message
    assert "\n" not in message
    assert ("header checksum does not match" in message) is not reseal


def test_valid_looking_edit_is_caught_by_the_header_checksum(model_file, tmp_path):
    def lower(config: dict) -> None:
        config["threshold"]["value"] = config["threshold"]["value"] * 10
        config["normalization"]["threshold"] = config["threshold"]["value"]

    bad = edited(model_file, tmp_path / "moved.safetensors", lower)
    with pytest.raises(ModelFileError, match="header checksum mismatch") as info:
        Inspector.load(bad, device="cpu")
    assert str(bad) in str(info.value)


def test_flipped_header_byte_refused(model_file, tmp_path):
    raw = bytearray(model_file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = bytes(raw[8 : 8 + n])
    key = b'\\"n_good\\": '  # inside the config string, whose quotes are escaped
    i = header.index(key) + len(key)
    assert chr(header[i]).isdigit()
    raw[8 + i] = ord("9") if header[i] != ord("9") else ord("8")
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="header checksum mismatch") as info:
        Inspector.load(bad, device="cpu")
    assert str(info.value).startswith(f"{bad}: ")


def test_format_version_not_a_number(model_file, tmp_path):
    meta, tensors = _read(model_file)
    meta["format_version"] = "two"
    bad = tmp_path / "v.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelFileError, match=r"format_version: expected a whole number"):
        load_model(bad)


def _as_format_1(src: Path, dst: Path, change: Callable[[dict], None] | None = None) -> Path:
    """``src`` rewritten as flawscope's format 1 wrote it: ``sha256`` of the tensors only."""
    meta, tensors = _read(src)
    meta.pop("header_sha256")
    meta["format_version"] = "1"
    if change is not None:
        config = json.loads(meta["config"])
        change(config)
        meta["config"] = json.dumps(config, sort_keys=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_old_format_file_loads_with_a_warning_and_upgrades(model_file, tmp_path, caplog):
    old = _as_format_1(model_file, tmp_path / "old.safetensors")
    reference = Inspector.load(model_file, device="cpu")
    with pytest.raises(ModelFileError, match=r"model format 1 has no checksum of its settings"):
        Inspector.load(old, device="cpu")  # refused unless the caller allows it
    with caplog.at_level(logging.WARNING, logger="flawscope.modelfile"):
        inspector = Inspector.load(old, device="cpu", allow_legacy=True)
    assert any("model format 1" in r.getMessage() and str(old) in r.getMessage()
               for r in caplog.records)
    assert inspector.threshold == reference.threshold
    upgrade_model_file(old)
    assert read_metadata(old)["format_version"] == str(FORMAT_VERSION)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flawscope.modelfile"):
        Inspector.load(old, device="cpu")
    assert not caplog.records


def test_old_format_file_settings_are_still_checked(model_file, tmp_path):
    old = _as_format_1(model_file, tmp_path / "old-nan.safetensors",
                       _set("threshold", "value", value=float("nan")))
    with pytest.raises(ModelFileError, match=r"threshold\.value: expected a finite number"):
        Inspector.load(old, device="cpu", allow_legacy=True)
    with pytest.raises(ModelFileError, match="threshold.value"):
        upgrade_model_file(old)  # a file that fails the checks is not re-sealed


def test_cli_prints_one_line_for_an_edited_model(model_file, tmp_path, synthetic_root, capsys):
    bad = edited(model_file, tmp_path / "nan.safetensors",
                 _set("threshold", "value", value=float("nan")))
    image = next((synthetic_root / "tile" / "test" / "good").iterdir())
    assert main(["predict", str(bad), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flawscope: error: {bad}: threshold.value:") and "\n" not in err


def test_service_refuses_to_start_on_an_edited_model(model_file, tmp_path):
    pytest.importorskip("fastapi")
    from flawscope.serve.app import create_app

    bad = edited(model_file, tmp_path / "null.safetensors",
                 _set("threshold", "value", value=None))
    with pytest.raises(ModelFileError, match=r"threshold\.value"):
        create_app(bad, device="cpu")


def test_invalid_model_is_not_written(model_file, tmp_path):
    inspector = Inspector.load(model_file, device="cpu")
    inspector.detector.input_size_ = (65536, 65536)
    with pytest.raises(ModelFileError, match="refusing to write"):
        inspector.save(tmp_path / "never.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left


# ---------------------------------------------------------------------------- images
def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(path: Path, side: int = 10000) -> Path:
    """A valid 1-bit ``side x side`` PNG of zeros: a few tens of KB, ``side**2`` pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
                     + _chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_full_decode(monkeypatch):
    """Fail the test if any image's pixels are decoded."""
    def refuse(self, *a, **k):
        raise AssertionError(f"pixels of a {self.size} image decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# as in the CLI and the service: flawscope.data.images makes Pillow's warning an error (pytest
# resets warning filters per test, so the mark restores it)
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side, expected", [
    (10000, "image is 10000x10000 = 100.0 megapixels; at most 50.0 megapixels"),  # ours
    (20000, "image too large (Image size (400000000 pixels) exceeds limit"),  # Pillow's
    (24000, "image too large (Image size (576000000 pixels) exceeds limit"),  # Pillow's error
])
def test_bomb_refused_from_the_header(tmp_path, no_full_decode, side, expected):
    bomb = bomb_png(tmp_path / "bomb.png", side)
    assert bomb.stat().st_size < 5_000_000
    with pytest.raises(ImageReadError, match="megapixels") as info:
        read_image(bomb)
    assert str(info.value).startswith(f"{bomb}: {expected}")
    assert info.value.reason == "too-large"


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    img = tmp_path / "small.png"
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(img)
    assert read_image(img).shape == (30, 40, 1)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    assert max_image_pixels() == 1000
    with pytest.raises(ImageReadError, match=f"{MAX_PIXELS_ENV}"):
        read_image(img)
    set_max_image_pixels(10**6)  # the module setting wins over the environment
    try:
        assert read_image(img).shape == (30, 40, 1)
    finally:
        set_max_image_pixels(None)
    with pytest.raises(ImageReadError, match="1.2 megapixels|0.0 megapixels"):
        decode_image(img, max_pixels=1000)  # an explicit limit wins over both


def test_cli_refuses_a_bomb_with_one_line(model_file, tmp_path, capsys, no_full_decode):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert main(["predict", str(model_file), str(bomb)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flawscope: error: {bomb}: image is 10000x10000") and "\n" not in err


def _exif_jpeg(path: Path, arr: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())
    return path


@pytest.fixture
def sideways(tmp_path) -> tuple[Path, np.ndarray]:
    """A 20 x 40 (h x w) JPEG stored sideways: orientation 6 = rotate 90 degrees clockwise
    to show it; returns the path and the upright pixels (40 x 20)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    arr[:5, :, 0] = 255  # a red band on top, so the rotation direction shows
    upright = np.rot90(arr, k=-1)
    return _exif_jpeg(tmp_path / "sideways.jpg", arr, 6), upright


def test_exif_orientation_applied(sideways):
    path, upright = sideways
    out = read_image(path)
    assert out.shape == upright.shape == (40, 20, 3)
    assert np.abs(out.astype(int) - upright.astype(int)).mean() < 8
    assert image_dimensions(path) == (40, 20)
    resized = read_image(path, size=(16, 8))
    assert resized.shape == (16, 8, 3)


def test_service_decodes_like_the_library(sideways, tmp_path):
    pytest.importorskip("fastapi")
    from flawscope.serve.app import UploadError, decode_upload

    path, _ = sideways
    arr, (w, h) = decode_upload(path.read_bytes(), "sideways.jpg", channels=3, size=(40, 20),
                                max_pixels=10**6)
    assert (w, h) == (20, 40)
    np.testing.assert_array_equal(arr, read_image(path, channels=3, size=(40, 20)))
    bomb = bomb_png(tmp_path / "bomb.png").read_bytes()
    with pytest.raises(UploadError) as info:
        decode_upload(bomb, "bomb.png", channels=1, size=(32, 32), max_pixels=50_000_000)
    assert info.value.status == 422 and "bomb.png: image is 10000x10000" in info.value.message
    with pytest.raises(UploadError) as info:
        decode_upload(b"hello", "x.png", channels=1, size=(32, 32), max_pixels=10**6)
    assert info.value.status == 415


def test_fit_reads_images_upright(tmp_path):
    from flawscope.data.source import image_shapes, to_array

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:5] = 200
    paths = [_exif_jpeg(tmp_path / f"{i}.jpg", arr, 8) for i in range(2)]
    assert image_shapes(paths) == [(40, 20), (40, 20)]
    batch = to_array(paths, (40, 20), 1)
    assert batch.shape == (2, 1, 40, 20)
    # orientation 8 (rotate 90 degrees counter-clockwise to show): the bright top band of the
    # stored image becomes the left columns
    assert batch[0, 0, :, :4].mean() > 150 and batch[0, 0, :, -4:].mean() < 50


def test_classifier_header_checked(tmp_path):
    import torch

    from flawscope.modelfile import save_model

    config = {"labels": ["a-good", "a-bad"], "backbone": "resnet18", "image_size": [64, 64],
              "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "fold_count": 1}
    good = save_model(tmp_path / "c.safetensors", "classifier", config, {"w": torch.zeros(2)})
    assert load_model(good, kind="classifier")[0] == config
    for field, value in (("image_size", 65536), ("std", [0.2, 0.0, 0.2]),
                         ("mean", [float("nan")] * 3), ("labels", None)):
        bad = edited(good, tmp_path / f"{field}.safetensors", _set(field, value=value))
        with pytest.raises(ModelFileError, match=rf"^{bad}: {field}(\[\d\])?: "):
            load_model(bad, kind="classifier")


def _verdicts(model: Path, images: list[Path], capsys, *flags: str) -> list[str]:
    capsys.readouterr()
    assert main(["predict", str(model), *map(str, images), "--json", "--device", "cpu",
                 *flags]) == 0
    return [o["verdict"] for o in json.loads(capsys.readouterr().out)]


def test_downgrade_to_format_1_is_not_a_way_around_the_header_checksum(
        model_file, tmp_path, synthetic_root, capsys):
    """Edit the threshold, set format_version 1, drop header_sha256: refused, not a warning."""
    images = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))[:3]
    forged = _as_format_1(model_file, tmp_path / "forged.safetensors",
                          _set("threshold", "value", value=1e9))
    assert main(["predict", str(forged), *map(str, images), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flawscope: error: {forged}: model format 1 has no checksum of its "
                          "settings") and "--allow-legacy-model" in err and "\n" not in err
    for load in (lambda p: Inspector.load(p, device="cpu"), load_model):
        with pytest.raises(ModelFileError, match=r"format 1 .* refused"):
            load(forged)
    # the explicit flag loads it as it is (the user vouches for it), with the warning
    assert _verdicts(forged, images, capsys, "--allow-legacy-model") == ["ok"] * 3


def test_cli_modelfile_upgrade_re_signs_only_intact_files(model_file, tmp_path, capsys):
    old = _as_format_1(model_file, tmp_path / "old.safetensors")
    new = tmp_path / "new.safetensors"
    assert main(["modelfile", "upgrade", str(old), "-o", str(new)]) == 0
    out = capsys.readouterr().out.strip()
    threshold = Inspector.load(model_file, device="cpu").threshold.value
    assert out.startswith(f"{new}: model format 1 -> {FORMAT_VERSION}, re-signed; threshold "
                          f"{threshold:.6g}")
    assert read_metadata(new)["format_version"] == str(FORMAT_VERSION)
    Inspector.load(new, device="cpu")  # loads without any flag
    broken = _as_format_1(model_file, tmp_path / "nan.safetensors",
                          _set("threshold", "value", value=float("nan")))
    edited_v2 = edited(model_file, tmp_path / "edited.safetensors",
                       _set("threshold", "value", value=1e9))
    for bad, problem in ((broken, "threshold.value: expected a finite number"),
                         (edited_v2, "header checksum mismatch")):
        before = bad.read_bytes()
        assert main(["modelfile", "upgrade", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"flawscope: error: {bad}: ") and problem in err
        assert bad.read_bytes() == before  # not re-signed
    assert main(["modelfile", "upgrade", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such model file" in capsys.readouterr().err
