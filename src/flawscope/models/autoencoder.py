"""Convolutional autoencoders: NCAE (Neighbor Convolution AutoEncoder) and a plain conv-AE.

NCAE is the method of the design document "Neighbor Convolution AutoEncoder": every
stride-1 convolution is a :class:`~flawscope.nn.NeighborConv2d`, which sees a pixel's 8
neighbours but never the pixel itself, so the network cannot learn to copy its input. The
conv-AE baseline has exactly the same shape with ordinary 3x3 convolutions.

Trained on good images only (MSE reconstruction loss, Adam, early stopping on a held-out slice
of good images, atomic per-epoch checkpoints that ``resume`` continues). The image score is
one of the residual statistics of :mod:`flawscope.residual`, the maximum of the smoothed
residual map (``map-max``), or ``learned``: a logistic regression over all statistics, fitted
when labelled defect images are given.

Benchmark (``benchmarks/bench_autoencoders.py``, 128 px, 1 % false-reject threshold):

    casting, 2156 fit images, 30 epochs    image AUROC   AUPRC   F1 / acc (F1-optimal threshold)
    ncae                                   0.976         0.989   0.950 / 0.928
    conv-ae                                0.991         0.996   0.969 / 0.957
    magnetic tile, 20 epochs               image AUROC   pixel AUROC   AUPRO
    ncae                                   0.551         0.592         0.497
    conv-ae                                0.589         0.611         0.540

NCAE meets the design document's 0.97 on casting but does not beat the same-shape conv-AE;
README "Benchmarks" has the full tables and the reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flawscope.data.source import ImageInput, to_array
from flawscope.errors import ConfigError
from flawscope.models.base import Detector, seed_everything
from flawscope.models.registry import register
from flawscope.nn.blur import GaussianBlur2d
from flawscope.nn.neighbor_conv import NeighborConv2d
from flawscope.residual import LOWER_IS_ABNORMAL, STATISTICS, residual_statistics
from flawscope.training import Epoch, TrainCheckpoint, TrainLoop, config_fingerprint, progress_bar

SCORE_RULES = (*STATISTICS, "map-max", "learned")
_NEGATED = LOWER_IS_ABNORMAL  # negated so that every score rule follows "higher = abnormal"


def _conv3x3(cin: int, cout: int, neighbor: bool) -> nn.Module:
    return NeighborConv2d(cin, cout) if neighbor else nn.Conv2d(cin, cout, 3, padding=1)


class AutoencoderNet(nn.Module):
    """A light convolutional autoencoder for CPU training.

    Encoder: a 3x3 convolution at full resolution, then per level a stride-2 3x3 convolution;
    a 1x1 bottleneck of ``latent_channels``; the decoder mirrors it with stride-2 4x4
    transposed convolutions and ends in a 3x3 convolution with a sigmoid (inputs are in
    [0, 1]). BatchNorm + ReLU between layers. With ``neighbor=True`` both full-resolution 3x3
    convolutions are :class:`NeighborConv2d`: the first layer never sees the centre pixel, and
    each output pixel is predicted from its neighbours' decoded features.

    Any input size works: an input whose sides are not multiples of :attr:`downsampling` is
    padded (reflect, split evenly between the sides) to the next multiple and the output is
    cropped back.
    """

    def __init__(
        self, in_channels: int, widths: Sequence[int], latent_channels: int, neighbor: bool
    ) -> None:
        super().__init__()
        w = list(widths)
        enc: list[nn.Module] = [_conv3x3(in_channels, w[0], neighbor), nn.ReLU(inplace=True)]
        for a, b in zip(w[:-1], w[1:]):
            enc += [nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        enc += [nn.Conv2d(w[-1], latent_channels, 1)]
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, w[-1], 1), nn.ReLU(inplace=True)]
        for a, b in zip(w[::-1][:-1], w[::-1][1:]):
            dec += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        dec += [_conv3x3(w[0], in_channels, neighbor), nn.Sigmoid()]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.downsampling = 2 ** (len(w) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.downsampling, -w % self.downsampling
        if not (ph or pw):
            return self.decoder(self.encoder(x))
        top, left = ph // 2, pw // 2
        # reflect needs each pad smaller than the side; tiny inputs repeat the edge instead
        mode = "reflect" if ph - top < h and pw - left < w else "replicate"
        y = self.decoder(self.encoder(F.pad(x, (left, pw - left, top, ph - top), mode=mode)))
        return y[..., top : top + h, left : left + w]


class ResidualScorer(nn.Module):
    """uint8 pixels -> (image score, smoothed absolute-residual map)."""

    def __init__(
        self,
        net: AutoencoderNet,
        score: str,
        map_sigma: float,
        combination: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None,
    ) -> None:
        super().__init__()
        self.net = net.eval()
        self.blur = GaussianBlur2d(map_sigma)
        self.score_rule = score
        self.stat_index = STATISTICS.index(score) if score in STATISTICS else -1
        self.sign = -1.0 if score in _NEGATED else 1.0
        if combination is not None:
            mean, scale, coef, intercept = combination
            self.register_buffer("stat_mean", mean.float())
            self.register_buffer("stat_scale", scale.float())
            self.register_buffer("coef", coef.float())
            self.intercept = float(intercept)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return x - self.net(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_residual(self.residual(x))

    def score_residual(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals ``N x C x H x W`` -> (image scores, smoothed absolute-residual maps)."""
        amap = self.blur(r.abs().mean(1, keepdim=True))[:, 0]
        if self.score_rule == "map-max":
            return amap.flatten(1).amax(1), amap
        stats = residual_statistics(r)
        if self.score_rule == "learned":
            z = (stats - self.stat_mean) / self.stat_scale
            return z @ self.coef + self.intercept, amap
        return self.sign * stats[:, self.stat_index], amap


class _AutoencoderDetector(Detector):
    """Shared training and scoring of the two autoencoders (``neighbor`` tells them apart)."""

    neighbor: bool = True

    def __init__(
        self,
        image_size: int | Sequence[int] = 128,
        channels: int | None = None,
        widths: Sequence[int] = (16, 32, 64, 64, 64),
        latent_channels: int = 32,
        score_rule: str = "map-max",
        map_sigma: float = 2.0,
        epochs: int = 30,
        learning_rate: float = 1e-3,
        patience: int = 5,
        flip_augment: bool = False,
        batch_size: int = 32,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(image_size, channels, batch_size, device, seed, progress)
        self.widths = widths
        self.latent_channels = latent_channels
        if score_rule not in SCORE_RULES:
            raise ConfigError(f"score_rule={score_rule!r}: choose from {', '.join(SCORE_RULES)}")
        self.score_rule = score_rule
        self.map_sigma = map_sigma
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.patience = patience
        self.flip_augment = flip_augment

    def get_params(self) -> dict[str, Any]:
        params = super().get_params()
        params["widths"] = list(self.widths)
        return params

    # ------------------------------------------------------------------ training
    def _build(self, channels: int) -> AutoencoderNet:
        return AutoencoderNet(channels, self.widths, self.latent_channels, self.neighbor)

    @property
    def learns_from_defects(self) -> bool:
        return self.score_rule == "learned"

    @property
    def score_is_map_max(self) -> bool:
        return self.score_rule == "map-max"

    def fit(
        self,
        images: ImageInput,
        *,
        validation: ImageInput | None = None,
        defects: ImageInput | None = None,
        checkpoint: str | Path | None = None,
        resume: bool = False,
    ) -> _AutoencoderDetector:
        if self.score_rule == "learned" and (defects is None or len(defects) == 0):
            raise ConfigError(
                "score=learned needs labelled defect images (e.g. --defects DIR, or a dataset "
                "with training defects such as casting train/def_front)"
            )
        seed_everything(self.seed)
        channels = self._resolve_channels(images)
        dev = self.torch_device
        train = torch.from_numpy(to_array(images, self.input_size, channels))
        if len(train) == 0:
            raise ConfigError("no training images")
        val = (
            torch.from_numpy(to_array(validation, self.input_size, channels))
            if validation is not None and len(validation)
            else None
        )
        # channels-last is about 20 % faster for these convolutions on CPU (oneDNN)
        net = self._build(channels).to(dev, memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=self.learning_rate)
        fingerprint = config_fingerprint(
            {"params": self.architecture_params(), "channels": channels, "n": len(train),
             "first": int(train[0].sum()), "last": int(train[-1].sum())}
        )
        gen = torch.Generator().manual_seed(self.seed)
        loop = TrainLoop(
            net, opt, epochs=self.epochs, patience=self.patience if val is not None else 0,
            checkpoint=TrainCheckpoint(checkpoint, fingerprint) if checkpoint else None,
            generator=gen, torch_rng=True,
        )
        if resume and loop.resume():
            self.resumed_from_epoch_ = loop.resumed_from

        def step(epoch: int) -> Epoch:
            train_loss = self._train_epoch(net, opt, train, gen, epoch)
            val_loss = self._mean_loss(net, val) if val is not None else train_loss
            return Epoch({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}, val_loss)

        state = loop.run(step)  # ends with the best epoch's weights in net
        self.net_ = net.eval()
        self.channels_ = channels
        self.history_: list[dict[str, float]] = state.history
        self.best_epoch_ = state.best_epoch
        self.epochs_run_ = len(state.history)
        self.combination_ = None
        if self.score_rule == "learned":
            self._fit_combination(images, defects)
        return self

    def architecture_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.get_params().items() if k not in self.runtime_params}

    def _train_epoch(
        self, net: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor,
        gen: torch.Generator, epoch: int,
    ) -> float:
        net.train()
        dev = self.torch_device
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        with progress_bar(len(data), f"epoch {epoch + 1}/{self.epochs}", self.progress) as bar:
            for i in range(0, len(data), self.batch_size):
                x = data[order[i : i + self.batch_size]].to(dev).float() / 255.0
                x = x.contiguous(memory_format=torch.channels_last)
                if self.flip_augment:
                    flip = torch.rand(len(x), generator=gen) < 0.5
                    x = torch.where(flip.to(dev)[:, None, None, None], x.flip(3), x)
                loss = F.mse_loss(net(x), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(x)
                bar.update(len(x))
                bar.set_postfix(loss=f"{loss.item():.5f}")
        return total / len(data)

    @torch.no_grad()
    def _mean_loss(self, net: nn.Module, data: torch.Tensor) -> float:
        net.eval()
        total = 0.0
        for i in range(0, len(data), self.batch_size):
            x = data[i : i + self.batch_size].to(self.torch_device).float() / 255.0
            total += F.mse_loss(net(x), x, reduction="sum").item() / x[0].numel()
        return total / len(data)

    def _fit_combination(self, good: ImageInput, defects: ImageInput) -> None:
        """Logistic regression over standardised residual statistics (good vs defect)."""
        from sklearn.linear_model import LogisticRegression

        g = self.residual_statistics(good)
        d = self.residual_statistics(defects)
        x = np.concatenate([g, d])
        y = np.r_[np.zeros(len(g)), np.ones(len(d))]
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
        clf = LogisticRegression(class_weight="balanced", max_iter=1000, C=1.0)
        clf.fit((x - mean) / scale, y)
        self.combination_ = (
            torch.tensor(mean), torch.tensor(scale), torch.tensor(clf.coef_[0]),
            float(clf.intercept_[0]),
        )

    # ------------------------------------------------------------------ inference
    def inference_module(self) -> ResidualScorer:
        self._check_fitted()
        return ResidualScorer(self.net_, self.score_rule, self.map_sigma, self.combination_).to(
            self.torch_device
        )

    def residual_statistics(self, images: ImageInput) -> np.ndarray:
        """``N x 11`` residual statistics (order of :data:`flawscope.residual.STATISTICS`)."""
        from flawscope.data.source import iter_batches

        self._check_fitted()
        module = ResidualScorer(self.net_, "mse", self.map_sigma, None).to(self.torch_device)
        out = []
        with torch.inference_mode():
            for batch, _ in iter_batches(images, self.input_size, self.channels_, self.batch_size):
                r = module.residual(torch.from_numpy(batch).to(self.torch_device))
                out.append(residual_statistics(r).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(STATISTICS)))

    def score_with_statistics(
        self, images: ImageInput, *, with_maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """:meth:`score` plus the ``N x 11`` residual statistics, from one forward pass per
        batch (statistics in the order of :data:`flawscope.residual.STATISTICS`, raw: ``min``
        is not negated)."""
        from flawscope.data.source import iter_batches

        self._check_fitted()
        module = self.inference_module()
        scores, maps, stats = [], [], []
        with torch.inference_mode():
            for batch, _ in iter_batches(images, self.input_size, self.channels_, self.batch_size):
                r = module.residual(torch.from_numpy(batch).to(self.torch_device))
                s, m = module.score_residual(r)
                scores.append(s.float().cpu().numpy())
                stats.append(residual_statistics(r).cpu().numpy())
                if with_maps:
                    maps.append(m.float().cpu().numpy())
        h, w = self.input_size
        s_all = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        st_all = np.concatenate(stats) if stats else np.zeros((0, len(STATISTICS)))
        if not with_maps:
            return s_all, None, st_all
        return s_all, np.concatenate(maps) if maps else np.zeros((0, h, w), np.float32), st_all

    def reconstruct(self, images: ImageInput) -> tuple[np.ndarray, np.ndarray]:
        """The model's inputs and reconstructions: two float32 ``N x H x W x C`` arrays in
        [0, 1] at :attr:`input_size` (residual = input - reconstruction)."""
        from flawscope.data.source import iter_batches

        self._check_fitted()
        inputs, recons = [], []
        with torch.inference_mode():
            for batch, _ in iter_batches(images, self.input_size, self.channels_, self.batch_size):
                x = torch.from_numpy(batch).to(self.torch_device).float() / 255.0
                inputs.append(x.permute(0, 2, 3, 1).cpu().numpy())
                recons.append(self.net_(x).float().permute(0, 2, 3, 1).cpu().numpy())
        h, w = self.input_size
        empty = np.zeros((0, h, w, self.channels_), np.float32)
        return (np.concatenate(inputs) if inputs else empty,
                np.concatenate(recons) if recons else empty)

    # ------------------------------------------------------------------ persistence
    def learned_config(self) -> dict[str, Any]:
        cfg = {
            "channels_": self.channels_,
            "best_epoch_": self.best_epoch_,
            "epochs_run_": self.epochs_run_,
            "history_": self.history_,
        }
        if self.combination_ is not None:
            cfg["intercept"] = self.combination_[3]
        return cfg

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        t = {f"net.{k}": v for k, v in self.net_.state_dict().items()}
        if self.combination_ is not None:
            mean, scale, coef, _ = self.combination_
            t.update({"combination.mean": mean, "combination.scale": scale,
                      "combination.coef": coef})
        return t

    def load_state(self, learned: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.channels_ = int(learned["channels_"])
        self.best_epoch_ = learned.get("best_epoch_", -1)
        self.epochs_run_ = learned.get("epochs_run_", 0)
        self.history_ = learned.get("history_", [])
        net = self._build(self.channels_)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net_ = net.to(self.torch_device).eval()
        self.combination_ = None
        if "combination.coef" in tensors:
            self.combination_ = (
                tensors["combination.mean"], tensors["combination.scale"],
                tensors["combination.coef"], float(learned["intercept"]),
            )


@register("ncae")
class NCAE(_AutoencoderDetector):
    """Neighbor Convolution AutoEncoder (every stride-1 convolution skips the centre pixel)."""

    neighbor = True


@register("conv-ae")
class ConvAE(_AutoencoderDetector):
    """Plain convolutional autoencoder with the same shape as :class:`NCAE` (baseline)."""

    neighbor = False
