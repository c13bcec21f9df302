"""The Ray engine on a real local Ray instance (2 CPUs): scores identical to ``predict``,
resume, error rows, a worker killed mid-run, and fit-many with a failing row."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_ort, write_png
from flawscope.cli import main
from flawscope.errors import ConfigError

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'flawscope[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'flawscope[ray]'")
pq = pytest.importorskip("pyarrow.parquet")

# predict in this process with one torch thread, as each worker (--cpus-per-worker 1): CPU
# kernels may round the last float32 bit differently with another thread count or batch
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

TINY = ["--image-size", "32", "--epochs", "2", "--device", "cpu", "--quiet",
        "--param", "widths=[8,16]", "--param", "latent_channels=8", "--param", "batch_size=8"]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (short temp path: Ray's socket names must fit)."""
    temp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp,
             object_store_memory=200 * 1024**2, logging_level=logging.WARNING)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def model(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale-ray") / "tile.safetensors"
    assert main(["fit", str(synthetic_root / "tile"), "--model", "ncae", "-o", str(out),
                 *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def archive(synthetic_root, tmp_path_factory) -> Path:
    """130 images (the tile test images, copied) and one at another size: three blocks of 64."""
    folder = tmp_path_factory.mktemp("archive")
    test = sorted((synthetic_root / "tile" / "test").rglob("*.png"))
    for i in range(130):
        shutil.copy(test[i % len(test)], folder / f"{i:03d}.png")
    first = np.asarray(Image.open(test[0]))
    write_png(folder / "big.png", np.kron(first, np.ones((3, 2), np.uint8)))
    return folder


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def read_results(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_scores_identical_to_predict(ray_local, model, archive, tmp_path, capsys):
    plain = tmp_path / "plain.csv"
    assert main(["predict", str(model), str(archive), "--csv", str(plain), "--device", "cpu",
                 "--min-region-area", "1"]) == 0
    out = tmp_path / "results.parquet"
    assert main(["predict", str(model), str(archive), "--engine", "ray", "-o", str(out),
                 "--device", "cpu", "--min-region-area", "1", "--workers", "2"]) == 0
    assert "131 images scored" in capsys.readouterr().out
    want = read_csv(plain)
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(want)  # each image once
    assert sum(r["n_regions"] > 0 for r in rows) >= 5  # regions are compared too
    for r in rows:
        w = want[r["path"]]
        assert r["error"] is None
        assert r["score"] == float(w["score"]), r["path"]  # bit for bit
        assert r["threshold"] == float(w["threshold"])
        assert r["normalized_score"] == float(w["normalized_score"])
        assert (r["verdict"], str(r["n_regions"]), str(r["largest_region_area_px"]),
                r["regions"]) == (w["verdict"], w["n_regions"], w["largest_region_area_px"],
                                  w["regions"])


def test_resume_retries_errors_and_skips_scored(ray_local, model, archive, tmp_path, capsys):
    from flawscope.scale.batch import score_archive

    images = sorted(archive.glob("0*.png"))[:40]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    late = tmp_path / "late.png"  # missing at the first run, there at the second
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(map(str, [*images[:20], broken, late])) + "\n")
    out = tmp_path / "r.parquet"
    first = score_archive(model, [str(listing)], out, device="cpu", batch_size=7)
    assert (first.done, first.errors, first.already) == (22, 2, 0)
    errors = {r["path"]: r["error"] for r in read_results(out) if r["error"]}
    assert set(errors) == {str(broken), str(late)}
    assert "late.png: no such file" in errors[str(late)]
    assert all(r["score"] is None for r in read_results(out) if r["error"])

    shutil.copy(images[0], late)
    listing.write_text("\n".join(map(str, [*images, broken, late])) + "\n")
    second = score_archive(model, [str(listing)], out, device="cpu", batch_size=7)
    assert (second.already, second.todo, second.done, second.errors) == (20, 22, 22, 1)
    rows = read_results(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 42  # one row per image, old error rows replaced
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(late)]["error"] is None and by_path[str(broken)]["error"]

    plain = tmp_path / "plain.csv"
    assert main(["predict", str(model), *map(str, [*images, late]), "--csv", str(plain),
                 "--device", "cpu"]) == 0
    for path, w in read_csv(plain).items():  # other blocks than predict's: last bits may move
        assert by_path[path]["score"] == pytest.approx(float(w["score"]), rel=1e-5)
        assert by_path[path]["verdict"] == w["verdict"]

    third = score_archive(model, [str(listing)], out, device="cpu")
    assert (third.already, third.todo, third.done) == (41, 1, 1)  # only the broken one again
    with pytest.raises(ConfigError, match="resume only with the same model and options"):
        score_archive(model, [str(listing)], out, device="cpu",
                      region_options={"min_region_area": 5})


def _map_workers(raylet: int) -> list[int]:
    """Pids of this Ray instance's Ray Data map actors (children of its raylet)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("PPid:")))
        if ppid == raylet and cmd.startswith(b"ray::MapWorker"):
            pids.append(int(entry))
    return pids


def test_killed_worker_job_finishes_every_image_once(ray_local, model, archive, tmp_path):
    from flawscope.scale.batch import score_archive

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    killed: list[tuple[int, int]] = []

    def kill_one(summary) -> None:
        if not killed:
            victims = _map_workers(raylet)
            assert victims, "no map worker found to kill"
            os.kill(victims[0], signal.SIGKILL)
            killed.append((victims[0], summary.done))

    out = tmp_path / "k.parquet"
    s = score_archive(model, [str(archive)], out, device="cpu", batch_size=2, workers=2,
                      progress=kill_one)
    assert killed and killed[0][1] < 131, "the worker was not killed during the run"
    rows = read_results(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 131 == s.done
    assert all(r["error"] is None for r in rows)


def test_fit_many_on_ray_isolates_failing_rows(ray_local, synthetic_root, tmp_path, capsys):
    ncae = '"{""widths"": [8, 16], ""latent_channels"": 8, ""batch_size"": 8}"'
    manifest = tmp_path / "parts.csv"
    manifest.write_text(
        "name,data,output,model,image_size,epochs,coreset_ratio,params\n"
        f"tile,{synthetic_root / 'tile'},m/tile.safetensors,ncae,32,2,,{ncae}\n"
        f"bad-option,{synthetic_root / 'tile'},m/bad.safetensors,ncae,32,2,0.1,{ncae}\n"
        f"washer,{synthetic_root / 'washer'},m/washer.safetensors,ncae,32,2,,{ncae}\n"
        f"no-data,{tmp_path / 'nothing'},m/none.safetensors,ncae,32,2,,{ncae}\n")
    rc = main(["fit-many", str(manifest), "--engine", "ray", "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1
    rows = json.loads(captured.out)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed"]
    assert "unknown option(s) coreset_ratio" in rows[1]["error"]
    assert "nothing: no such folder" in rows[3]["error"]
    for r in (rows[0], rows[2]):
        assert Path(r["output"]).is_file() and 0.0 <= r["image_auroc"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["tile.safetensors",
                                                                  "washer.safetensors"]
    assert "[4/4]" in captured.err and "2 of 4 models fitted" in captured.err


@needs_ort
def test_onnx_model_scores_as_predict(ray_local, model, synthetic_root, tmp_path, capsys):
    """An exported .onnx runs on onnxruntime in the workers, as in plain predict."""
    onnx_path = tmp_path / "tile.onnx"
    assert main(["export", str(model), "--format", "onnx", "-o", str(onnx_path),
                 "--exporter", "torchscript"]) == 0
    folder = synthetic_root / "tile" / "test"
    plain = tmp_path / "plain.csv"
    assert main(["predict", str(onnx_path), str(folder), "--csv", str(plain)]) == 0
    out = tmp_path / "onnx.parquet"
    assert main(["predict", str(onnx_path), str(folder), "--engine", "ray", "-o", str(out)]) == 0
    capsys.readouterr()
    want = read_csv(plain)
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(want)
    for r in rows:
        w = want[r["path"]]
        assert r["score"] == pytest.approx(float(w["score"]), rel=1e-6)
        assert (r["verdict"], r["regions"]) == (w["verdict"], w["regions"])
