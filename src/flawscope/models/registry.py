"""A small model registry: ``@register("name")`` on a class, ``create("name", **kw)``."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from flawscope.errors import ConfigError

if TYPE_CHECKING:
    from flawscope.models.base import Detector

_REGISTRY: dict[str, type[Detector]] = {}
T = TypeVar("T", bound="type[Detector]")


def register(name: str):
    """Class decorator: make a detector available by ``name``."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        cls.model_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[Detector]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"--model {name}: unknown model; choose from {', '.join(list_models())}"
        ) from None


def check_options(name: str, options: dict) -> type[Detector]:
    """The model class, after checking that every option is one of its ``__init__`` keywords."""
    cls = get_model_class(name)
    allowed = cls.param_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model {name}: unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(allowed)}"
        )
    return cls


def create(name: str, **kwargs) -> Detector:
    """Instantiate a registered detector; unknown options are reported by name."""
    detector = check_options(name, kwargs)(**kwargs)
    detector.validate()
    return detector
