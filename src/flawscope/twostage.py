"""Two-stage inspection: the detector says *defect, here*; a type classifier says *which*.

The anomaly detector (learned from good parts) keeps the verdict. For every part it rejects
(``verdict == "defect"``), a classifier trained on labelled defect images names the defect
type, e.g. ``metal_nut-bent``, with its probability. The classifier looks at either

``image``
    the whole image, as the class + state classifier does;
``region``
    a square crop around the detector's strongest defect region (the region with the highest
    ``max_score``), grown by ``margin`` of its side on every side and at least ``min_side`` of
    the image's shorter side, so that small defects fill more of the classifier's input.
    Trained on the same crops around the ground-truth masks of the training defects. A rejected
    part without a region is classified on the whole image.

Which one a model uses is stored in its file (``two_stage.input``), chosen at fit time.
Several models of the same labels can be given together (``predict --classifier A
--classifier B``): their probabilities are averaged, each model on its own input. On MVTec
bottle + pill + metal_nut an image and a region model together named the type of more rejected
parts right than either alone (``docs/classifier.md``).

**Type-training and evaluation split.** MVTec-style datasets hold their defects in ``test/``
only, so the defect images are split deterministically per defect type: the images of a type
are ordered by :func:`~flawscope.data.dataset.hash_fraction` of ``type:<class>/<type>/<file
name>`` and the first ``round(fraction * n)`` (at least one, and at least one left when there
are two or more) learn the types (``type-train``); the rest evaluate the two stages
(``type-eval``). The split depends on the file names only, never on their order or on the
other types; adding an image moves at most one other image of its type.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flawscope.classify.data import LabelledImage, LabelTable, combine_tables, crop_pixels
from flawscope.data.dataset import Sample, hash_fraction, open_dataset
from flawscope.data.images import decode_image
from flawscope.errors import ConfigError, DatasetError

INPUTS = ("image", "region")
#: share of each defect type's images that trains the type classifier (the rest evaluates):
#: 70 / 30, as the folder layout splits good images (``FOLDER_TEST_FRACTION``)
TYPE_TRAIN_FRACTION = 0.7
#: a type classifier trains for at least this many optimizer steps unless ``--epochs`` is
#: given: type-training sets are small (MVTec bottle + pill + metal_nut: 210 images, 14 steps
#: of 16 an epoch; the class + state recipe's 8 epochs on its 849 images take 425 steps)
MIN_TYPE_STEPS = 256
#: a region crop grows by this share of the region's side on every side (context)
REGION_MARGIN = 0.25
#: a region crop is at least this share of the image's shorter side
REGION_MIN_SIDE = 0.25
PARTS = ("type-train", "type-eval")

Box = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- the split
def type_key(sample: Sample) -> str:
    """The hashed key of a defect image: its class, type and file name."""
    return f"type:{sample.object_class}/{sample.defect_type}/{Path(sample.path).name}"


def split_defects(
    samples: Sequence[Sample], fraction: float = TYPE_TRAIN_FRACTION
) -> tuple[list[Sample], list[Sample]]:
    """The defect ``samples`` (good ones are left out) as (type-train, type-eval) lists, in
    their input order; per type the first ``round(fraction * n)`` by hash go to type-train."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--type-train-fraction {fraction}: must be in (0, 1)")
    by_type: dict[str, list[Sample]] = {}
    for s in samples:
        if s.is_defect:
            by_type.setdefault(s.state_label, []).append(s)
    train: set[Path] = set()
    for group in by_type.values():
        ranked = sorted(group, key=lambda s: (hash_fraction(type_key(s)), str(s.path)))
        n = len(ranked)
        k = min(max(round(fraction * n), 1), n - 1) if n >= 2 else n
        train.update(s.path for s in ranked[:k])
    defects = [s for s in samples if s.is_defect]
    return [s for s in defects if s.path in train], [s for s in defects if s.path not in train]


def defect_samples(roots: Sequence[str | os.PathLike], format: str = "auto") -> list[Sample]:
    """Every sample (good and defect) of the dataset folders ``roots``; an error naming the
    folders when none holds a labelled defect."""
    if not roots:
        raise DatasetError("no data given: pass dataset folders with defect images")
    samples = [s for r in roots for s in open_dataset(r, format).samples]
    if not any(s.is_defect for s in samples):
        raise DatasetError(f"{', '.join(map(str, roots))}: no defect images (a type classifier "
                           "learns from labelled defects, e.g. MVTec test/<type>/)")
    return samples


# ----------------------------------------------------------------------------- crops
def mask_box(mask_path: str | os.PathLike, image_hw: tuple[int, int] | None = None) -> Box | None:
    """Bounding box ``(x0, y0, x1, y1)`` of a mask's defect pixels (value >= 128), in the
    pixels of an image of ``image_hw`` (default: the mask's own size); None if empty."""
    mask, (w, h) = decode_image(Path(mask_path), channels=1)
    ys, xs = np.nonzero(mask[:, :, 0] >= 128)
    if len(xs) == 0:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    if image_hw is None or tuple(image_hw) == (h, w):
        return box
    return scale_box(box, (h, w), image_hw)


def scale_box(box: Sequence[float], from_hw: Sequence[int], to_hw: Sequence[int]) -> Box:
    """``box`` in an image of ``from_hw`` -> the same box in an image of ``to_hw``."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    x0, y0, x1, y1 = box
    return (int(np.floor(x0 * sx)), int(np.floor(y0 * sy)),
            int(np.ceil(x1 * sx)), int(np.ceil(y1 * sy)))


def region_crop(
    box: Sequence[float], image_hw: Sequence[int], margin: float = REGION_MARGIN,
    min_side: float = REGION_MIN_SIDE,
) -> Box:
    """The square crop around a defect ``box`` (x0, y0, x1, y1) in an image of ``image_hw``:
    grown by ``margin`` x its longer side on every side, at least ``min_side`` x the image's
    shorter side, shifted to lie inside the image (and cut to it if larger)."""
    h, w = int(image_hw[0]), int(image_hw[1])
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0)
    side = max(side * (1.0 + 2.0 * margin), min_side * min(h, w))
    side = min(side, float(max(h, w)))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def place(c: float, extent: int) -> tuple[int, int]:
        s = min(side, float(extent))
        lo = min(max(c - s / 2.0, 0.0), extent - s)
        return int(round(lo)), int(round(lo + s))

    (a0, a1), (b0, b1) = place(cx, w), place(cy, h)
    return a0, b0, a1, b1


def type_table(
    samples: Sequence[Sample], input: str = "image", *, margin: float = REGION_MARGIN,
    min_side: float = REGION_MIN_SIDE, sources: Sequence[str] = (),
) -> LabelTable:
    """Defect samples as a label table (``class-type`` labels); with ``input="region"`` every
    item carries the crop around its ground-truth mask (:func:`region_crop`)."""
    check_input(input)
    items = []
    for s in samples:
        box = None
        if input == "region":
            if s.mask_path is None:
                raise DatasetError(f"{s.path}: no ground-truth mask; --input region crops the "
                                   "training defects around their masks (MVTec ground_truth/); "
                                   "use --input image")
            hw = _image_hw(s.path)
            found = mask_box(s.mask_path, hw)
            if found is None:
                raise DatasetError(f"{s.mask_path}: empty mask for the defect image {s.path}")
            box = region_crop(found, hw, margin, min_side)
        items.append(LabelledImage(Path(s.path), s.object_class, s.defect_type, s.state_label,
                                   box=box))
    if not items:
        raise DatasetError("no defect images to learn types from")
    return LabelTable(items, list(sources))


def defect_type_table(
    roots: Sequence[str | os.PathLike], part: str = "type-train", *,
    fraction: float = TYPE_TRAIN_FRACTION, input: str = "image", format: str = "auto",
    margin: float = REGION_MARGIN, min_side: float = REGION_MIN_SIDE,
) -> LabelTable:
    """The ``part`` (``type-train`` or ``type-eval``, :func:`split_defects`) of the defect
    images of the dataset folders ``roots``, as a table for :func:`fit_classifier`."""
    if part not in PARTS:
        raise ConfigError(f"part {part!r}: choose from {', '.join(PARTS)}")
    tables = []
    for root in roots:
        samples = defect_samples([root], format)
        train, evaluate = split_defects(samples, fraction)
        chosen = train if part == "type-train" else evaluate
        if chosen:
            tables.append(type_table(chosen, input, margin=margin, min_side=min_side,
                                     sources=[f"{root} ({part}, fraction {fraction:g})"]))
    if not tables:
        raise DatasetError(f"{', '.join(map(str, roots))}: no defect images in {part}")
    return combine_tables(tables)


def two_stage_config(
    input: str, fraction: float, margin: float = REGION_MARGIN, min_side: float = REGION_MIN_SIDE
) -> dict[str, Any]:
    """The ``two_stage`` section of a type classifier's model file."""
    check_input(input)
    return {"two_stage": {"defects_only": True, "input": input, "margin": margin,
                          "min_side": min_side, "type_train_fraction": fraction,
                          "split": "per type, first round(fraction * n) by hash_fraction("
                                   "'type:<class>/<type>/<file name>')"}}


def type_epochs(n_images: int, batch_size: int, epochs: int,
                min_steps: int = MIN_TYPE_STEPS) -> int:
    """``epochs``, raised so that training on ``n_images`` in batches of ``batch_size`` takes
    at least ``min_steps`` optimizer steps."""
    steps = max(math.ceil(n_images / max(batch_size, 1)), 1)
    return max(int(epochs), math.ceil(min_steps / steps))


def check_input(input: str) -> None:
    if input not in INPUTS:
        raise ConfigError(f"--input {input}: choose from {', '.join(INPUTS)}")


def _image_hw(path: str | os.PathLike) -> tuple[int, int]:
    from flawscope.data.images import image_dimensions

    return image_dimensions(path)


# ----------------------------------------------------------------------------- naming
def load_type_classifier(path: str | os.PathLike, device: str = "auto") -> Any:
    """``--classifier FILE``: a classifier model file or its ``.onnx`` export; anything else
    (e.g. a detector file) raises :class:`ModelFileError` in one line naming the file."""
    from flawscope.classify.export import load_classifier
    from flawscope.errors import FlawscopeError, ModelFileError

    if not Path(path).is_file():
        raise ModelFileError(f"--classifier {path}: no such file")
    try:
        return load_classifier(path, device=device)
    except ModelFileError as exc:
        raise ModelFileError(f"--classifier {exc}") from None
    except FlawscopeError:
        raise
    except Exception as exc:  # e.g. weights that do not build
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"--classifier {path}: cannot load the classifier "
                             f"({type(exc).__name__}: {first})") from None


#: what ``predict --classifier`` adds to a row: the JSON record (nested), or CSV columns
TYPE_COLUMNS = ("defect_type", "defect_type_probability")


def with_types(
    rows: Sequence[Any], types: Sequence[dict[str, Any] | None] | None, how: str = "json"
) -> list[Any]:
    """``predict`` output rows with the :func:`name_defects` records added (``types`` None:
    unchanged). ``how``: ``json`` (dicts get ``defect_type``: the record or null), ``csv``
    (dicts get :data:`TYPE_COLUMNS` as text) or ``table`` (lists get the label and its
    probability as one cell)."""
    if types is None:
        return list(rows)
    out = []
    for row, t in zip(rows, types, strict=True):
        if how == "json":
            out.append({**row, "defect_type": t})
        elif how == "csv":
            out.append({**row, "defect_type": "" if t is None else t["label"],
                        "defect_type_probability": "" if t is None
                        else f"{t['probability']:.6f}"})
        else:
            out.append([*row, "" if t is None else f"{t['label']} ({t['probability']:.2f})"])
    return out


def strongest_region(prediction: Any) -> Any | None:
    """The defect region with the highest ``max_score`` (regions marked ``watch`` only when
    there is no other), or None."""
    regions = list(getattr(prediction, "regions", None) or [])
    firm = [r for r in regions if getattr(r, "status", "defect") != "watch"] or regions
    return max(firm, key=lambda r: float(r.max_score), default=None)


def classifier_input(classifier: Any, input: str | None = None) -> dict[str, Any]:
    """How ``classifier`` sees a part: its ``two_stage`` settings, ``input`` overriding."""
    ts = dict(classifier.config.get("two_stage") or {})
    out = {"input": input or ts.get("input", "image"),
           "margin": float(ts.get("margin", REGION_MARGIN)),
           "min_side": float(ts.get("min_side", REGION_MIN_SIDE))}
    check_input(out["input"])
    return out


def _as_image(item: Any, fallback: Any) -> np.ndarray:
    """A decoded ``H x W x 3`` uint8 image from a path, encoded bytes or an array (``H x W``,
    ``H x W x C``); ``None`` uses ``fallback`` (the prediction's path)."""
    source = fallback if item is None else item
    if source is None:
        raise ConfigError("name_defects: no image for a prediction without a path")
    if isinstance(source, np.ndarray):
        arr = source[:, :, None] if source.ndim == 2 else source
        if arr.ndim != 3 or arr.dtype != np.uint8:
            raise ConfigError(f"name_defects: images must be uint8 H x W [x C], got "
                              f"{source.dtype} {source.shape}")
        return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), channels=3)[0]
    return decode_image(Path(source), channels=3)[0]


def name_defects(
    classifier: Any,
    predictions: Sequence[Any],
    images: Sequence[Any] | None = None,
    *,
    input: str | None = None,
    tta: str | None = None,
    batch_size: int = 32,
    probabilities: bool = False,
) -> list[dict[str, Any] | None]:
    """The defect type of every rejected part: one record per prediction, None where the
    detector's verdict is not ``defect``.

    ``classifier``: a :class:`~flawscope.classify.Classifier` or ``OnnxClassifier`` (a type
    classifier from ``classify fit --defects-only``, or any class + state classifier), or a
    list of them with the same labels (e.g. an ``image`` and a ``region`` model), whose
    probabilities are averaged, each on its own input. ``predictions``: the detector's
    :class:`~flawscope.pipeline.Prediction` list (``verdict``, ``regions`` with ``bbox`` in
    original-image pixels, ``image_size``, ``path``). ``images``: the same parts, each a path,
    encoded bytes or a decoded uint8 ``H x W x C`` array at any size (boxes are scaled from
    ``prediction.image_size``); None reads ``prediction.path``. ``input``: ``image`` or
    ``region`` for every model (default: each model's own). Records:
    ``{"label", "class", "state", "probability", "input", "box"}`` where ``input`` is what
    was classified (``image``, ``region`` - also ``image`` when a rejected part has no region -
    or both joined by ``+``) and ``box`` the region crop (x0, y0, x1, y1) in original-image
    pixels (None without one); with ``probabilities`` also ``probabilities`` (one per label).
    """
    from flawscope.classify.tta import prediction_records

    models = list(classifier) if isinstance(classifier, (list, tuple)) else [classifier]
    if not models:
        raise ConfigError("name_defects: no classifier given")
    labels = list(models[0].labels)
    for m in models[1:]:
        if list(m.labels) != labels:
            raise ConfigError("name_defects: the classifiers have different labels; only "
                              "models of the same defect types can be averaged")
    if images is not None and len(images) != len(predictions):
        raise ConfigError(f"name_defects: {len(images)} images for {len(predictions)} "
                          "predictions")
    hows = [classifier_input(m, input) for m in models]
    label_classes = models[0].config.get("label_classes") or {}
    out: list[dict[str, Any] | None] = [None] * len(predictions)
    todo = [i for i, p in enumerate(predictions) if p.verdict == "defect"]
    step = max(int(batch_size), 1)
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        decoded = [_as_image(None if images is None else images[i], predictions[i].path)
                   for i in chunk]
        proba = np.zeros((len(chunk), len(labels)), np.float64)
        used: list[list[str]] = [[] for _ in chunk]
        boxes: list[Box | None] = [None] * len(chunk)
        for model, how in zip(models, hows):
            pixels = []
            for j, (i, image) in enumerate(zip(chunk, decoded)):
                p = predictions[i]
                region = strongest_region(p) if how["input"] == "region" else None
                local = None
                if region is not None:
                    orig = tuple(p.image_size) if p.image_size else image.shape[:2]
                    boxes[j] = region_crop(region.bbox, orig, how["margin"], how["min_side"])
                    local = (boxes[j] if orig == image.shape[:2]
                             else scale_box(boxes[j], orig, image.shape[:2]))
                pixels.append(crop_pixels(image, local, model.image_size))
                kind = "image" if local is None else "region"
                if kind not in used[j]:
                    used[j].append(kind)
            batch = np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2))
            proba += model.proba_from_uint8(batch, tta)
        proba /= len(models)
        records = prediction_records(proba, labels, label_classes)
        for j, (i, rec) in enumerate(zip(chunk, records)):
            rec["input"] = "+".join(used[j])
            rec["box"] = None if boxes[j] is None else [int(v) for v in boxes[j]]
            if probabilities:
                rec["probabilities"] = [float(v) for v in proba[j]]
            out[i] = rec
    return out


# ----------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class TypeEvaluation:
    """Types named on the rejected parts of a labelled evaluation set."""

    rows: list[dict[str, Any]]  # path, true label, verdict, named label, probability, input
    types: list[str]  # the true defect types (rows of the confusion table)

    @property
    def metrics(self) -> dict[str, Any]:
        defects = [r for r in self.rows if r["true"] != "good"]
        rejected = [r for r in defects if r["verdict"] == "defect"]
        right = sum(r["named"] == r["true"] for r in rejected)
        good = [r for r in self.rows if r["true"] == "good"]
        false_rejects = [r for r in good if r["verdict"] == "defect"]
        per_type = {}
        for t in self.types:
            rt = [r for r in rejected if r["true"] == t]
            per_type[t] = {"defects": sum(r["true"] == t for r in defects),
                           "rejected": len(rt),
                           "named_right": sum(r["named"] == t for r in rt)}
        return {
            "defects": len(defects), "rejected_defects": len(rejected),
            "type_accuracy": right / len(rejected) if rejected else float("nan"),
            "named_right": right,
            "good": len(good), "false_rejects": len(false_rejects),
            "false_reject_types": dict(Counter(r["named"] for r in false_rejects)),
            "per_type": per_type, "confusion": self.confusion(),
        }

    def confusion(self) -> dict[str, Any]:
        """Rejected true defects: rows true type, columns named type (counts)."""
        rejected = [r for r in self.rows if r["true"] != "good" and r["verdict"] == "defect"]
        named = sorted({r["named"] for r in rejected} | set(self.types))
        counts = Counter((r["true"], r["named"]) for r in rejected)
        return {"true": list(self.types), "named": named,
                "counts": [[counts[t, n] for n in named] for t in self.types]}


def evaluate_types(
    detector: Any,
    classifier: Any,
    roots: Sequence[str | os.PathLike],
    *,
    fraction: float | None = None,
    input: str | None = None,
    tta: str | None = None,
    format: str = "auto",
    include_good: bool = True,
) -> TypeEvaluation:
    """Both stages on the ``type-eval`` defects of ``roots`` (never trained on by a type
    classifier fitted with the same ``fraction``, default the models') and, with
    ``include_good``, the dataset's good test images (false rejects also get a type).
    ``classifier``: one model or several (averaged, :func:`name_defects`)."""
    models = list(classifier) if isinstance(classifier, (list, tuple)) else [classifier]
    stored = {float((m.config.get("two_stage") or {}).get("type_train_fraction",
                                                          TYPE_TRAIN_FRACTION)) for m in models}
    if fraction is None and len(stored) > 1:
        raise ConfigError(f"the classifiers were trained on different type splits (fractions "
                          f"{', '.join(map(str, sorted(stored)))}); pass --type-train-fraction")
    fraction = float(fraction if fraction is not None else stored.pop())
    samples = defect_samples(roots, format)
    _, evaluate = split_defects(samples, fraction)
    chosen = list(evaluate)
    if include_good:
        chosen += [s for s in samples if not s.is_defect and s.split == "test"]
    preds = detector.predict([s.path for s in chosen])
    names = name_defects(models, preds, [s.path for s in chosen], input=input, tta=tta)
    rows = []
    for s, p, n in zip(chosen, preds, names):
        rows.append({"path": str(s.path), "true": s.state_label if s.is_defect else "good",
                     "score": float(p.score), "verdict": p.verdict,
                     "named": None if n is None else n["label"],
                     "probability": None if n is None else n["probability"],
                     "input": None if n is None else n["input"]})
    types = sorted({s.state_label for s in evaluate})
    return TypeEvaluation(rows, types)
