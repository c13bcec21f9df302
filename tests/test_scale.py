"""Scaling out without Ray: sources, the Parquet results folder, scoring rows from decoded
bytes, the fit-many manifest and its local engine, and that plain commands never import Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_png
from flawscope.cli import main
from flawscope.errors import ConfigError

pa = pytest.importorskip("pyarrow", reason="the ray extra (pyarrow) is not installed")

TINY = ["--image-size", "32", "--epochs", "2", "--device", "cpu", "--quiet",
        "--param", "widths=[8,16]", "--param", "latent_channels=8", "--param", "batch_size=8"]
SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture(scope="module")
def model(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "tile.safetensors"
    assert main(["fit", str(synthetic_root / "tile"), "--model", "ncae", "-o", str(out),
                 *TINY]) == 0
    return out


# ---------------------------------------------------------------------------- sources
def test_sources_folder_glob_list_and_uri(synthetic_root, tmp_path):
    from flawscope.data.images import expand_images
    from flawscope.scale.sources import resolve_sources

    folder = synthetic_root / "tile" / "test"
    expected = [str(p.absolute()) for p in expand_images([folder])]
    assert resolve_sources([str(folder)]).names == expected  # the files plain predict scores
    assert resolve_sources([f"file://{folder.absolute()}"]).names == expected
    hole = resolve_sources([str(folder / "*" / "00[01].png")]).names
    assert hole == sorted(str(p.absolute()) for p in folder.glob("*/00[01].png"))
    assert len(hole) == 10
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    first = Path(expected[0])
    listing.write_text(f"# line 3 is relative to this file\n\n{first}\n"
                       f"{os.path.relpath(expected[1], listing.parent)}\n{first}\n"
                       "missing.png\n")
    names = resolve_sources([str(listing)]).names
    assert names == [expected[0], expected[1], str((listing.parent / "missing.png").absolute())]


def test_sources_errors_name_the_item(tmp_path):
    from flawscope.scale.sources import resolve_sources

    with pytest.raises(ConfigError, match="nowhere: no such file or folder"):
        resolve_sources([str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match=r"\*\.png: no files match"):
        resolve_sources([str(tmp_path / "*.png")])
    with pytest.raises(ConfigError, match="cannot open this URI"):
        resolve_sources(["nosuchscheme://bucket/x"])
    listing = tmp_path / "l.txt"
    listing.write_text("/a.png\ns3://bucket/b.png\n")
    with pytest.raises(ConfigError, match=r"l\.txt, line 2: .* one run reads one filesystem"):
        resolve_sources([str(listing)])


# ---------------------------------------------------------------------------- rows
def test_predict_on_decoded_bytes_equals_predict_on_files(model, synthetic_root, tmp_path):
    """The Ray worker's path: flawscope decodes (here from a filesystem that hands out bytes),
    ``inspector.predict`` scores the array with each file's name and original size. Rows must
    equal plain ``predict`` on the files, regions in original-image pixels included."""
    from pyarrow import fs as pafs

    from flawscope.runtime import load_any_model
    from flawscope.scale.batch import score_rows
    from flawscope.scale.sources import ImageList

    folder = synthetic_root / "tile" / "test"
    files = sorted(folder.rglob("*.png"))
    big = write_png(tmp_path / "big.png",  # another original size than the others
                    np.kron(np.asarray(Image.open(files[0])), np.ones((3, 2), np.uint8)))
    files = [*files, big]
    inspector = load_any_model(model, device="cpu")
    options = {"min_region_area": 1}
    expected = [p.to_row() for p in inspector.predict([str(f) for f in files], **options)]
    assert any(r["n_regions"] for r in expected)  # regions are compared, not only scores
    names = [str(f) for f in files]
    remote = ImageList(names, pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()), "mem://")
    rows = score_rows(inspector, ["mem://" + n.lstrip("/") for n in names], remote, options)
    for row, want in zip(rows, expected):
        assert row == {**want, "path": "mem://" + want["path"].lstrip("/")}
    local = score_rows(inspector, names, ImageList(names), options)
    assert local == expected


def test_bad_images_become_error_rows(model, synthetic_root, tmp_path):
    from flawscope.runtime import load_any_model
    from flawscope.scale.batch import score_rows
    from flawscope.scale.sources import ImageList

    good = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    names = [str(good[0]), str(broken), str(tmp_path / "gone.png"), str(empty), str(good[1])]
    rows = score_rows(load_any_model(model, device="cpu"), names, ImageList(names), {})
    assert [r["path"] for r in rows] == names
    assert [r.get("error") is None for r in rows] == [True, False, False, False, True]
    assert "broken.png" in rows[1]["error"] and "gone.png: no such file" in rows[2]["error"]
    assert "empty file" in rows[3]["error"]
    assert rows[4]["score"] is not None


def test_results_folder_types_identity_and_error_retry(tmp_path):
    import pyarrow.parquet as pq

    from flawscope.pipeline import ROW_COLUMNS
    from flawscope.scale.results import ResultsFolder, error_row

    scored = {"path": "/a.png", "score": repr(0.1 + 0.2), "normalized_score": "0.250000",
              "threshold": repr(1 / 3), "verdict": "ok", "n_regions": 0,
              "largest_region_area_px": 0, "regions": "[]"}
    out = ResultsFolder(tmp_path / "r.parquet", {"model_sha256": "abc"})
    out.write_part([scored, error_row("/b.png", "/b.png: corrupt")])
    out.write_part([error_row("/c.png", "/c.png: missing")])
    table = pq.read_table(tmp_path / "r.parquet")  # the folder reads as one table
    assert table.column_names == [*ROW_COLUMNS, "error"]
    assert table.column("score").to_pylist()[0] == 0.1 + 0.2  # full precision
    assert table.schema.field("n_regions").type == pa.int64()
    assert out.scored_and_failed() == ({"/a.png"}, {"/b.png", "/c.png"})
    assert out.drop_error_rows({"/b.png", "/c.png"}) == 2
    assert len(out.parts()) == 1  # the part holding only /c.png is gone
    assert pq.read_table(tmp_path / "r.parquet").column("path").to_pylist() == ["/a.png"]
    with pytest.raises(ConfigError, match="model_sha256='abc', this run has 'xyz'"):
        ResultsFolder(tmp_path / "r.parquet", {"model_sha256": "xyz"}).scored_and_failed()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        ResultsFolder(tmp_path / "file", {})


# ---------------------------------------------------------------------------- fit-many
def _manifest(tmp_path: Path, synthetic_root: Path, rows: list[str]) -> Path:
    path = tmp_path / "parts.csv"
    path.write_text("name,data,output,model,image_size,epochs,params\n" + "\n".join(rows))
    return path


NCAE = 'ncae,32,2,"{""widths"": [8, 16], ""latent_channels"": 8, ""batch_size"": 8}"'


def test_manifest_errors_are_one_line(tmp_path, synthetic_root):
    from flawscope.scale.fit_many import read_manifest

    bad = tmp_path / "bad.csv"
    bad.write_text("name,data\nA,x\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: the manifest needs the column\(s\) output"):
        read_manifest(bad)
    bad.write_text("data,output,imagesize\nx,y,64\n")
    with pytest.raises(ConfigError, match="unknown column.* imagesize"):
        read_manifest(bad)
    bad.write_text("data,output\nx,m.safetensors\ny,./m.safetensors\n")
    with pytest.raises(ConfigError, match="lines 2 and 3: both write"):
        read_manifest(bad)
    manifest = _manifest(tmp_path, synthetic_root, [
        f"A,{synthetic_root / 'tile'},a.safetensors,{NCAE}",
        f"B,,b.safetensors,{NCAE}",
        'C,d,c.safetensors,ncae,32,2,"[1, 2]"',
    ])
    jobs = read_manifest(manifest, device="cpu")
    assert jobs[0].error is None and jobs[0].output == str(tmp_path / "a.safetensors")
    assert jobs[0].options == {"device": "cpu", "widths": [8, 16], "latent_channels": 8,
                               "batch_size": 8, "image_size": 32, "epochs": 2}
    assert jobs[1].error == "line 3: the data cell is empty"
    assert jobs[2].error == "line 4: params '[1, 2]': expected a JSON object"


@pytest.mark.slow  # two small fits
def test_fit_many_local_isolates_a_failing_row(tmp_path, synthetic_root, capsys):
    manifest = _manifest(tmp_path, synthetic_root, [
        f"tile,{synthetic_root / 'tile'},models/tile.safetensors,{NCAE}",
        f"ghost,{tmp_path / 'no-such-data'},models/ghost.safetensors,{NCAE}",
        f"washer,{synthetic_root / 'washer'},models/washer.safetensors,{NCAE}",
    ])
    summary = tmp_path / "summary.csv"
    rc = main(["fit-many", str(manifest), "--json", "--summary", str(summary), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1  # a row failed, the others are written
    rows = json.loads(captured.out)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "no-such-data: no such folder" in rows[1]["error"]
    for r in (rows[0], rows[2]):
        assert Path(r["output"]).is_file() and 0.0 <= r["image_auroc"] <= 1.0
        assert r["fit_seconds"] > 0 and r["n_train"] == 24
    assert not (tmp_path / "models" / "ghost.safetensors").exists()
    assert "[1/3] tile: fitting ncae" in captured.err and "ghost: FAILED" in captured.err
    assert summary.read_text().splitlines()[0].startswith("name,model,output,status")
    from flawscope.pipeline import Inspector

    assert Inspector.load(rows[2]["output"]).model_name == "ncae"


# ---------------------------------------------------------------------------- local first
def test_plain_commands_never_import_ray(model, synthetic_root, tmp_path):
    """predict without --engine ray (and fit-many's local engine, and --help) leave Ray out."""
    code = (
        "import sys\nfrom flawscope.cli import main\n"
        f"rc = main(['predict', {str(model)!r}, {str(synthetic_root / 'tile/test/good')!r}, "
        "'--device', 'cpu', '--csv', " + repr(str(tmp_path / "p.csv")) + "])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\nprint('no ray')\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("no ray")


def test_ray_options_without_the_ray_engine_are_refused(model, synthetic_root, capsys):
    folder = str(synthetic_root / "tile" / "test" / "good")
    assert main(["predict", str(model), folder, "-o", "r.parquet"]) == 2
    assert "-o: only with --engine ray" in capsys.readouterr().err
    assert main(["predict", str(model), folder, "--engine", "ray", "--csv", "x.csv",
                 "-o", "r.parquet"]) == 2
    assert "--csv: not with --engine ray" in capsys.readouterr().err
    assert main(["predict", str(model), folder, "--engine", "ray"]) == 2
    assert "--engine ray needs -o" in capsys.readouterr().err


def test_cli_constants_match_the_library():
    from flawscope.cli import scale as cli_scale
    from flawscope.scale import batch, fit_many

    assert cli_scale.DEFAULT_BATCH_SIZE == batch.DEFAULT_BATCH_SIZE
    assert cli_scale.ENGINES == fit_many.ENGINES


def test_unreachable_address_fails_at_once():
    import socket

    from flawscope.scale.cluster import check_reachable

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"--address {address}: no Ray cluster answers"):
            check_reachable(address)
    check_reachable("auto")  # left to Ray
