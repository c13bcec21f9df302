"""The class distribution of a label table as a PNG bar chart (matplotlib, Agg canvas).

Design document 000 analysed the label distribution (88 ``class-state`` labels, mostly
``good``) as text; :func:`write_label_distribution` draws it: one horizontal bar per label,
grouped by object class, ``good`` states in one colour and defect states in another, with the
count at the end of each bar. No pyplot state is touched (safe in threads and servers).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flawscope.io import atomic_write_bytes

GOOD_COLOUR = "#2c7bb6"
DEFECT_COLOUR = "#d7191c"


@dataclass
class LabelDistribution:
    """What was drawn: labels in bar order (top to bottom), their counts and object classes,
    the number of bars actually in the figure, and the PNG."""

    labels: list[str]
    counts: list[int]
    classes: list[str]
    bars: int
    png: bytes = field(repr=False)
    path: Path | None = None


def _state(label: str, object_class: str) -> str:
    prefix = f"{object_class}-"
    return label[len(prefix):] if object_class and label.startswith(prefix) else label


def label_distribution(
    counts: Mapping[str, int],
    label_classes: Mapping[str, str] | None = None,
    *,
    title: str = "class distribution",
) -> LabelDistribution:
    """Draw ``counts`` (label -> images); ``label_classes`` maps a label to its object class
    (default: the part before the first ``-``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not counts:
        raise ValueError("no labels to plot")
    classes_of = dict(label_classes or {})
    cls = {lab: classes_of.get(lab) or lab.partition("-")[0] for lab in counts}
    order = sorted(counts, key=lambda lab: (cls[lab], _state(lab, cls[lab]) != "good", lab))
    values = [int(counts[lab]) for lab in order]
    colours = [GOOD_COLOUR if _state(lab, cls[lab]) == "good" else DEFECT_COLOUR
               for lab in order]
    height = 1.2 + 0.22 * len(order)
    fig = Figure(figsize=(8.0, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ypos = list(range(len(order)))
    container = ax.barh(ypos, values, color=colours)
    ax.set_yticks(ypos, order, fontsize=7 if len(order) > 40 else 9)
    ax.invert_yaxis()
    ax.bar_label(container, fontsize=7, padding=2)
    total = sum(values)
    ax.set_xlabel("images")
    ax.set_title(f"{title}: {total} images, {len(order)} labels "
                 f"({len(set(cls.values()))} classes; blue = good, red = defect)", fontsize=9)
    ax.margins(x=0.12)
    bars = len(container.patches)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return LabelDistribution(order, values, [cls[lab] for lab in order], bars, buf.getvalue())


def write_label_distribution(
    path: str | os.PathLike,
    counts: Mapping[str, int],
    label_classes: Mapping[str, str] | None = None,
    *,
    title: str = "class distribution",
) -> LabelDistribution:
    """:func:`label_distribution` written atomically to ``path`` (PNG)."""
    dist = label_distribution(counts, label_classes, title=title)
    dist.path = atomic_write_bytes(path, dist.png)
    return dist
