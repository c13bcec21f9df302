"""Anomaly detectors, by name: ``create("ncae", image_size=128)``."""

from flawscope.models import autoencoder  # noqa: F401  (registers ncae, conv-ae)
from flawscope.models.base import Detector, NotFittedError
from flawscope.models.registry import create, get_model_class, list_models, register

__all__ = ["Detector", "NotFittedError", "create", "get_model_class", "list_models", "register"]
