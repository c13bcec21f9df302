"""The results of ``predict --engine ray``: a folder of Parquet part files, one row per image.

Columns: :data:`~flawscope.pipeline.ROW_COLUMNS` of
:meth:`~flawscope.pipeline.Prediction.to_row`, as ``predict --csv`` writes them (path, score,
normalized_score, threshold, verdict, n_regions, largest_region_area_px, regions as JSON, and
whatever the row gains later, as text), typed for Parquet, plus ``error``: None for a scored
image, the reason for one that could not be read or scored (its other columns are null).

The folder is what pyarrow, pandas, DuckDB, Spark and Ray read as one table
(``pandas.read_parquet("results.parquet")``). Part files are written whole (temporary file,
then rename), so an interrupted run leaves only complete parts; each carries the model's
digest and the region options in its metadata, and a re-run with other ones is refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flawscope.errors import ConfigError
from flawscope.io import atomic_write
from flawscope.pipeline import ROW_COLUMNS

#: the column that tells error rows from scored ones
ERROR_COLUMN = "error"
#: Parquet types of the known columns (``to_row`` writes scores as text at full precision;
#: ``float()`` of that text is the same float)
COLUMN_TYPES: dict[str, pa.DataType] = {
    "path": pa.string(), "score": pa.float64(), "normalized_score": pa.float64(),
    "threshold": pa.float64(), "verdict": pa.string(), "n_regions": pa.int64(),
    "largest_region_area_px": pa.int64(), "regions": pa.string(), ERROR_COLUMN: pa.string(),
}
PART_GLOB = "part-*.parquet"
METADATA_KEY = b"flawscope"


def error_row(path: str, message: str) -> dict[str, Any]:
    return {"path": path, ERROR_COLUMN: message}


def _convert(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_floating(kind):
        return float(value)
    if pa.types.is_integer(kind):
        return int(value)
    return str(value)


def _as_text(value: Any) -> str | None:
    """A column ``to_row`` gained after this module was written: text (JSON unless a string),
    so that every part has the same schema."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=_jsonable)


def _jsonable(obj: Any) -> Any:
    return obj.item() if hasattr(obj, "item") else str(obj)


def columns() -> list[str]:
    """The columns of every part: :data:`~flawscope.pipeline.ROW_COLUMNS` (what
    ``predict --csv`` writes) and :data:`ERROR_COLUMN`."""
    return [*ROW_COLUMNS, ERROR_COLUMN]


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of :meth:`Prediction.to_row` (and :func:`error_row`) -> a typed table."""
    arrays, fields = [], []
    for name in columns():
        kind = COLUMN_TYPES.get(name, pa.string())
        convert = _convert if name in COLUMN_TYPES else (lambda v, _k: _as_text(v))
        arrays.append(pa.array([convert(r.get(name), kind) for r in rows], type=kind))
        fields.append(pa.field(name, kind))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class ResultsFolder:
    """A results folder: its rows so far and the writing of new parts.

    ``identity``: what produced the rows (model digest, region options); stored in every part
    and compared with the parts already there.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = identity
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"-o {self.path}: is a file; the results are a folder of Parquet "
                              "parts (give a new name, e.g. results.parquet)")
        self.run_id = uuid.uuid4().hex[:8]
        self.n_parts = 0

    def parts(self) -> list[Path]:
        return sorted(self.path.glob(PART_GLOB)) if self.path.is_dir() else []

    def read(self, columns: Iterable[str] = ("path", ERROR_COLUMN)) -> pa.Table:
        """The rows of every part (``columns`` only); an empty table without parts."""
        tables = []
        for part in self.parts():
            self._check_identity(part)
            tables.append(pq.read_table(part, columns=list(columns)))
        if not tables:
            return pa.table({c: pa.array([], COLUMN_TYPES.get(c, pa.string())) for c in columns})
        return pa.concat_tables(tables, promote_options="default")

    def _check_identity(self, part: Path) -> None:
        try:
            meta = pq.read_schema(part).metadata or {}
        except Exception as exc:
            raise ConfigError(f"{part}: not a readable Parquet part ({exc}); move it away to "
                              "resume") from None
        stored = json.loads(meta.get(METADATA_KEY, b"{}"))
        for key, value in self.identity.items():
            if stored.get(key) != value:
                raise ConfigError(
                    f"-o {self.path}: holds results with {key}={stored.get(key)!r}, this run "
                    f"has {value!r}; resume only with the same model and options (or give "
                    "another -o)")

    def scored_and_failed(self) -> tuple[set[str], set[str]]:
        """Paths with a scored row, paths with only error rows."""
        table = self.read()
        paths = table.column("path").to_pylist()
        errors = table.column(ERROR_COLUMN).to_pylist()
        scored = {p for p, e in zip(paths, errors) if e is None}
        failed = {p for p, e in zip(paths, errors) if e is not None} - scored
        return scored, failed

    def drop_error_rows(self, paths: set[str]) -> int:
        """Remove the error rows of ``paths`` (to score them again); returns how many went.

        Each part is rewritten whole (or deleted when nothing is left): an interruption
        leaves either the old part or the new one.
        """
        removed = 0
        for part in self.parts():
            table = pq.read_table(part)
            errors = table.column(ERROR_COLUMN).to_pylist()
            drop = [e is not None and p in paths
                    for p, e in zip(table.column("path").to_pylist(), errors)]
            if not any(drop):
                continue
            removed += sum(drop)
            kept = table.filter(pa.array([not d for d in drop]))
            if kept.num_rows:
                atomic_write(part, lambda tmp, t=kept: pq.write_table(t, tmp))
            else:
                part.unlink()
        return removed

    def write_part(self, rows: list[dict[str, Any]]) -> Path | None:
        """Write ``rows`` as one new part file (atomically); None when there are none."""
        if not rows:
            return None
        table = rows_to_table(rows)
        meta = {METADATA_KEY: json.dumps(self.identity).encode()}
        table = table.replace_schema_metadata(meta)
        self.path.mkdir(parents=True, exist_ok=True)
        self.n_parts += 1
        part = self.path / f"part-{self.run_id}-{self.n_parts:05d}.parquet"
        return atomic_write(part, lambda tmp: pq.write_table(table, tmp))
