"""Self-contained HTML evaluation report: metrics side by side, curves, worst examples, and
for autoencoders the residual statistics and reconstructions."""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flawscope import __version__
from flawscope.data.images import read_image, read_mask
from flawscope.errors import ConfigError, FlawscopeError
from flawscope.heatmap import png_bytes, sample_panel_rgb, scale_map
from flawscope.io import atomic_write_bytes, atomic_write_text, printable
from flawscope.report import plots
from flawscope.threshold import Threshold

if TYPE_CHECKING:
    from flawscope.data.dataset import Sample
    from flawscope.evaluation import EvaluationResult

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0 auto;max-width:1280px;padding:1.2rem 1.6rem 3rem;color:#1d2330;line-height:1.45}
h1{margin:.2rem 0 .3rem}h2{margin-top:2.2rem;border-bottom:2px solid #dde3ea;padding-bottom:.2rem}
h3{margin:1.4rem 0 .4rem}.meta{color:#5b6575;font-size:.92rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #cfd6df;padding:.3rem .7rem;text-align:right}
th{background:#f1f4f8}td:first-child,th:first-child{text-align:left}
td.best{font-weight:700;background:#e3f4e6}
.note{color:#5b6575;font-style:italic}
.warn{background:#fff4e5;border-left:4px solid #e8a33d;padding:6px 10px}
.plots{display:flex;flex-wrap:wrap;gap:1rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:.8rem}
figure{margin:0;border:1px solid #dde3ea;border-radius:6px;padding:.4rem;background:#fff}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:.8rem;color:#5b6575;margin-top:.2rem;overflow-wrap:anywhere}
.plots figure img{width:auto;max-width:100%}
code{background:#f1f4f8;padding:0 .2rem;border-radius:3px}
"""

# (metrics key, label, format, better: "high" | "low" | None)
ROWS: list[tuple[str, str, str, str | None]] = [
    ("image_auroc", "image AUROC", "{:.3f}", "high"),
    ("image_auprc", "image AUPRC", "{:.3f}", "high"),
    ("f1", "F1 at threshold", "{:.3f}", "high"),
    ("f1_max", "F1-max (best threshold)", "{:.3f}", "high"),
    ("accuracy", "accuracy", "{:.3f}", "high"),
    ("precision", "precision", "{:.3f}", "high"),
    ("recall", "recall (defects found)", "{:.3f}", "high"),
    ("false_reject_rate", "false-reject rate (good parts)", "{:.2%}", "low"),
    ("pixel_auroc", "pixel AUROC", "{:.3f}", "high"),
    ("aupro", "AUPRO (FPR ≤ 0.3)", "{:.3f}", "high"),
    ("images_per_second", "images / s", "{:.1f}", "high"),
    ("fit_seconds", "fit seconds", "{:.1f}", "low"),
    ("threshold", "threshold", "{:.6g}", None),
    ("n_images", "test images", "{:.0f}", None),
    ("n_defect", "test defects", "{:.0f}", None),
]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _unique_slugs(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        base = slug = _slug(name)
        k = 2
        while slug in out:
            slug, k = f"{base}_{k}", k + 1
        out.append(slug)
    return out


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _jsonable(obj: Any) -> Any:
    """numpy scalars -> Python, NaN / inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _figure(png: bytes, caption: str) -> str:
    return f"<figure>{_img(png, caption)}<figcaption>{escape(caption)}</figcaption></figure>"


def _cards(figures: Sequence[str]) -> str:
    return f'<div class="cards">{"".join(figures)}</div>'


def _sample_title(sample: Sample, score_line: str) -> str:
    """Two-line plot title of a test image: its file name and defect type, then ``score_line``."""
    return printable(f"{Path(sample.path).name} — {sample.defect_type}\n{score_line}")


def _card(write: Callable[[str, bytes], None], name: str, png: bytes, title: str) -> str:
    """Write ``png`` as ``name``; its figure, captioned with the plot's title on one line."""
    write(name, png)
    return _figure(png, title.replace("\n", " — "))


def _metric_values(r: EvaluationResult) -> dict[str, float | None]:
    vals = {k: _finite(v) for k, v in r.metrics.items()}
    vals["fit_seconds"] = _finite(r.info.get("fit_seconds"))
    return vals


def _table(header: Sequence[str], rows: list[tuple[str, list[str], set[int]]]) -> str:
    """``rows``: (label, cells, indices of cells to emphasise); all text escaped here."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for label, cells, best in rows:
        tds = "".join(
            f'<td class="best">{escape(c)}</td>' if i in best else f"<td>{escape(c)}</td>"
            for i, c in enumerate(cells)
        )
        body.append(f"<tr><td>{escape(label)}</td>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _best(values: list[float | None], better: str | None) -> set[int]:
    finite = [v for v in values if v is not None]
    if better is None or len(values) < 2 or len(finite) < 2 or min(finite) == max(finite):
        return set()
    target = max(finite) if better == "high" else min(finite)
    return {i for i, v in enumerate(values) if v == target}


def metrics_table(results: Sequence[EvaluationResult]) -> str:
    """One column per model; rows present in any model; best value per row emphasised."""
    values = [_metric_values(r) for r in results]
    rows = []
    for key, label, fmt, better in ROWS:
        if not any(key in v for v in values):
            continue
        col = [v.get(key) for v in values]
        cells = ["–" if c is None else fmt.format(c) for c in col]
        rows.append((label, cells, _best(col, better)))
    return _table(["metric", *[r.model_name for r in results]], rows)


def per_type_table(results: Sequence[EvaluationResult]) -> str:
    """Share flagged as defect per defect type; for ``good`` it is the false-reject rate."""
    per = [r.per_type() for r in results]
    types = sorted({t for p in per for t in p}, key=lambda t: (t != "good", t))
    rows = []
    for t in types:
        col = [_finite(p[t]["flagged"]) if t in p else None for p in per]
        cells = [
            "–" if t not in p else f"{p[t]['flagged']:.1%} of {p[t]['n']}" for p in per
        ]
        label = "good (false rejects)" if t == "good" else t
        rows.append((label, cells, _best(col, "low" if t == "good" else "high")))
    return _table(["defect type", *[r.model_name for r in results]], rows)


def threshold_text(r: EvaluationResult) -> str:
    """Calibration rule in words, plus the false-reject rate observed on this test set."""
    d = r.info.get("threshold")
    try:
        thr = Threshold.from_dict(d) if isinstance(d, dict) else None
        text = thr.describe() if thr else f"threshold {r.threshold:.6g}"
        notes = list(thr.notes) if thr else []
    except (TypeError, ValueError, ConfigError):
        text, notes = f"threshold {r.threshold:.6g}", []
    frr = _finite(r.metrics.get("false_reject_rate"))
    if frr is not None:
        text += f"; on this test set {frr:.2%} of good parts rejected"
    return "; ".join([text, *notes, *r.warnings])


def _rate(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.4g} %"


def _share(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:.3f}"


def operating_section(results: Sequence[EvaluationResult], figure: str) -> str:
    """Per model: what each false-reject target would give (threshold from the model's
    calibration goods; recall and false-reject rate on this test set), the F1-optimal
    reference and the recommendation line; then the recall vs false-reject plot."""
    html = ["<h2>Operating points</h2>",
            '<p class="note">The threshold is the trade-off to sign off: for each share of '
            "good parts you accept to reject, the threshold the model's own held-out good "
            "images give, and what it does on this test set. Set one with "
            "<code>flawscope calibrate MODEL --max-frr RATE -o NEW_MODEL</code> (no refit)."
            "</p>"]
    for r in results:
        if len(results) > 1:
            html.append(f"<h3>{escape(r.model_name)}</h3>")
        if not r.operating_points:
            html.append('<p class="note">This model file has no stored calibration scores '
                        "(written by an older flawscope); refit it to see this table.</p>")
            continue
        rows = []
        for p in r.operating_points:
            label = _rate(p.max_frr) + (" (model)" if p.max_frr == r.model_frr else "")
            if not p.certified:
                label += " *"
            rows.append((label, [f"{p.threshold:.6g}", _share(p.recall), _share(p.frr_test)],
                         {0, 1, 2} if p.max_frr == r.model_frr else set()))
        if r.f1_point is not None:
            p = r.f1_point
            rows.append(("F1-optimal (uses the test labels)",
                         [f"{p.threshold:.6g}", _share(p.recall), _share(p.frr_test)], set()))
        html.append(_table(["false-reject target", "threshold", "recall", "test FRR"], rows))
        n_good = r.operating_points[0].n_good
        note = (f"Thresholds from {n_good} held-out good images; bold: the model's own "
                "target.")
        if any(not p.certified for p in r.operating_points):
            note += (" *: too few calibration images to certify this target; the largest "
                     "calibration score is used.")
        html.append(f'<p class="note">{escape(note)}</p>')
        line = r.recommendation(str(r.info.get("model_path") or "MODEL"))
        if line:
            html.append(f'<p class="warn"><b>Recommendation:</b> {escape(line)}</p>')
    html.append(f'<div class="plots">{figure}</div>')
    return "".join(html)


def _dataset_lines(results: Sequence[EvaluationResult]) -> list[str]:
    lines = []
    data = results[0].info.get("data")
    if isinstance(data, dict):
        parts = [f"{k}: {data[k]}" for k in ("root", "format") if data.get(k)]
        if data.get("classes") and any(data["classes"]):
            parts.append("classes: " + ", ".join(map(str, data["classes"])))
        if parts:
            lines.append("dataset — " + "; ".join(parts))
    for r in results:
        y = r.labels
        types = sorted({s.defect_type for s in r.samples if s.label == 1})
        lines.append(
            f"{r.model_name}: {y.size} test images, {int((y == 0).sum())} good, "
            f"{int(y.sum())} defect ({len(types)} types: {', '.join(types) or 'none'})"
        )
    return lines


def _count(n: int, word: str) -> str:
    """``1 good part``, ``2 good parts``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _examples(
    r: EvaluationResult, slug: str, n: int, write: Callable[[str, bytes], None]
) -> str:
    """Overlay cards of the worst misses, the worst false alarms and the highest-scoring caught
    defects of one model."""
    if r.maps is None:
        return '<p class="note">No anomaly maps kept for this model; overlays skipped.</p>'
    maps = np.asarray(r.maps)
    y, s = r.labels, np.asarray(r.scores, dtype=np.float64)
    flagged = r.defect_flags()  # the verdicts evaluate decided (pipeline.decide)
    defects = np.flatnonzero(y == 1)
    goods = np.flatnonzero(y == 0)
    missed = defects[~flagged[defects]]
    caught = defects[flagged[defects]]
    alarms = goods[flagged[goods]]
    # the headings say what is shown: real misses / false alarms when there are any, else the
    # closest calls (defects caught with the lowest scores, goods passed with the highest)
    groups = [
        ("miss", f"Missed defects ({missed.size}, lowest scores first)" if missed.size else
         "No defect missed; the lowest-scoring defects (caught)",
         (missed if missed.size else defects)[
             np.argsort(s[missed if missed.size else defects], kind="stable")][:n]),
        ("false_alarm", f"False alarms ({_count(alarms.size, 'good part')} flagged, highest "
         "scores first)" if alarms.size else
         "No false alarm; the highest-scoring good parts (passed)",
         (alarms if alarms.size else goods)[
             np.argsort(-s[alarms if alarms.size else goods], kind="stable")][:n]),
        # what the model does find, so a reader sees both sides of the threshold
        ("caught", f"Caught defects ({caught.size} of {defects.size}, highest scores first)",
         caught[np.argsort(-s[caught], kind="stable")][:n]),
    ]
    scale = r.map_scale if r.normalization is not None else "image"
    # the service's look (flawscope.heatmap); maps on the image scale share one range per
    # model so that the cards compare
    vrange = plots.map_range(maps) if scale == "image" else None
    colours = ("colour 0 = no anomaly, the middle of the scale = the threshold, the top = "
               "twice the threshold" if vrange is None else
               f"colour scale shared by all panels of this model: {vrange[0]:.4g} to "
               f"{vrange[1]:.4g} (1st–99.9th percentile of its maps)")
    size = maps.shape[1:]
    html = [f'<section id="examples-{escape(slug)}"><h3>Examples</h3>',
            f'<p class="note">Each card: the image and its heat map, as the service and '
            f"<code>predict --save-overlays</code> draw them; {colours}. White outline: "
            "ground-truth mask; magenta outline: predicted defect regions.</p>"]
    verdicts = r.verdict_list()
    for kind, heading, idx in groups:
        html.append(f"<h4>{escape(heading)}</h4>")
        if idx.size == 0:
            html.append('<p class="note">None in the test set.</p>')
            continue
        cards = []
        for rank, i in enumerate(idx, 1):
            sample = r.samples[i]
            try:
                image = read_image(sample.path, size=size)
            except FlawscopeError:
                image = None
            mask = r.masks[i] if r.masks is not None else None
            if mask is None and sample.mask_path is not None:
                try:
                    mask = read_mask(sample.mask_path, size)
                except FlawscopeError:
                    mask = None
            verdict = verdicts[i].upper()
            if flagged[i] != bool(y[i]):
                verdict += " (missed)" if y[i] else " (false alarm)"
            title = _sample_title(sample, f"score {s[i]:.4g} {'>' if flagged[i] else '≤'} "
                                  f"threshold {r.threshold:.4g}: {verdict}")
            regions = r.region_masks[i] if r.region_masks is not None else None
            values = scale_map(maps[i], scale, r.normalization, vrange)
            png = png_bytes(sample_panel_rgb(
                image, values, verdict=verdicts[i], score=float(s[i]), threshold=r.threshold,
                name=f"{sample.defect_type}/{Path(str(sample.path)).name}", scale=scale,
                regions=regions, truth=mask,
                value_range=vrange))
            cards.append(_card(write, f"examples_{slug}_{kind}_{rank:02d}.png", png, title))
        html.append(_cards(cards))
    html.append("</section>")
    return "".join(html)


def _residual_section(
    r: EvaluationResult, slug: str, write: Callable[[str, bytes], None]
) -> str:
    """Autoencoders: one strip plot per residual statistic (best AUROC first) and input /
    reconstruction / residual triplets of a few test images; empty for other models."""
    if not r.statistics:
        return ""
    from flawscope.residual import LOWER_IS_ABNORMAL

    aurocs = r.statistics_auroc()
    y = r.labels
    types = [s.defect_type for s in r.samples]
    rows, figures = [], []
    for name, auc in aurocs.items():
        is_rule = name == r.score_rule
        # the threshold is on the score; the score of a "lower is abnormal" rule is -statistic
        line = (-r.threshold if name in LOWER_IS_ABNORMAL else r.threshold) if is_rule else None
        png = plots.statistic_png(name, r.statistics[name], y, types, auc, line)
        write(f"statistic_{slug}_{_slug(name)}.png", png)
        auc_text = f"{auc:.3f}" if math.isfinite(auc) else "–"
        caption = f"{name}: image AUROC {auc_text}" + (
            " (the model's score rule; dashed: its threshold)" if is_rule else "")
        figures.append(_figure(png, caption))
        rows.append((name, [auc_text, "yes" if is_rule else ""], set()))
    html = [
        f'<section id="residuals-{escape(slug)}"><h3>Residual statistics</h3>',
        '<p class="note">Each statistic of the residual image (input − reconstruction) of '
        "every test image, good parts against each defect type (black bar: median). A "
        "statistic whose defects sit apart from the good parts is a usable score rule "
        "(<code>--score NAME</code>); the threshold goes in the gap. AUROC is that of the "
        "statistic used as the score (<code>min</code> negated: lower is more abnormal); "
        f"best first. This model scores with <code>{escape(str(r.score_rule))}</code>.</p>",
        _table(["statistic", "image AUROC", "score rule"], rows),
        _cards(figures),
    ]
    if r.reconstructions:
        s = np.asarray(r.scores, dtype=np.float64)
        items = sorted(r.reconstructions.items())
        limit = plots.residual_range([a - b for _, (a, b) in items])
        html.append(
            "<h4>Reconstructions: highest- and lowest-scoring defects, highest-scoring good "
            "part</h4>"
            f'<p class="note">Residual colour scale shared by all panels: ±{limit:.3g} '
            "(red: brighter than reconstructed, blue: darker).</p>")
        order = sorted(items, key=lambda kv: (-int(y[kv[0]]), -s[kv[0]]))
        cards = []
        for rank, (i, (image, recon)) in enumerate(order, 1):
            sample = r.samples[i]
            verdict = "DEFECT" if s[i] > r.threshold else "OK"
            title = _sample_title(sample, f"score {s[i]:.4g} (threshold {r.threshold:.4g}): "
                                  f"{verdict}")
            png = plots.residual_triplet_png(image, recon, title, limit)
            cards.append(_card(write, f"residual_{slug}_{rank:02d}.png", png, title))
        html.append(_cards(cards))
    html.append("</section>")
    return "".join(html)


def write_report(
    out_dir: str | Path,
    results: Sequence[EvaluationResult],
    *,
    title: str = "flawscope evaluation",
    n_examples: int = 6,
) -> Path:
    """Write ``report.html`` (self-contained), its PNGs and ``metrics.json`` to ``out_dir``.

    Several results (e.g. NCAE and PatchCore on the same test set) are compared side by side.
    Returns the path of ``report.html``.
    """
    results = list(results)
    if not results:
        raise ConfigError("write_report: no evaluation results given")
    if n_examples < 0:
        raise ConfigError(f"n_examples={n_examples}: must be 0 or more")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, png: bytes) -> None:
        atomic_write_bytes(out / name, png)

    slugs = _unique_slugs([r.model_name for r in results])
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    roc, pr = plots.roc_png(results), plots.pr_png(results)
    write("roc.png", roc)
    write("pr.png", pr)
    recall_frr = plots.recall_frr_png(results)
    write("recall_frr.png", recall_frr)

    meta = "".join(f'<div class="meta">{escape(line)}</div>' for line in _dataset_lines(results))
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="meta">generated {escape(generated)} by flawscope {escape(__version__)}'
        "</div>",
        meta,
        "<h2>Metrics</h2>",
        metrics_table(results),
        '<p class="note">A part is flagged as defect when its score is above the threshold.'
        + (" Best value per row in bold." if len(results) > 1 else "") + "</p>",
        "<h3>Thresholds</h3><ul>",
        *(f"<li><b>{escape(r.model_name)}</b>: {escape(threshold_text(r))}</li>" for r in results),
        "</ul>",
        operating_section(results, _figure(recall_frr, "Recall vs false-reject rate; filled "
                                           "marker: the model's threshold")),
        "<h2>Detection per defect type</h2>",
        per_type_table(results),
        "<h2>Curves</h2>",
        f'<div class="plots">{_figure(roc, "ROC curves")}{_figure(pr, "Precision-recall")}</div>',
    ]
    summary: dict[str, Any] = {}
    for r, slug in zip(results, slugs, strict=True):
        hist = plots.histogram_png(r)
        write(f"hist_{slug}.png", hist)
        parts += [
            f"<h2>Model: {escape(r.model_name)}</h2>",
            f'<div class="plots">{_figure(hist, f"{r.model_name}: score histogram")}</div>',
            _residual_section(r, slug, write),
            _examples(r, slug, n_examples, write) if n_examples else "",
        ]
        key = r.model_name if r.model_name not in summary else slug
        summary[key] = {
            "metrics": r.metrics,
            "per_type": r.per_type(),
            "threshold": r.info.get("threshold", {"value": r.threshold}),
            "fit_seconds": r.info.get("fit_seconds"),
            "operating_points": r.operating_summary(str(r.info.get("model_path") or "MODEL")),
        }
        if r.statistics:
            summary[key]["residual_statistics_auroc"] = r.statistics_auroc()
    parts.append("</body></html>")
    doc = {"title": title, "generated": generated, "flawscope_version": __version__,
           "models": summary}
    atomic_write_text(out / "metrics.json",
                      json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    return atomic_write_text(out / "report.html", "\n".join(parts) + "\n")
