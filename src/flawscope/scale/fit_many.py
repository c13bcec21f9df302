"""``flawscope fit-many``: one model per part number, from a CSV manifest.

One row per model. Columns (header names, ``-`` or ``_``):

* ``data`` (required): the dataset folder (layout auto-detected, or the ``format`` column);
* ``output`` (required): the model file to write;
* ``name``: the part number (default: the output's stem);
* ``model``: the detector (default: ``patchcore``, as ``flawscope fit``);
* ``format``, ``max_frr``, ``threshold_rule``: as the ``fit`` options;
* any option of a registered detector (``image_size``, ``epochs``, ``coreset_ratio``,
  ``backbone``, ``batch_size``...), and ``params``: a JSON object of further options.

Cells are JSON values where they parse (``64``, ``0.05``, ``[8,16]``), else text; an empty cell
leaves the default. Relative paths are relative to the manifest's folder.

Each row is fitted as ``flawscope fit`` does (:meth:`Inspector.train` then
:meth:`Inspector.save`), then evaluated (image AUROC) when its dataset has a test split.
A row that fails (bad data, bad option, a crash) is reported with its error; the others go on.
The ``local`` engine fits the rows one after another in this process; ``ray`` runs one Ray task
per row with ``cpus_per_model`` CPUs (as many at once as the cluster has CPUs for).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flawscope.errors import ConfigError, FlawscopeError

REQUIRED = ("data", "output")
#: columns that are not model options
FIT_COLUMNS = ("name", "data", "output", "model", "format", "max_frr", "threshold_rule",
               "params")
ENGINES = ("local", "ray")


@dataclass
class FitJob:
    """One manifest row, resolved (``error``: why it cannot run, found while reading)."""

    line: int
    name: str
    data: str
    output: str
    model: str
    format: str = "auto"
    max_frr: float = 0.01
    threshold_rule: str = "good-quantile"
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class FitResult:
    """What became of one row."""

    name: str
    model: str
    output: str
    status: str  # "ok" | "failed"
    image_auroc: float | None = None
    fit_seconds: float | None = None
    seconds: float = 0.0
    n_train: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["image_auroc"] is not None and not math.isfinite(d["image_auroc"]):
            d["image_auroc"] = None
        return d


def _model_option_names() -> set[str]:
    from flawscope.models import get_model_class, list_models

    return {n for m in list_models() for n in get_model_class(m).param_names()}


def _cell(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def read_manifest(path: str | Path, device: str = "auto") -> list[FitJob]:
    """The rows of a manifest CSV; a bad header or file raises :class:`ConfigError`, a bad row
    becomes a job with ``error`` set."""
    from flawscope.pipeline import DEFAULT_MODEL

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the manifest ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [(h or "").strip().replace("-", "_") for h in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ConfigError(f"{path}: the manifest needs the column(s) {', '.join(missing)} "
                          f"(header: {', '.join(header) or 'none'})")
    known = set(FIT_COLUMNS) | _model_option_names()
    unknown = [h for h in header if h not in known]
    if unknown:
        raise ConfigError(f"{path}: unknown column(s) {', '.join(unknown)}: not a fit-many "
                          "column nor an option of any detector (`flawscope models --json`)")
    base = path.parent
    jobs: list[FitJob] = []
    for line, raw in enumerate(reader, start=2):
        values = list(raw.values())
        if None in raw or any(isinstance(v, list) for v in values):
            jobs.append(_bad_row(line, raw, "more cells than header columns"))
            continue
        row = {h: (v or "").strip() for h, v in zip(header, values)}
        if not any(row.values()):
            continue
        jobs.append(_job(line, row, base, device, DEFAULT_MODEL))
    if not jobs:
        raise ConfigError(f"{path}: the manifest has no rows")
    outputs: dict[str, int] = {}
    for job in jobs:
        if job.output and job.error is None:
            key = str(Path(job.output).resolve())
            if key in outputs:
                raise ConfigError(f"{path}, lines {outputs[key]} and {job.line}: both write "
                                  f"{job.output}")
            outputs[key] = job.line
    return jobs


def _bad_row(line: int, raw: dict, error: str) -> FitJob:
    name = str(raw.get("name") or f"line {line}")
    return FitJob(line, name, "", "", str(raw.get("model") or ""), error=f"line {line}: {error}")


def _job(line: int, row: dict[str, str], base: Path, device: str, default_model: str) -> FitJob:
    def place(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base / p)

    output = place(row["output"]) if row.get("output") else ""
    name = row.get("name") or (Path(output).stem if output else f"line {line}")
    job = FitJob(line, name, place(row["data"]) if row.get("data") else "", output,
                 row.get("model") or default_model)
    try:
        for col in REQUIRED:
            if not row.get(col):
                raise ConfigError(f"the {col} cell is empty")
        if row.get("format"):
            job.format = row["format"]
        if row.get("max_frr"):
            job.max_frr = float(row["max_frr"])
        if row.get("threshold_rule"):
            job.threshold_rule = row["threshold_rule"]
        options: dict[str, Any] = {"device": device}
        if row.get("params"):
            params = _cell(row["params"])
            if not isinstance(params, dict):
                raise ConfigError(f"params {row['params']!r}: expected a JSON object")
            options.update({k.replace("-", "_"): v for k, v in params.items()})
        options.update({k: _cell(v) for k, v in row.items() if k not in FIT_COLUMNS and v})
        job.options = options
    except (ConfigError, ValueError) as exc:
        job.error = f"line {line}: {exc}"
    return job


# ---------------------------------------------------------------------------- one fit
def fit_one(job: FitJob, threads: int | None = None) -> FitResult:
    """Fit, save and (with a test split) evaluate one row; never raises."""
    t0 = time.perf_counter()
    result = FitResult(job.name, job.model, job.output, "failed", error=job.error)
    if job.error is not None:
        return result
    try:
        import torch

        from flawscope.data.dataset import open_dataset
        from flawscope.evaluation import evaluate
        from flawscope.io import check_writable
        from flawscope.models.registry import check_options
        from flawscope.pipeline import Inspector

        if threads:
            torch.set_num_threads(threads)
        options = dict(job.options)
        cls = check_options(job.model, {k: v for k, v in options.items() if k != "progress"})
        if "progress" in cls.param_names():
            options.setdefault("progress", False)
        check_writable(job.output, "output")
        dataset = open_dataset(job.data, job.format)
        inspector = Inspector.train(dataset, job.model, max_frr=job.max_frr,
                                    threshold_rule=job.threshold_rule, **options)
        inspector.save(job.output)
        result.fit_seconds = float(inspector.info.get("fit_seconds", math.nan))
        result.n_train = len(dataset.train)
        labels = {s.is_defect for s in dataset.test}
        if labels == {True, False}:
            metrics = evaluate(inspector, dataset, keep_maps=False).metrics
            result.image_auroc = float(metrics["image_auroc"])
        result.status, result.error = "ok", None
    except FlawscopeError as exc:
        result.error = str(exc)
    except Exception as exc:  # a crash in one row must not stop the others
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------- engines
@dataclass
class FitEvent:
    """Progress: ``start`` (local engine: a row begins), ``done`` (a row finished: ``result``),
    ``waiting`` (Ray engine: nothing finished for a heartbeat; ``job`` is None)."""

    kind: str
    job: FitJob | None
    result: FitResult | None
    finished: int
    total: int


Report = Callable[[FitEvent], None]


def run_local(jobs: list[FitJob], report: Report | None = None) -> list[FitResult]:
    """Fit the rows one after another in this process."""
    results: list[FitResult] = []
    for job in jobs:
        if report is not None and job.error is None:
            report(FitEvent("start", job, None, len(results), len(jobs)))
        results.append(fit_one(job))
        if report is not None:
            report(FitEvent("done", job, results[-1], len(results), len(jobs)))
    return results


def run_ray(
    jobs: list[FitJob],
    *,
    address: str | None = None,
    cpus_per_model: float = 1,
    report: Report | None = None,
    heartbeat: float = 60.0,
) -> list[FitResult]:
    """One Ray task per row with ``cpus_per_model`` CPUs; results in the rows' order."""
    import ray

    from flawscope.scale.cluster import ray_session

    if cpus_per_model <= 0:
        raise ConfigError(f"--cpus-per-model {cpus_per_model}: must be above 0")
    results: dict[int, FitResult] = {}

    def finished(i: int, result: FitResult) -> None:
        results[i] = result
        if report is not None:
            report(FitEvent("done", jobs[i], result, len(results), len(jobs)))

    for i, job in enumerate(jobs):
        if job.error is not None:
            finished(i, fit_one(job))  # the row's error, without a task
    runnable = [i for i, job in enumerate(jobs) if job.error is None]
    if runnable:
        with ray_session(address):
            task = ray.remote(fit_one).options(
                num_cpus=cpus_per_model,
                max_retries=1,  # once more if the worker process dies (not on errors)
            )
            threads = max(1, int(cpus_per_model))
            pending = {task.remote(jobs[i], threads): i for i in runnable}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=heartbeat)
                if not done:
                    if report is not None:
                        report(FitEvent("waiting", None, None, len(results), len(jobs)))
                    continue
                i = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the worker died twice
                    result = FitResult(jobs[i].name, jobs[i].model, jobs[i].output, "failed",
                                       error=f"Ray task failed: {exc}")
                finished(i, result)
    return [results[i] for i in range(len(jobs))]


def fit_many(
    manifest: str | Path,
    *,
    engine: str = "local",
    address: str | None = None,
    cpus_per_model: float = 1,
    device: str = "auto",
    report: Report | None = None,
) -> list[FitResult]:
    """Fit every row of ``manifest`` (see the module docstring) with ``engine``."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine}: choose from {', '.join(ENGINES)}")
    jobs = read_manifest(manifest, device=device)
    if engine == "local":
        return run_local(jobs, report)
    return run_ray(jobs, address=address, cpus_per_model=cpus_per_model, report=report)
