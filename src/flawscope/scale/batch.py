"""``predict --engine ray``: an archive scored on Ray Data, the model loaded once per worker.

The image names (:mod:`flawscope.scale.sources`) become a Ray dataset of blocks of
``batch_size`` names (one row each); ``map_batches`` runs :class:`ImageScorer` on a pool of
actors. Each actor
loads the model once (:func:`flawscope.runtime.load_any_model`, as ``predict``), reads and
decodes its images with flawscope's decoder at the model's input size and channels (what
``predict`` gives the model), and scores them with ``inspector.predict``; rows are
:meth:`~flawscope.pipeline.Prediction.to_row`. So the scores are those of ``predict``.
An image that cannot be read, decoded or scored becomes an error row; the job goes on.

The driver writes the rows it receives as Parquet parts (:mod:`flawscope.scale.results`):
images already scored in the output are skipped (resume) and earlier error rows are tried
again. A worker that dies is restarted by Ray and its block scored again, so every image has
one row.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flawscope.errors import ConfigError, FlawscopeError, ModelFileError
from flawscope.scale.cluster import check_reachable, require_ray
from flawscope.scale.sources import ImageList, resolve_sources

require_ray()  # before pyarrow is imported below: the install hint, not a traceback
from flawscope.scale.results import ResultsFolder, error_row, rows_to_table  # noqa: E402

DEFAULT_BATCH_SIZE = 64
#: rows gathered before a part file is written (also written every FLUSH_SECONDS)
FLUSH_ROWS = 5000
FLUSH_SECONDS = 60.0
#: predict-time region options (``predict --min-region-area`` ...)
REGION_OPTIONS = ("min_region_area", "mm_per_pixel", "min_region_mm2")

Progress = Callable[["ScoreSummary"], None]


@dataclass
class ScoreSummary:
    """What a scoring run did (``done`` counts rows written by this run)."""

    output: Path
    total: int  # images in SOURCE
    already: int  # scored in an earlier run: skipped
    todo: int  # to score in this run (including earlier error rows tried again)
    done: int = 0
    errors: int = 0
    defects: int = 0
    workers: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else math.nan


def load_model_file(path: str | Path, device: str = "auto", threads: int | None = None) -> Any:
    """The model of ``path`` as ``predict`` loads it (:func:`~flawscope.runtime.load_any_model`);
    an ``.onnx`` file with ``threads`` onnxruntime threads."""
    from flawscope.runtime import OnnxInspector, is_onnx_file, load_any_model

    if threads and Path(path).is_file() and is_onnx_file(path):
        return OnnxInspector(path, device=device, threads=threads)
    return load_any_model(path, device=device)


def read_and_decode(
    name: str, images: ImageList, size: tuple[int, int], channels: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as ``predict`` decodes it: ``(uint8 H x W x C at size, original (h, w))``."""
    from flawscope.data.images import decode_image

    if images.filesystem is None:
        arr, (w, h) = decode_image(Path(name), channels=channels, size=size)
    else:
        try:
            with images.filesystem.open_input_file(images.fs_path(name)) as fh:
                data = fh.read()
        except Exception as exc:  # missing, permissions, network
            raise ConfigError(f"{name}: cannot be read ({exc})") from None
        arr, (w, h) = decode_image(data, name, channels=channels, size=size)
    return arr, (h, w)


def score_rows(
    inspector: Any, names: list[str], images: ImageList, region_options: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows (:meth:`Prediction.to_row`, or error rows) of ``names``, in their order."""
    size, channels = inspector.input_size, inspector.channels
    rows: list[dict[str, Any] | None] = [None] * len(names)
    decoded, where = [], []
    for i, name in enumerate(names):
        try:
            decoded.append(read_and_decode(name, images, size, channels))
            where.append(i)
        except FlawscopeError as exc:
            rows[i] = error_row(name, str(exc))
        except Exception as exc:  # whatever else a damaged file provokes: its row, not the job
            rows[i] = error_row(name, f"{name}: unreadable ({type(exc).__name__}: {exc})")
    if decoded:
        # stacked as flawscope.data.images.load_images does: for gray images the strides of
        # this array (not only its values) decide torch's kernels, and so the last float bits
        pixels = np.ascontiguousarray(np.stack([a for a, _ in decoded]).transpose(0, 3, 1, 2))
        sizes = [s for _, s in decoded]
        kept = [names[i] for i in where]
        try:
            preds = inspector.predict(pixels, paths=kept, image_sizes=sizes, **region_options)
        except Exception:  # find the image that fails; the others are scored
            preds = []
            for j, name in enumerate(kept):
                try:
                    preds += inspector.predict(pixels[j : j + 1], paths=[name],
                                               image_sizes=sizes[j : j + 1], **region_options)
                except Exception as exc:
                    preds.append(error_row(name, f"{name}: scoring failed "
                                                 f"({type(exc).__name__}: {exc})"))
        for i, pred in zip(where, preds):
            rows[i] = pred if isinstance(pred, dict) else pred.to_row()
    return rows  # type: ignore[return-value]


class ImageScorer:
    """The Ray Data actor: the model loaded once; a batch of names -> a table of rows."""

    def __init__(
        self,
        model: list[Any],
        model_name: str,
        images: ImageList,
        region_options: dict[str, Any],
        device: str = "auto",
        threads: int = 1,
    ) -> None:
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        data = ray.get(model[0])  # the model file's bytes, from the object store
        folder = tempfile.mkdtemp(prefix="flawscope-model-")
        try:
            path = Path(folder) / Path(model_name).name
            path.write_bytes(data)
            self.inspector = load_model_file(path, device, threads)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.images = images
        self.region_options = region_options

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        names = [str(n) for chunk in batch["paths"] for n in chunk]
        return rows_to_table(score_rows(self.inspector, names, self.images, self.region_options))


def model_identity(data: bytes, region_options: dict[str, Any]) -> dict[str, Any]:
    """What a results folder must agree with to be resumed."""
    return {"model_sha256": hashlib.sha256(data).hexdigest(),
            "region_options": {k: region_options.get(k) for k in REGION_OPTIONS}}


def score_archive(
    model: str | Path,
    sources: list[str],
    output: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    region_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    flush_rows: int = FLUSH_ROWS,
    flush_seconds: float = FLUSH_SECONDS,
) -> ScoreSummary:
    """Score the images of ``sources`` with ``model`` on Ray; rows go to the Parquet folder
    ``output`` (see the module docstring). ``address``: a Ray cluster (default: the one this
    process is connected to, else a local instance). ``workers``: actors, each with
    ``cpus_per_worker`` CPUs (default: as many as the cluster's CPUs allow)."""
    import ray

    from flawscope.scale.cluster import cluster_cpus, ray_session

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    if cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker}: must be above 0")
    region_options = {k: v for k, v in (region_options or {}).items() if v is not None}
    unknown = sorted(set(region_options) - set(REGION_OPTIONS))
    if unknown:
        raise ConfigError(f"region options: unknown {', '.join(unknown)}")
    if address:
        check_reachable(address)  # before minutes of work
    model = Path(model)
    inspector = load_model_file(model, device="cpu")  # a bad model fails here, not per worker
    inspector.region_rule(**region_options)  # checks the options
    try:
        data = model.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{model}: cannot be read ({exc.strerror or exc})") from None
    images = resolve_sources([str(s) for s in sources])
    results = ResultsFolder(output, model_identity(data, region_options))
    scored, failed = results.scored_and_failed()
    todo = [n for n in images.names if n not in scored]
    results.drop_error_rows(failed & set(todo))
    summary = ScoreSummary(results.path, len(images), len(images) - len(todo), len(todo))
    if not todo:
        return summary
    t0 = time.perf_counter()
    with ray_session(address):
        n_workers = workers or max(1, int(cluster_cpus() // cpus_per_worker))
        # small runs: smaller blocks, so that every worker gets some
        block = max(1, min(batch_size, math.ceil(len(todo) / n_workers)))
        summary.workers = min(n_workers, math.ceil(len(todo) / block))
        # one input row per block of names: the blocks are exactly these (no re-bundling),
        # and from_items builds them here, without remote tasks before the actors start
        chunks = [{"paths": todo[i : i + block]} for i in range(0, len(todo), block)]
        scored_ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
            ImageScorer,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=summary.workers),
            num_cpus=cpus_per_worker,
            fn_constructor_kwargs={
                "model": [ray.put(data)], "model_name": model.name,
                "images": ImageList(filesystem=images.filesystem, prefix=images.prefix),
                "region_options": region_options, "device": device,
                "threads": max(1, int(cpus_per_worker)),
            },
        )  # Ray Data's actor pools restart a worker that dies and score its block again
        pending: list[dict[str, Any]] = []
        last_flush = time.monotonic()
        try:
            for table in scored_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = table.to_pylist()
                pending += rows
                summary.done += len(rows)
                summary.errors += sum(r["error"] is not None for r in rows)
                summary.defects += sum(r["verdict"] == "defect" for r in rows)
                summary.seconds = time.perf_counter() - t0
                if len(pending) >= flush_rows or time.monotonic() - last_flush > flush_seconds:
                    results.write_part(pending)
                    pending, last_flush = [], time.monotonic()
                if progress is not None:
                    progress(summary)
        finally:  # rows received are kept, also when interrupted
            results.write_part(pending)
    summary.seconds = time.perf_counter() - t0
    return summary
