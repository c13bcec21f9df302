"""Supervised class + state classification (the Dacon pipeline of the design doc "Seed 000").

Labelled images (a Dacon CSV or any dataset folder flawscope reads) train a timm backbone
with stratified K-fold cross-validation, early stopping on macro F1 and a fold ensemble::

    from flawscope.classify import ClassifierConfig, fit_classifier, load_table, Classifier

    table = load_table(["data/casting", "data/magnetic_tile"])
    cfg = ClassifierConfig.from_recipe("cpu", image_size=128)   # or ClassifierConfig(...)
    result = fit_classifier(table, cfg, output="parts.safetensors")
    print(result.metrics["macro_f1"])             # out-of-fold macro F1
    clf = Classifier.load("parts.safetensors")
    clf.predict(["new/part1.png"])                # -> ["casting-defect"]
    clf.classify(["new/part1.png"], tta="flips")  # -> [{"label", "class", "state", "probability"}]

Benchmarks (README "Classifier at the acceptance budget"; ``--folds 2 --epochs 8 --image-size
192``, the cpu recipe, 2-core CPU): hold-out macro F1 on MVTec bottle + pill (12 labels) 0.845 /
0.791 / 0.805 on three splits, casting + magnetic tile (8 labels) 0.972.

ONNX: :func:`flawscope.classify.export.export_classifier_onnx` and
:class:`flawscope.classify.export.OnnxClassifier` (same ``predict`` / ``classify``).
"""

from flawscope.classify.augment import AugmentPolicy
from flawscope.classify.config import RECIPES, ClassifierConfig
from flawscope.classify.data import (
    LabelledImage,
    LabelTable,
    cached_pixels,
    load_table,
    read_label_csv,
    stratified_sample,
    table_from_datasets,
    table_from_mvtec,
    write_label_csv,
)
from flawscope.classify.folds import FoldResult
from flawscope.classify.metrics import classification_metrics
from flawscope.classify.model import Classifier
from flawscope.classify.predict import evaluate_classifier, predict_paths
from flawscope.classify.train import FitResult, fit_classifier

__all__ = [
    "RECIPES",
    "AugmentPolicy",
    "Classifier",
    "ClassifierConfig",
    "FitResult",
    "FoldResult",
    "LabelTable",
    "LabelledImage",
    "cached_pixels",
    "classification_metrics",
    "evaluate_classifier",
    "fit_classifier",
    "load_table",
    "predict_paths",
    "read_label_csv",
    "stratified_sample",
    "table_from_datasets",
    "table_from_mvtec",
    "write_label_csv",
]
