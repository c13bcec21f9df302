"""Model files: round trip, atomic writes, and refusal of foreign, altered or unsafe files."""

from __future__ import annotations

import pickle

import pytest
import torch

from flawscope.errors import ModelFileError
from flawscope.io import atomic_write_text
from flawscope.modelfile import FORMAT_VERSION, load_model, read_metadata, save_model


def test_roundtrip(tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    p = save_model(tmp_path / "m.safetensors", "blob", {"x": [1, 2], "y": "z"}, t)
    config, tensors = load_model(p, kind="blob")
    assert config == {"x": [1, 2], "y": "z"}
    assert torch.equal(tensors["a"], t["a"]) and torch.equal(tensors["b"], t["b"])
    assert read_metadata(p)["format"] == "flawscope-model"
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left


def test_wrong_kind(tmp_path):
    p = save_model(tmp_path / "m", "blob", {}, {"a": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="blob model, expected a detector"):
        load_model(p, kind="detector")


def test_tampered_tensor_bytes_refused(tmp_path):
    p = save_model(tmp_path / "m", "blob", {}, {"a": torch.zeros(64)})
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the tensor data
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum") as info:
        load_model(p)
    assert str(p) in str(info.value)


def test_truncated_file_refused(tmp_path):
    p = save_model(tmp_path / "m", "blob", {}, {"a": torch.zeros(64)})
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(ModelFileError, match=str(p)):
        load_model(p)


def test_pickle_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelFileError, match="not a flawscope model"):
        load_model(p)
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ModelFileError, match="not a flawscope model"):
        load_model(tmp_path / "plain.pt")
    assert not marker.exists()


def test_foreign_safetensors_and_missing(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ModelFileError, match="no flawscope metadata"):
        load_model(p)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a flawscope model"):
        load_model(empty)


def test_newer_format_version_refused(tmp_path):
    p = save_model(tmp_path / "m", "blob", {}, {"a": torch.zeros(1)})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    old = f'"format_version":"{FORMAT_VERSION}"'.encode()
    assert old in header
    p.write_bytes(raw[:8] + header.replace(old, b'"format_version":"9"') + raw[8 + n :])
    with pytest.raises(ModelFileError, match="upgrade flawscope"):
        load_model(p)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = atomic_write_text(tmp_path / "r.txt", "old")

    def boom(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    from flawscope.io import atomic_write

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, boom)
    assert p.read_text() == "old" and not list(tmp_path.glob(".*tmp"))
