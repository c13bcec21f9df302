"""Text views of a training run: the configuration and the per-class flip rule as data.

Design document 000 switches flips off for classes where a flip *is* a defect (``metal_nut``
has a ``flip`` state). flawscope keeps that rule as data - the ``no_flip_classes`` list of the
augmentation policy, stored in the model file - and :func:`flip_table` shows, per object class
of the training data, whether its images are flipped.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from flawscope.classify.augment import AugmentPolicy
from flawscope.classify.config import ClassifierConfig
from flawscope.classify.data import LabelTable


def flip_table(table: LabelTable, policy: AugmentPolicy) -> list[dict[str, Any]]:
    """One row per object class: images, labels, and ``flips``: ``yes`` / ``no (rule)``, or
    ``partly`` when only some of its labels are excluded (a label listed in the policy)."""
    flips = not policy.is_identity and policy.enabled and (policy.hflip > 0 or policy.vflip > 0)
    banned = set(policy.no_flip_classes)
    rows: dict[str, dict[str, Any]] = {}
    images = Counter(it.object_class for it in table.items)
    for it in table.items:
        row = rows.setdefault(it.object_class, {
            "class": it.object_class, "images": images[it.object_class], "labels": set(),
            "excluded": set(),
        })
        row["labels"].add(it.label)
        if it.object_class in banned or it.label in banned:
            row["excluded"].add(it.label)
    out = []
    for name in sorted(rows):
        r = rows[name]
        if not flips:
            state = "no (policy has no flips)"
        elif name in banned:
            state = "no (no_flip_classes)"
        elif r["excluded"]:
            state = f"partly (not {', '.join(sorted(r['excluded']))})"
        else:
            state = "yes"
        out.append({"class": name, "images": r["images"], "labels": len(r["labels"]),
                    "flips": state})
    return out


def config_rows(cfg: ClassifierConfig) -> list[tuple[str, str]]:
    """The options of a run as (name, value) rows, for printing."""
    a = cfg.augment
    lr = "optimizer default" if cfg.learning_rate is None else f"{cfg.learning_rate:g}"
    wd = "optimizer default" if cfg.weight_decay is None else f"{cfg.weight_decay:g}"
    aug = "none" if not a.enabled else (
        f"affine +-{a.affine_degrees:g} deg, rotation {a.rotation[0]:g}..{a.rotation[1]:g} deg"
        f"{', quarter turns' if a.rot90 else ''}, hflip {a.hflip:g}, vflip {a.vflip:g}"
    )
    refits = f"{cfg.refits} model{'s' if cfg.refits > 1 else ''} on every image"
    model = {"none": f"the {cfg.folds} fold model(s)", "replace": refits,
             "add": f"the {cfg.folds} fold model(s) + {refits}"}[cfg.refit]
    return [
        ("recipe", cfg.recipe),
        ("backbone", f"{cfg.backbone} (weights: {cfg.weights or 'auto'})"),
        ("image size", str(cfg.image_size)),
        ("folds / epochs / patience", f"{cfg.folds} / {cfg.epochs} / {cfg.patience}"),
        ("batch size", str(cfg.batch_size)),
        ("optimizer", f"{cfg.optimizer}, lr {lr}, weight decay {wd}, schedule "
                      f"{cfg.lr_schedule}, head warm-up epochs {cfg.freeze_epochs}"),
        ("loss weights / sampler / label smoothing / normalization",
         f"{cfg.class_weight} / {cfg.sampler} / {cfg.label_smoothing:g} / {cfg.normalization}"),
        ("drop path rate", f"{cfg.drop_path_rate:g}"),
        ("pooling / output stride", f"{cfg.pooling} / {cfg.output_stride}"),
        ("model / test-time augmentation", f"{model} / {cfg.tta}"),
        ("augmentation", aug),
        ("no_flip_classes", ", ".join(a.no_flip_classes) or "(none)"),
    ]
