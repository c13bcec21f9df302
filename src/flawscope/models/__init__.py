"""Anomaly detectors, by name: ``create("ncae", image_size=128)``."""

# importing a detector module registers its detectors: ncae, conv-ae, padim, patchcore,
# patchcore-ensemble
from flawscope.models import autoencoder, ensemble, padim, patchcore  # noqa: F401
from flawscope.models.base import Detector, NotFittedError
from flawscope.models.registry import create, get_model_class, list_models, register

__all__ = ["Detector", "NotFittedError", "create", "get_model_class", "list_models", "register"]
