"""Records to a file for the plant's own tools: Parquet (pyarrow) or CSV, written atomically.

One row per record, every column of ``inspections`` (``regions`` and ``details`` as JSON
text, times as UTC) plus ``image_path``: the kept image's file, or empty.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from flawscope.errors import ConfigError
from flawscope.station import tables as T
from flawscope.station.store import RecordFilter, RecordStore, utcnow

COLUMNS = [c.name for c in T.inspections.columns] + ["image_path"]
_JSON = {"regions", "details"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, option: str = "--since") -> datetime:
    """ISO date or time (no zone: UTC), or a duration back from now: ``90m``, ``24h``,
    ``7d``, ``2w``. A one-line :class:`ConfigError` otherwise."""
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return utcnow() - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            d = date.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{option} {text!r}: expected an ISO date or time "
                              "(2024-05-17, 2024-05-17T06:00) or a duration (24h, 7d)") from None
        t = datetime(d.year, d.month, d.day)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _value(row: dict[str, Any], key: str, store: RecordStore) -> Any:
    if key == "image_path":
        path = store.image_path(row)
        return str(path) if path is not None else None
    value = row.get(key)
    if key in _JSON:
        return json.dumps(value, separators=(",", ":"))
    return value


def _arrow_schema():
    import pyarrow as pa

    fields = []
    for c in T.inspections.columns:
        name = c.name
        py = c.type.python_type if not isinstance(c.type, T.UTCDateTime) else datetime
        if name in _JSON:
            t = pa.string()
        elif py is datetime:
            t = pa.timestamp("us", tz="UTC")
        elif py is bool:
            t = pa.bool_()
        elif py is int:
            t = pa.int64()
        elif py is float:
            t = pa.float64()
        else:
            t = pa.string()
        fields.append(pa.field(name, t))
    fields.append(pa.field("image_path", pa.string()))
    return pa.schema(fields)


def export_records(store: RecordStore, output: str | os.PathLike,
                   where: RecordFilter | None = None) -> int:
    """Write the records matching ``where`` (oldest first) to ``output`` (``.parquet`` or
    ``.csv``); returns how many. The file appears complete or not at all."""
    out = Path(output)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("parquet", "csv"):
        raise ConfigError(f"-o {out}: give a .parquet or .csv file name")
    if not out.parent.is_dir():
        raise ConfigError(f"-o {out}: folder {out.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    n = 0
    try:
        if fmt == "csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(COLUMNS)
                for rows in store.iter_rows(where):
                    for row in rows:
                        writer.writerow([_csv(_value(row, k, store)) for k in COLUMNS])
                    n += len(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = _arrow_schema()
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for rows in store.iter_rows(where):
                    columns = {k: [_value(r, k, store) for r in rows] for k in COLUMNS}
                    writer.write_table(pa.table(columns, schema=schema))
                    n += len(rows)
                if n == 0:
                    writer.write_table(schema.empty_table())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _csv(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") and not _is_number(value):
        return "'" + value  # no spreadsheet formulas from part ids or file names
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
