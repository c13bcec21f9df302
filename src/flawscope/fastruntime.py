"""The fastest runtime for a model file: its ONNX export, run by onnxruntime, cached.

On a CPU, onnxruntime runs the exported PatchCore/PaDiM graph 1.6-2.4x faster than PyTorch runs
the same model (docs/benchmarks.md, "Speed"). ``predict``, ``evaluate`` and ``serve`` therefore
score with the export when one is cached for the model file (``--runtime auto``, the default);
``fit`` and ``calibrate`` prepare it right after writing the model. Verdicts, thresholds,
regions and reports still come from the model file (:class:`~flawscope.pipeline.Inspector`):
only the scores and maps are computed by onnxruntime, and an export is cached only after the
exporter's parity check (scores within 1e-4 of PyTorch, :func:`flawscope.export.export_onnx`).

The cache is keyed by the SHA-256 of the model file and the flawscope version, in
``$FLAWSCOPE_CACHE`` (default ``~/.cache/flawscope``) under ``onnx/``. A model the exporter
cannot export is remembered (``<key>.failed`` with the reason) and runs in PyTorch, saying so.
``FLAWSCOPE_PREPARE_RUNTIME=0`` turns the automatic export off (``--runtime onnxruntime``
still exports on demand).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flawscope import __version__
from flawscope.errors import ConfigError
from flawscope.io import atomic_write

if TYPE_CHECKING:
    from flawscope.pipeline import Inspector

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
#: the exporter of the cached graph (:data:`flawscope.export.EXPORTERS`): ``quick`` keeps the
#: export a few seconds after every fit (``flawscope export`` defaults to dynamo's faster graph)
EXPORTER = "quick"
#: grid positions per nearest-neighbour block in the cached PatchCore graph (a runtime option:
#: the model file is unchanged). onnxruntime's matrix products want ~2000 query rows: at 8
#: images per call (:data:`flawscope.runtime.DEFAULT_ONNX_BATCH`) 256 positions gave 40.8
#: ms/img against 62.4 at PyTorch's default 32, and 52 vs 57 ms at 1 image (pill, 2 cores)
GRAPH_QUERY_CHUNK = 256
CACHE_ENV = "FLAWSCOPE_CACHE"
PREPARE_ENV = "FLAWSCOPE_PREPARE_RUNTIME"


def cache_dir() -> Path:
    """Where exports are cached: ``$FLAWSCOPE_CACHE/onnx`` (default ``~/.cache/flawscope``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flawscope"
    return Path(root) / "onnx"


#: digests already computed, by (path, size, modification time): a load asks several times
_KEYS: dict[tuple[str, int, int], str] = {}


def model_key(path: str | os.PathLike) -> str:
    """The cache key of a model file: its content digest and the flawscope version."""
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo not in _KEYS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _KEYS[memo] = digest.hexdigest()[:32]
    return f"{_KEYS[memo]}-{__version__}"


def cached_export(path: str | os.PathLike) -> Path | None:
    """The cached export of the model file ``path``, if there is one."""
    graph = cache_dir() / f"{model_key(path)}.onnx"
    return graph if graph.is_file() else None


def export_failure(path: str | os.PathLike) -> str | None:
    """Why an earlier export of this model file failed (None: it did not fail)."""
    marker = cache_dir() / f"{model_key(path)}.failed"
    return marker.read_text(encoding="utf-8", errors="replace") if marker.is_file() else None


def reuse_export(scored_like: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Cache the export of ``scored_like`` for ``path`` too (a model file whose scores and
    maps are the same, e.g. re-calibrated: the graph's own threshold is not used, see
    :meth:`~flawscope.pipeline.Inspector.use_onnxruntime`); None when there is none."""
    source = cached_export(scored_like)
    if source is None:
        return None
    target = cache_dir() / f"{model_key(path)}.onnx"
    if not target.exists():
        data = source.read_bytes()
        atomic_write(target, lambda p: p.write_bytes(data))
    return target


def onnxruntime_available() -> bool:
    """True when the export stack (onnx, onnxscript, onnxruntime) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("onnx", "onnxruntime", "onnxscript"))


def auto_prepare_enabled() -> bool:
    """False when ``FLAWSCOPE_PREPARE_RUNTIME`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get(PREPARE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def auto_prepare_wanted(inspector: Inspector) -> bool:
    """Whether a model is exported without being asked (after ``fit``, at ``serve``): the
    export stack is installed, the model runs on the CPU and automatic preparation is on."""
    return (auto_prepare_enabled() and onnxruntime_available()
            and inspector.detector.torch_device.type == "cpu")


def prepare(inspector: Inspector, path: str | os.PathLike) -> Path:
    """Export the model of file ``path`` (loaded as ``inspector``) into the cache and return
    the graph's path; an export that fails is remembered and raises
    :class:`~flawscope.export.ExportError`."""
    from flawscope.export import ExportError, export_onnx

    if (graph := cached_export(path)) is not None:
        return graph
    key = model_key(path)
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cache folder {folder} (set {CACHE_ENV}): {exc}") from None
    t0 = time.perf_counter()
    detector = inspector.detector
    chunk = getattr(detector, "query_chunk", None)
    try:
        if chunk is not None:
            detector.query_chunk = GRAPH_QUERY_CHUNK
        graph, _ = export_onnx(inspector, folder / f"{key}.onnx", exporter=EXPORTER)
    except ExportError as exc:
        reason = str(exc)
        atomic_write(folder / f"{key}.failed",
                     lambda p: p.write_text(reason, encoding="utf-8"))
        raise
    finally:
        if chunk is not None:
            detector.query_chunk = chunk
    log.info("%s: onnxruntime graph cached at %s (%.1f s)", path, graph,
             time.perf_counter() - t0)
    return graph


def select_runtime(
    inspector: Inspector,
    path: str | os.PathLike,
    runtime: str = "auto",
    *,
    prepare_missing: bool = False,
    threads: int | None = None,
) -> Inspector:
    """Switch ``inspector`` (loaded from the model file ``path``) to onnxruntime where
    ``runtime`` asks for it; returns ``inspector``.

    ``auto``: onnxruntime when the export stack is installed, the model runs on the CPU and an
    export is cached (or ``prepare_missing`` and automatic preparation is on: exported now);
    else PyTorch. ``onnxruntime``: export now if needed; a model that cannot be exported, or a
    missing onnxruntime, is a :class:`ConfigError`. ``torch``: PyTorch.
    """
    from flawscope.export import ExportError

    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return inspector
    if not onnxruntime_available():
        if runtime == "onnxruntime":
            raise ConfigError("--runtime onnxruntime: onnxruntime/onnx/onnxscript are not "
                              "installed: pip install 'flawscope[export]'")
        return inspector
    on_cpu = inspector.detector.torch_device.type == "cpu"
    if runtime == "auto" and not on_cpu:
        return inspector  # on a GPU PyTorch runs the model on the device
    graph = cached_export(path)
    if graph is None:
        failed = export_failure(path)
        wanted = runtime == "onnxruntime" or (prepare_missing and auto_prepare_enabled())
        if failed is not None and runtime == "auto":
            log.info("%s: runs in PyTorch (its ONNX export failed: %s)", path, failed)
            return inspector
        if not wanted:
            return inspector
        try:
            graph = prepare(inspector, path)
        except (ExportError, OSError) as exc:  # OSError: a read-only or full cache folder
            if runtime == "onnxruntime":
                raise ConfigError(f"--runtime onnxruntime: {exc}") from None
            log.warning("%s: runs in PyTorch: no onnxruntime graph (%s)", path, exc)
            return inspector
    return inspector.use_onnxruntime(graph, threads=threads)


def prepare_in_background(inspector: Inspector, path: str | os.PathLike
                          ) -> threading.Thread | None:
    """For a long-running service: when ``inspector`` (from the model file ``path``) runs in
    PyTorch only because no graph is cached yet, export it in a background thread and switch
    to onnxruntime when it is ready (requests meanwhile run in PyTorch; a failed export is
    logged and remembered). Returns the thread, or None when there is nothing to do."""
    if (inspector.runtime != "torch" or not auto_prepare_wanted(inspector)
            or export_failure(path) is not None):
        return None

    def run() -> None:
        from flawscope.export import ExportError

        t0 = time.perf_counter()
        try:
            graph = prepare(inspector, path)
            inspector.use_onnxruntime(graph)
        except (ExportError, OSError) as exc:
            log.warning("%s: stays on PyTorch: no onnxruntime graph (%s)", path, exc)
            return
        log.info("%s: now scoring in onnxruntime (graph exported in %.0f s)", path,
                 time.perf_counter() - t0)

    thread = threading.Thread(target=run, name="flawscope-prepare-runtime", daemon=True)
    thread.start()
    return thread
