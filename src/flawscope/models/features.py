"""Patch features of pretrained CNNs, shared by the feature-embedding detectors.

:class:`PatchEmbedding` turns raw ``uint8`` images into a grid of patch descriptors: the
backbone's chosen feature maps, optionally averaged over each 3x3 neighbourhood ("locally aware"
features of PatchCore), upsampled to the finest grid and concatenated along channels, then
optionally reduced (a fixed channel subset for PaDiM, channel averaging for PatchCore). With a
:class:`~flawscope.tiling.Tiler` it cuts full-resolution images into overlapping tiles and
stitches the feature grids back. It is pure torch: PatchCore and PaDiM build their inference
modules on it, and those export as they are.

The backbone is stored in the model file: :func:`build_extractor` rebuilds it from stored
tensors without touching the network or warning about random weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flawscope.backbones import FeatureExtractor, WeightSource
from flawscope.data.images import as_size
from flawscope.data.source import ImageInput, image_shapes, iter_batches
from flawscope.errors import ConfigError, ModelFileError
from flawscope.models.base import Detector, seed_everything
from flawscope.models.scoring import (
    MapHead,
    check_scoring,
    leave_one_out_means,
)
from flawscope.regions import map_quantile_stats
from flawscope.tiling import Tiler
from flawscope.training import progress_bar

PRECISIONS = ("float32", "bf16")
#: input sides are rounded to multiples of this (the coarsest default feature stride x 2)
SIZE_MULTIPLE = 32
#: default input size of the feature detectors (about this many pixels squared; chosen across
#: every real dataset, README "Detection quality")
DEFAULT_IMAGE_SIZE = 320
#: training images scored out of sample for the threshold (a seeded random subset)
DEFAULT_CALIBRATION_IMAGES = 300
#: photos whose median aspect ratio is within this factor of 1 are treated as square
SQUARE_TOLERANCE = 1.1


def aspect_input_size(size: int, aspect: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """``(h, w)`` with about ``size**2`` pixels and height/width ratio ``aspect``.

    Sides are rounded to multiples of ``multiple``; nearly square photos
    (within :data:`SQUARE_TOLERANCE`) get ``(size, size)``.
    """
    if aspect <= 0 or not math.isfinite(aspect):
        raise ConfigError(f"aspect ratio {aspect}: must be a positive number")
    if max(aspect, 1 / aspect) <= SQUARE_TOLERANCE:
        return size, size
    root = math.sqrt(aspect)

    def side(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    return side(size * root), side(size / root)


def check_calibration_images(value: int | None) -> None:
    if value is not None and value < 2:
        raise ConfigError(f"calibration_images={value}: must be at least 2 (or None: all)")


def resolve_input_size(
    image_size: int | Sequence[int], keep_aspect: bool, images: ImageInput
) -> tuple[int, int]:
    """The input size for ``images``: ``image_size`` as given, or, with ``keep_aspect`` and a
    single number, about ``image_size**2`` pixels at the photos' median aspect ratio."""
    if not keep_aspect or not isinstance(image_size, (int, np.integer)):
        return as_size(image_size)
    aspect = float(np.median([h / w for h, w in image_shapes(images)]))
    return aspect_input_size(int(image_size), aspect)


def holdout_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices (sorted) of at most ``limit`` of ``n`` images, a seeded random choice."""
    if limit is None or n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(limit), replace=False))


def subset(images: ImageInput, index: np.ndarray) -> ImageInput:
    """``images[index]`` for a path list or an array."""
    if isinstance(images, np.ndarray):
        return images[index]
    return [images[int(i)] for i in index]


@contextlib.contextmanager
def _quiet_backbone_log() -> Iterator[None]:
    """Mute the backbone's own INFO lines (the detector logs one line with the weight source)."""
    loggers = [logging.getLogger(n) for n in ("flawscope.backbones", "timm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def prune_unused_stages(model: nn.Module) -> nn.Module:
    """Drop the trailing blocks an EfficientNet/MobileNet feature extractor computes for nothing.

    timm's ``features_only`` EfficientNet runs every block even when only early stages are
    returned; for the default stride-8/16 layers of ``tf_efficientnet_lite0`` this saves about
    a third of the backbone time. Other models are returned unchanged.
    """
    stage_idx = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if stage_idx and isinstance(blocks, nn.Sequential) and model.feature_hooks is None:
        keep = max(stage_idx)
        if keep < len(blocks):
            model.blocks = blocks[:keep]
    return model


def build_extractor(
    backbone: str,
    layers: Sequence[int | str] | None,
    weights: str | os.PathLike[str] | None,
    device: str | torch.device,
    *,
    stored: dict[str, torch.Tensor] | None = None,
    weight_source: WeightSource | None = None,
) -> FeatureExtractor:
    """A frozen :class:`FeatureExtractor` with unused stages pruned.

    With ``stored`` (backbone tensors from a model file), the architecture is built with random
    weights, silently, and the stored tensors are loaded over them; ``weight_source`` records
    where those tensors originally came from.
    """
    if stored is None:
        with _quiet_backbone_log():
            fe = FeatureExtractor(backbone, layers, weights, device="cpu")
    else:
        with _quiet_backbone_log(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fe = FeatureExtractor(backbone, layers, "random", device="cpu")
    prune_unused_stages(fe.model)
    if stored is not None:
        try:
            fe.model.load_state_dict(stored, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(f"stored backbone {backbone} does not fit: {exc}") from None
        if weight_source is not None:
            fe.weight_source = weight_source
    fe.model.requires_grad_(False)
    fe.device = torch.device(device) if not isinstance(device, torch.device) else device
    fe.to(fe.device)
    # channels-last convolutions are ~25 % faster on CPU (oneDNN), and no slower on GPU
    fe.model.to(memory_format=torch.channels_last)
    return fe.eval()


def channel_average_matrix(dim_in: int, dim_out: int) -> torch.Tensor:
    """``dim_out x dim_in`` matrix equal to ``F.adaptive_avg_pool1d`` over channels."""
    m = torch.zeros(dim_out, dim_in)
    for i in range(dim_out):
        start = (i * dim_in) // dim_out
        end = -((-(i + 1) * dim_in) // dim_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


class PatchEmbedding(nn.Module):
    """``uint8 N x C x H x W`` -> float ``N x D x h x w`` patch descriptors.

    ``local_pool``: side of the neighbourhood averaged around each feature (3 in PatchCore,
    1 = none); ``upsample``: interpolation of coarser layers onto the finest grid;
    ``channel_index``: keep only these channels (PaDiM's random subset); ``reduce_dims``: average
    adjacent channels down to this many (PatchCore paper's dimension reduction);
    ``precision``: ``"bf16"`` runs the backbone under bfloat16 autocast; ``tiler``: cut images
    into overlapping tiles and stitch the feature grids back.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        *,
        local_pool: int = 3,
        upsample: str = "bilinear",
        channel_index: torch.Tensor | None = None,
        reduce_dims: int | None = None,
        precision: str = "float32",
        tiler: Tiler | None = None,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: choose from {', '.join(PRECISIONS)}")
        self.extractor = extractor
        self.local_pool = int(local_pool)
        self.upsample = upsample
        self.precision = precision
        self.tiler = tiler
        self.grid_stride = min(extractor.strides)
        dim = sum(extractor.channels)
        self.register_buffer(
            "channel_index",
            channel_index.long() if channel_index is not None else None,
            persistent=False,
        )
        if channel_index is not None:
            dim = len(channel_index)
        if reduce_dims is not None and reduce_dims < dim:
            self.register_buffer(
                "reduce_weight",
                channel_average_matrix(dim, reduce_dims)[:, :, None, None],
                persistent=False,
            )
            dim = reduce_dims
        else:
            self.reduce_weight = None
        self.dim = dim

    def train(self, mode: bool = True) -> PatchEmbedding:
        return super().train(False)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.extractor.preprocess(images).contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                feats = self.extractor(x)
            feats = [f.float() for f in feats]
        else:
            feats = self.extractor(x)
        if self.local_pool > 1:
            k = self.local_pool
            feats = [F.avg_pool2d(f, k, 1, k // 2) for f in feats]
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        mode = self.upsample
        feats = [
            f if f.shape[-2:] == size else F.interpolate(
                f, size=size, mode=mode, **({"align_corners": False} if mode != "nearest" else {})
            )
            for f in feats
        ]
        emb = torch.cat(feats, 1)
        if self.channel_index is not None:
            emb = emb.index_select(1, self.channel_index)
        if self.reduce_weight is not None:
            emb = F.conv2d(emb, self.reduce_weight)
        return emb

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.tiler is None:
            return self._features(images)
        tiles = self.tiler.tile(images)
        return self.tiler.untile(self._features(tiles), scale=self.grid_stride)


def make_tiler(
    tile_input_size: int | Sequence[int] | None,
    image_size: tuple[int, int],
    tile_stride: int | Sequence[int] | None,
    extractor_strides: Sequence[int],
) -> Tiler | None:
    """The tiler of a detector (None without tiling); checks the geometry fits the backbone."""
    if tile_input_size is None:
        return None
    align = max(extractor_strides)
    if any(v % align for v in image_size):
        raise ConfigError(
            f"tiling: image_size {image_size} (the tile) must be a multiple of the backbone's "
            f"largest feature stride {align}"
        )
    stride = tile_stride
    if stride is None:
        stride = tuple(max(align, (t // 2) // align * align) for t in image_size)
    return Tiler(tile_input_size, image_size, stride, align=align)


class FeatureDetector(Detector):
    """What PatchCore and PaDiM share: one streaming pass as the fit, a frozen backbone stored
    in the model file, tiling, the photo's aspect ratio, the map head (positional
    normalisation, smoothing, image score: :mod:`flawscope.models.scoring`) and out-of-sample
    scores of the training images for threshold calibration.

    Subclasses pass the common options to ``__init__`` and implement :meth:`_fit_features` and
    :meth:`_holdout_grids`; ``fit`` keeps the fitted :class:`FeatureExtractor` in
    ``extractor_``.

    Every good image given to ``fit`` is learned from. The threshold is calibrated on
    ``calibration_scores_``: scores of up to ``calibration_images`` of those training images,
    each computed by a model that has *not* seen that image (PatchCore: its own patches left
    out of the memory bank; PaDiM: the exact leave-one-out Gaussian; the positional mean
    without the image's own map). These scores stand in for the scores of new good parts, so
    no good image has to be held back.
    """

    self_calibrating = True
    #: image score rules this detector offers (:data:`flawscope.models.scoring.IMAGE_SCORES`)
    image_scores: ClassVar[tuple[str, ...]] = ("map-max", "topk-mean")

    extractor_: FeatureExtractor
    weight_source_: WeightSource

    def __init__(
        self,
        image_size: int | Sequence[int],
        channels: int | None,
        backbone: str,
        layers: Sequence[int | str] | None,
        weights: str | os.PathLike[str] | None,
        map_sigma: float,
        image_score: str,
        topk_fraction: float,
        positional: str,
        tile_input_size: int | Sequence[int] | None,
        tile_stride: int | Sequence[int] | None,
        keep_aspect: bool,
        calibration_images: int | None,
        precision: str,
        batch_size: int,
        device: str,
        seed: int,
        progress: bool,
    ) -> None:
        super().__init__(image_size, channels, batch_size, device, seed, progress)
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.map_sigma = map_sigma
        self.image_score = image_score
        self.topk_fraction = topk_fraction
        self.positional = positional
        self.tile_input_size = tile_input_size
        self.tile_stride = tile_stride
        self.keep_aspect = keep_aspect
        self.calibration_images = calibration_images
        self.precision = precision

    def validate(self) -> None:
        """Check the options every feature detector has (subclasses add their own)."""
        super().validate()
        check_calibration_images(self.calibration_images)
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision={self.precision!r}: choose from {', '.join(PRECISIONS)}"
            )
        check_scoring(self.image_score, self.positional, self.topk_fraction,
                      self.image_scores)
        if not self.map_sigma >= 0:
            raise ConfigError(f"map_sigma={self.map_sigma}: must be >= 0")

    @property
    def score_is_map_max(self) -> bool:
        return self.image_score == "map-max"

    def fit(
        self,
        images: ImageInput,
        *,
        validation: ImageInput | None = None,
        defects: ImageInput | None = None,
        checkpoint: str | Path | None = None,
        resume: bool = False,
        keep_calibration_maps: bool = False,
    ) -> FeatureDetector:
        """Stream the good ``images`` through the backbone once, then score up to
        ``calibration_images`` of them out of sample (``calibration_scores_``); returns
        ``self``. ``fit_timings_`` splits the seconds into features, coreset (PatchCore) and
        calibration.

        ``validation``, ``defects``, ``checkpoint`` and ``resume`` are accepted for the common
        API and unused: nothing is trained, one pass over the images is the whole fit.
        ``keep_calibration_maps``: keep the out-of-sample maps (``calibration_maps_``).
        """
        del validation, defects, checkpoint, resume
        self.validate()
        t0 = time.perf_counter()
        seed_everything(self.seed)
        if len(images) < 2:
            raise ConfigError(
                f"{len(images)} training image(s): at least 2 good images are needed"
            )
        channels = self._resolve_channels(images)
        self.input_size_ = self._resolve_input_size(images)
        extractor = self._new_extractor()
        self.fit_timings_ = {}
        held = holdout_subset(len(images), self.calibration_images, self.seed)
        #: patch embeddings of the calibration images, kept by a feature pass that can (so
        #: calibration does not decode and run the backbone on them again); None: recompute
        self._held_embeddings: dict[int, torch.Tensor] | None = None
        self._held_positions = held
        t_features = time.perf_counter()
        summary = self._fit_features(extractor, images, channels)
        self.fit_timings_["features_s"] = (time.perf_counter() - t_features
                                           - self.fit_timings_.get("coreset_s", 0.0))
        self.extractor_ = extractor
        self.weight_source_ = extractor.weight_source
        self.n_train_images_ = len(images)
        self.channels_ = channels
        t_cal = time.perf_counter()
        self._calibrate(subset(images, held), held, keep_calibration_maps)
        self.fit_timings_["calibration_s"] = time.perf_counter() - t_cal
        self.fit_seconds_ = time.perf_counter() - t0
        logging.getLogger(type(self).__module__).info(
            "%s: %s from %d images, %d out-of-sample calibration scores (%.1f s)",
            self.model_name, summary, len(images), len(held), self.fit_seconds_,
        )
        return self

    def _resolve_input_size(self, images: ImageInput) -> tuple[int, int]:
        if self.tile_input_size is not None:
            return self._configured_size()
        return resolve_input_size(self.image_size, self.keep_aspect, images)

    @abstractmethod
    def _holdout_grids(
        self, pixels: torch.Tensor | None, positions: np.ndarray,
        embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch-score grids ``N x h x w`` of a batch of training images (``positions``: their
        indices in the fit's image list), each from a model that left that image out; and
        their image scores where the score rule needs more than the grid (else None).
        ``embedding``: their patch embeddings kept from the feature pass (then ``pixels`` is
        None), for detectors whose :meth:`_fit_features` keeps them."""

    def _scorer_for_calibration(self) -> nn.Module:
        """The inference module, built once per calibration pass (its head is not used:
        the positional statistics come from the pass itself)."""
        if getattr(self, "_calibration_scorer", None) is None:
            self._calibration_scorer = self.inference_module()
        return self._calibration_scorer

    def head(self) -> MapHead:
        """The map head: positional normalisation, smoothing, image score."""
        mean = getattr(self, "positional_mean_", None)
        return MapHead(self.input_size, self.map_sigma, self.image_score, self.topk_fraction,
                       None if mean is None else torch.as_tensor(mean)).to(self.torch_device)

    def _calibrate(
        self, images: ImageInput, index: np.ndarray, keep_maps: bool = False
    ) -> None:
        """Out-of-sample calibration: left-out grids of ``images`` (positions ``index`` in the
        fit's list), then the positional mean (``positional_mean_``), the calibration scores
        (``calibration_scores_``, each image normalised with the mean of the *others*) and
        per-image quantiles of the maps (``calibration_map_stats_``, the pixel threshold of
        defect regions; :func:`flawscope.regions.map_quantile_stats`). ``keep_maps``: also keep
        the maps themselves (``calibration_maps_``, for an ensemble that combines them)."""
        grids, extra = [], []
        pos = 0
        self._calibration_scorer = None
        kept = getattr(self, "_held_embeddings", None)
        if kept is not None and not all(int(i) in kept for i in index):
            kept = None
        with torch.inference_mode(), progress_bar(len(index), "calibration (leave-one-out)",
                                                  self.progress) as bar:
            if kept is not None:  # the feature pass kept these images' embeddings
                batches = ((None, torch.stack([kept[int(i)] for i in index[s : s + self.
                            batch_size]])) for s in range(0, len(index), self.batch_size))
            else:
                batches = ((torch.from_numpy(b).to(self.torch_device), None) for b, _ in
                           iter_batches(images, self.input_size, self.channels_,
                                        self.batch_size))
            for pixels, emb in batches:
                n = len(pixels if emb is None else emb)
                grid, scores = self._holdout_grids(pixels, index[pos : pos + n], emb)
                pos += n
                grids.append(grid.float().cpu().numpy())
                if scores is not None:
                    extra.append(scores.float().cpu().numpy())
                bar.update(n)
        del self._calibration_scorer
        self._held_embeddings = None
        all_grids = np.concatenate(grids)
        loo = None
        if self.positional == "mean":
            mean, loo = leave_one_out_means(all_grids)
            self.positional_mean_ = mean.astype(np.float32)
        else:
            self.positional_mean_ = None
        head = self.head()
        scores, stats, kept = [], [], []
        with torch.inference_mode():
            for start in range(0, len(all_grids), 64):
                g = torch.from_numpy(all_grids[start : start + 64]).to(self.torch_device)
                m = None if loo is None else torch.from_numpy(loo[start : start + 64])
                s, maps = head(g, None if m is None else m.to(self.torch_device))
                scores.append(s.float().cpu().numpy())
                maps = maps.float().cpu().numpy()
                stats.append(map_quantile_stats(maps))
                if keep_maps:
                    kept.append(maps)
        self.calibration_scores_ = (np.concatenate(extra) if extra else
                                    np.concatenate(scores)).astype(np.float64)
        self.calibration_map_stats_ = np.concatenate(stats)
        if keep_maps:
            self.calibration_maps_ = np.concatenate(kept)

    @abstractmethod
    def _fit_features(
        self, extractor: FeatureExtractor, images: ImageInput, channels: int
    ) -> str:
        """Learn the model's state (attributes ending in ``_``) from one pass over ``images``
        through ``extractor``; returns a one-line summary for the log."""

    def get_params(self) -> dict[str, Any]:
        params = super().get_params()
        params["layers"] = None if self.layers is None else list(self.layers)
        params["weights"] = None if self.weights is None else str(self.weights)
        for key in ("image_size", "tile_input_size", "tile_stride"):
            if isinstance(params.get(key), (tuple, list)):
                params[key] = list(params[key])
        return params

    def _configured_size(self) -> tuple[int, int]:
        if self.tile_input_size is not None:
            return as_size(self.tile_input_size)
        return as_size(self.image_size)

    def _new_extractor(self) -> FeatureExtractor:
        """Build the backbone for ``fit`` and log where its weights come from."""
        fe = build_extractor(self.backbone, self.layers, self.weights, self.torch_device)
        level = logging.INFO if fe.weight_source.pretrained else logging.WARNING
        logging.getLogger(type(self).__module__).log(
            level, "%s: %s", self.model_name, fe.describe()
        )
        return fe

    def _tiler(self, extractor: FeatureExtractor) -> Tiler | None:
        return make_tiler(self.tile_input_size, as_size(self.image_size), self.tile_stride,
                          extractor.strides)

    def _extractor_on_device(self) -> FeatureExtractor:
        dev = self.torch_device
        if self.extractor_.device != dev:
            self.extractor_.device = dev
            self.extractor_.to(dev)
        return self.extractor_

    def _describe_backbone(self) -> dict[str, Any]:
        fe = self.extractor_
        tiler = self._tiler(fe)
        return {
            "backbone": self.backbone,
            "weights": fe.describe(),
            "weight_source": self.weight_source_.to_dict(),
            "layers": [f"stride {s}, {c} channels" for s, c in zip(fe.strides, fe.channels)],
            "input_size": list(self.input_size),
            "tiles": None if tiler is None else
            f"{tiler.num_tiles} tiles of {list(tiler.tile_size)} px, stride "
            f"{list(tiler.stride)}",
        }

    def _backbone_tensors(self) -> dict[str, torch.Tensor]:
        """The backbone's state as ``backbone.*`` tensors for the model file, and the
        positional mean where there is one."""
        out = {f"backbone.{k}": v.detach().cpu()
               for k, v in self.extractor_.model.state_dict().items()}
        if getattr(self, "positional_mean_", None) is not None:
            out["positional_mean"] = torch.as_tensor(self.positional_mean_).float()
        return out

    def learned_config(self) -> dict[str, Any]:
        """What ``fit`` records for every feature detector; subclasses add their own keys."""
        return {
            "channels_": self.channels_,
            "weight_source_": self.weight_source_.to_dict(),
            "fit_timings_": {k: round(v, 3) for k, v in self.fit_timings_.items()},
            "grid_size_": self.grid_size_,
            "input_size_": list(self.input_size),
            "n_train_images_": self.n_train_images_,
            "fit_seconds_": round(self.fit_seconds_, 3),
        }

    def load_state(self, learned: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """The backbone and the keys of :meth:`learned_config`; subclasses restore their own
        state first, then call this (``channels_``, which marks the detector fitted, last)."""
        self._load_backbone(learned, tensors)
        self.grid_size_ = list(learned.get("grid_size_", []))
        if "input_size_" in learned:  # files before format 2 load at image_size
            self.input_size_ = tuple(int(v) for v in learned["input_size_"])
        self.n_train_images_ = int(learned.get("n_train_images_", 0))
        self.fit_seconds_ = float(learned.get("fit_seconds_", 0.0))
        self.fit_timings_ = dict(learned.get("fit_timings_", {}))
        mean = tensors.get("positional_mean")
        if self.positional == "mean" and mean is None:
            raise ModelFileError("positional normalisation without its positional_mean tensor")
        self.positional_mean_ = None if mean is None else mean.float().numpy()
        self.channels_ = int(learned["channels_"])

    def _load_backbone(self, learned: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        stored = {
            k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")
        }
        if not stored:
            raise ModelFileError("model file holds no backbone tensors")
        source = WeightSource.from_dict(learned["weight_source_"])
        self.extractor_ = build_extractor(self.backbone, self.layers, None, self.torch_device,
                                          stored=stored, weight_source=source)
        self.weight_source_ = source
