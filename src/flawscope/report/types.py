"""The two-stage report: defect types named on the parts the detector rejects
(:func:`flawscope.twostage.evaluate_types`), as a confusion table of types."""

from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path
from typing import Any

from flawscope import __version__
from flawscope.io import atomic_write_text
from flawscope.report.html import CSS, _jsonable


def type_confusion_html(metrics: dict[str, Any]) -> str:
    """The confusion table of types (rows: true type of a rejected defect, columns: the type
    named), the diagonal emphasised, with per-type rejected / named-right counts."""
    conf = metrics["confusion"]
    named = conf["named"]
    head = "".join(f"<th>{escape(n)}</th>" for n in ["true \\ named", *named,
                                                      "rejected / defects", "named right"])
    rows = []
    for t, counts in zip(conf["true"], conf["counts"]):
        cells = "".join(
            f'<td class="best">{c}</td>' if n == t and c else f"<td>{c or ''}</td>"
            for n, c in zip(named, counts))
        pt = metrics["per_type"][t]
        rows.append(f"<tr><td>{escape(t)}</td>{cells}<td>{pt['rejected']} / {pt['defects']}"
                    f"</td><td>{pt['named_right']}</td></tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def write_type_report(out_dir: str | Path, result: Any, *, title: str = "defect types") -> Path:
    """Write ``report.html`` and ``types.json`` (the metrics) to ``out_dir``; returns the
    HTML path. ``result``: a :class:`~flawscope.twostage.TypeEvaluation`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    acc = m["type_accuracy"]
    fr = ", ".join(f"{escape(k)} {v}" for k, v in sorted(m["false_reject_types"].items()))
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="meta">generated {escape(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} by '
        f"flawscope {escape(__version__)}</div>",
        "<h2>Defect types on the rejected parts</h2>",
        f"<p>{m['rejected_defects']} of {m['defects']} evaluation defects rejected by the "
        f"detector; type named right on {m['named_right']}: accuracy "
        f"<b>{'–' if acc != acc else f'{acc:.3f}'}</b>. {m['false_rejects']} of {m['good']} "
        f"good parts rejected{f' (named: {fr})' if fr else ''}.</p>",
        type_confusion_html(m),
        '<p class="note">Rows: the true type of a rejected defect; columns: the type the '
        "classifier named. Defects the detector passed as OK get no type and are not in the "
        "table. The verdict is the detector's.</p>",
        "</body></html>",
    ]
    atomic_write_text(out / "types.json", json.dumps(_jsonable({"title": title, **m}),
                                                     indent=2, allow_nan=False) + "\n")
    return atomic_write_text(out / "report.html", "\n".join(parts) + "\n")
