"""PatchCore: nearest-neighbour distance to a memory bank of pretrained patch features.

As in Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022):
locally aware patch features (3x3 neighbourhood average) from two middle stages of an
ImageNet backbone, upsampled to the finer grid and concatenated (optionally reduced by channel
averaging); a greedy k-center coreset of ``coreset_ratio`` of all training patches, selected on
a seeded random projection to ``projection_dims`` dimensions (when that at least halves the
feature dimension, else on exact distances); the patch score is the Euclidean
distance to the nearest bank entry; the anomaly map is the patch-score grid less each
position's mean over the good images (``positional="mean"``, leave-one-image-out for the
calibration images), upsampled bilinearly and Gaussian-smoothed (``map_sigma``); the image
score is the map's maximum (default), the mean of its top ``topk_fraction``, or the paper's
re-weighted maximum (``image_score="reweighted-max"``, ``num_neighbors`` supports). The
streamed coreset is reduced to ``bank_size`` rows (8192) by a final greedy coreset.

Memory bound. Training streams: images are decoded ``batch_size`` at a time, their patch
features go into a chunk buffer of ``chunk_size`` patches, and each full chunk is reduced by the
greedy coreset on its own before the next is filled. Peak memory of the fit, beyond the
backbone's activations for one batch, is therefore::

    4 bytes x [chunk_size x D            chunk buffer (float32)
               + chunk_size x (p + 3)    coreset working set: features (p = projection_dims,
                                         or D when not projected), norms, distances
               + bank_size x D]          the bank: coreset_ratio x all patches

with ``D`` the feature dimension (152 for the default ``tf_efficientnet_lite0`` layers: about
37 MB for the default chunk of 32768 patches). Only the bank grows with the number of training
images, at ``coreset_ratio`` of the patches; ``max_bank_size`` caps it too, by re-running the
coreset on the bank when it overflows. One-shot PatchCore (the paper's code, anomalib) holds
all patches and their projection at once. The coreset of a chunk costs
``O(ratio x chunk_size^2 x p)``, so the fit is linear in the number of images instead of
quadratic. With fewer patches than one chunk this is exactly the one-shot coreset.
``benchmarks/bench_patchcore_memory.py`` measures peak RSS for N and 4N images.

Inference is a pure-torch module (:class:`PatchCoreScorer`): exact nearest neighbours by
chunked ``||a||^2 - 2ab + ||b||^2`` matrix products (features centred on the bank mean, the
``||b||^2`` term folded into the product), no faiss, so the Python scores, the service and an
ONNX export compute the same thing; its cost, ``h x w x bank_size x D`` multiply-adds per
image, is what bounds inference speed for large banks. ``precision="bf16"`` runs the backbone
and the distance products in bfloat16: about 2x faster on CPUs with AMX; scores move by ~2 %
(median) and AUROC by about +-0.01 on the benchmark sets, so float32 stays the default. The
backbone weights are stored in the model file, which is therefore self-contained.

Calibration: ``fit`` learns from every image it is given and then scores up to
``calibration_images`` of them leave-one-image-out (the bank rows that came from the image's own
patches masked out, :meth:`PatchCore._holdout_grids`), so the threshold needs no held-out
images. The input size keeps the photos' aspect ratio (``keep_aspect``).

Benchmarks at the defaults (``benchmarks/bench_quality.py``; bottle / pill / metal_nut /
casting / magnetic_tile): image AUROC 1.000 / 0.967 / 1.000 / 0.994 / 0.968, recall at 1 %
false rejects 1.00 / 0.72 / 0.97 / 0.82 / 0.64, region F1 0.842 / 0.302 / 0.810 / - / 0.188.
How they were chosen: docs/detection-quality.md; speed, memory, anomalib: docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flawscope.backbones import DEFAULT_BACKBONE, FeatureExtractor
from flawscope.data.source import ImageInput, iter_batches
from flawscope.errors import ConfigError
from flawscope.models.features import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_IMAGE_SIZE,
    FeatureDetector,
    PatchEmbedding,
)
from flawscope.models.registry import register
from flawscope.models.scoring import (
    DEFAULT_IMAGE_SCORE,
    DEFAULT_POSITIONAL,
    DEFAULT_TOPK_FRACTION,
    MapHead,
)
from flawscope.training import progress_bar

#: patches per streaming chunk when ``chunk_size`` is not given
DEFAULT_CHUNK_SIZE = 32768
#: default cap on the memory bank (None: no cap, the paper's 10 % coreset). 65536 rows leaves
#: MVTec-sized training sets at the full 10 % (bottle 33 k, pill 43 k rows), gave the best
#: casting figure of any setting (0.989 with all 2875 images, where a 16384-row cap cost 0.02)
#: and bounds inference time on large training sets (docs/detection-quality.md)
DEFAULT_MAX_BANK_SIZE: int | None = 65536
#: the most memory the calibration images' patch embeddings may take to be kept from the
#: feature pass (pill at 320 px: 267 x 153 x 40 x 40 floats = 260 MB); beyond it calibration
#: decodes and embeds them again
HELD_EMBEDDINGS_BYTES = 768 * 2**20
#: default final memory bank: a greedy coreset of the streamed bank (docs/detection-quality.md)
DEFAULT_BANK_SIZE: int | None = 8192


# ---------------------------------------------------------------------- coreset
def greedy_coreset(
    features: torch.Tensor,
    size: int,
    *,
    projection_dims: int | None = 128,
    seed: int = 0,
    start: int | None = None,
    progress: bool = False,
    desc: str = "coreset",
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``size`` rows of ``features`` (``M x D``).

    Starting from a random row, repeatedly add the row farthest from all rows chosen so far
    (iterative farthest-point selection), measuring distances on a seeded Gaussian random
    projection to ``projection_dims`` dimensions when that at least halves ``D`` (``None``:
    never project; exact distances).
    ``start``: the first row (default: a seeded random one).
    """
    m, d = features.shape
    size = int(min(max(size, 1), m))
    gen = torch.Generator().manual_seed(int(seed))
    z = features.float()
    if projection_dims is not None and 2 * projection_dims <= d:
        proj = torch.randn(d, projection_dims, generator=gen) / math.sqrt(projection_dims)
        z = z @ proj.to(z.device)
    sq = z.pow(2).sum(1)
    # the rows as columns: the vector-matrix product below reads them contiguously, about 5x
    # faster on a CPU than the matrix-vector product over row-major features (memory bound)
    zt = z.t().contiguous()
    min_d = torch.full((m,), float("inf"), device=z.device)
    dist = torch.empty_like(min_d)
    chosen = torch.empty(size, dtype=torch.long)
    first = int(torch.randint(m, (1,), generator=gen))
    idx = first if start is None else int(start)
    with progress_bar(size, desc, progress and size > 2000, unit="row") as bar:
        for i in range(size):
            chosen[i] = idx
            # squared distance to the new centre: |z|^2 - 2 z.c + |c|^2 (one vector-matrix pass)
            torch.mm(z[idx : idx + 1], zt, out=dist.view(1, -1))
            dist.mul_(-2.0).add_(sq).add_(sq[idx])
            torch.minimum(min_d, dist, out=min_d)
            min_d[idx] = -1.0  # never pick a chosen row again (float rounding)
            idx = int(torch.argmax(min_d))
            if i % 1000 == 999:
                bar.update(1000)
        bar.update(size - bar.n)  # the last partial thousand
    return chosen


# ---------------------------------------------------------------------- inference module
def augment_bank(bank: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``M x (D+1)`` rows ``[-2 (b - c), |b - c|^2]``: one matrix product with ``[q - c, 1]``
    gives ``|b|^2 - 2 q.b`` (squared distance minus ``|q|^2``), with no extra pass."""
    c = bank.float() - center
    return torch.cat([-2.0 * c, c.pow(2).sum(1, keepdim=True)], 1)


def range_mask(exclude: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
    """``Q x (stop - start)`` mask of the bank rows ``start..stop`` that fall in each query's
    excluded range (``exclude``: ``Q x 2`` long ``[first, end)``); None when none does."""
    first, end = exclude[:, :1], exclude[:, 1:]
    if not bool(((first < stop) & (end > start)).any()):
        return None
    cols = torch.arange(start, stop, device=exclude.device)[None]
    return (cols >= first) & (cols < end)


def nearest_distances(
    queries: torch.Tensor,
    bank_aug: torch.Tensor,
    chunk: int = 2048,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euclidean distance from every (centred) query row to its nearest bank row.

    ``bank_aug`` comes from :func:`augment_bank` (float32 for exact distances, bfloat16 for
    fast approximate ones); it is scanned ``chunk`` rows at a time, so the distance block stays
    ``queries x chunk`` and only its row minimum is kept (no argmin in the hot loop).
    ``exclude``: optional ``queries x 2`` ranges ``[first, end)`` of bank rows each query may
    not match (leave-one-image-out calibration: the bank is sorted by training image).
    """
    q_aug = torch.cat([queries, torch.ones_like(queries[:, :1])], 1).to(bank_aug.dtype)
    best = None
    for start in range(0, bank_aug.shape[0], chunk):
        block = q_aug @ bank_aug[start : start + chunk].t()
        if exclude is not None:
            mask = range_mask(exclude, start, start + block.shape[1])
            if mask is not None:
                block = block.masked_fill(mask, float("inf"))
        part = block.amin(1)
        best = part if best is None else torch.minimum(best, part)
    return (best.float() + queries.pow(2).sum(1)).clamp_min(0).sqrt()


def pairwise_sq(
    queries: torch.Tensor, bank_aug: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact squared distances ``Q x M`` of a few centred queries to the whole bank
    (``inf`` in each query's ``exclude`` range)."""
    q_aug = torch.cat([queries, torch.ones_like(queries[:, :1])], 1)
    d = (q_aug @ bank_aug.t() + queries.pow(2).sum(1, keepdim=True)).clamp_min(0)
    if exclude is None:
        return d
    mask = range_mask(exclude, 0, bank_aug.shape[0])
    return d if mask is None else d.masked_fill(mask, float("inf"))


class PatchCoreScorer(nn.Module):
    """uint8 pixels -> (image score, anomaly map): PatchCore inference in plain torch.

    Patch features and bank are centred on the bank mean (distances are unchanged, norms
    smaller, so ``|q|^2 + |b|^2 - 2 q.b`` loses less to rounding). With ``precision="bf16"``
    the big distance products run in bfloat16. The grid of nearest-neighbour distances goes
    through the map ``head`` (positional normalisation, smoothing, image score); with
    ``reweighted=True`` the image score is the paper's re-weighted maximum instead.
    """

    def __init__(
        self,
        embedding: PatchEmbedding,
        memory_bank: torch.Tensor,
        head: MapHead,
        reweighted: bool = False,
        num_neighbors: int = 9,
        reweight: bool = True,
        query_chunk: int = 32,
        bank_chunk: int = 2048,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        center = memory_bank.float().mean(0)
        self.register_buffer("center", center)
        self.register_buffer("bank_aug", augment_bank(memory_bank, center))
        self.fast = embedding.precision == "bf16"
        if self.fast:
            self.register_buffer("bank_aug_bf16", self.bank_aug.bfloat16())
        self.head = head
        self.reweighted = bool(reweighted)
        self.num_neighbors = int(num_neighbors)
        self.reweight = bool(reweight) and self.num_neighbors > 1
        self.query_chunk = int(query_chunk)
        self.bank_chunk = int(bank_chunk)

    def patch_scores(
        self, images: torch.Tensor | None, exclude: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(nearest-neighbour distance per patch ``N x h x w``, centred queries ``N x hw x D``).

        Queries are processed ``query_chunk`` grid positions (of every image) at a time, the
        bank ``bank_chunk`` rows at a time: both loops have a fixed length for a fixed input
        size, so the batch axis stays dynamic in an export. ``exclude``: ``N x 2`` ranges
        ``[first, end)`` of bank rows each image may not match (None in inference).
        ``embedding``: the images' patch embeddings, computed already (``images`` unused).
        """
        emb = self.embedding(images) if embedding is None else embedding
        n, d, h, w = emb.shape
        q = emb.flatten(2).transpose(1, 2) - self.center  # N x P x D
        bank = self.bank_aug_bf16 if self.fast else self.bank_aug
        dists = []
        for start in range(0, h * w, self.query_chunk):
            part = q[:, start : start + self.query_chunk]
            ranges = None
            if exclude is not None:  # rows of `part` are image-major
                ranges = exclude.repeat_interleave(part.shape[1], 0)
            part = part.reshape(-1, d)
            dists.append(nearest_distances(part, bank, self.bank_chunk, ranges).view(n, -1))
        return torch.cat(dists, 1).view(n, h, w), q

    def reweighted_scores(
        self, dist: torch.Tensor, queries: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The paper's image score: the largest patch distance, re-weighted by how far the
        patch is from the neighbourhood of its nearest bank entry (plain maximum without
        ``reweight``)."""
        flat = dist.flatten(1)
        score, where = flat.max(1)
        if not self.reweight:
            return score
        # the paper's re-weighting: s = (1 - softmax(|m_test - N_b(m*)|)_0) * s*
        rows = torch.arange(flat.shape[0], device=flat.device)
        m_test = queries[rows, where]  # N x D: the most abnormal patch of each image
        d_test = pairwise_sq(m_test, self.bank_aug, exclude)  # exact, float32
        s_star, nn_idx = d_test.min(1)
        d = m_test.shape[1]
        m_star = self.bank_aug[nn_idx, :d] * -0.5  # its nearest bank entry (centred)
        k = min(self.num_neighbors, self.bank_aug.shape[0])
        support = pairwise_sq(m_star, self.bank_aug, exclude).topk(k, dim=1,
                                                                   largest=False).indices
        d_support = d_test.gather(1, support).sqrt()  # N x k, m* itself first
        weights = 1.0 - torch.softmax(d_support, dim=1)[:, 0]
        return weights * s_star.sqrt()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist, queries = self.patch_scores(images)
        norm = self.head.normalise(dist)
        amap = self.head.anomaly_map(norm)
        if self.reweighted:
            return self.reweighted_scores(dist, queries), amap
        return self.head.score(norm, amap), amap


# ---------------------------------------------------------------------- detector
@register("patchcore")
class PatchCore(FeatureDetector):
    """PatchCore on an offline pretrained timm backbone (see the module docstring).

    ``coreset_ratio``: share of each streamed chunk of training patches kept by the coreset;
    ``projection_dims``: random-projection size for the coreset distances (used when it at
    least halves the feature dimension); ``chunk_size``: patches per streaming coreset chunk
    (None: 32768); ``max_bank_size``: cap on the streamed bank (the coreset ratio is lowered up
    front so that all patches fit; None: no cap); ``bank_size``: the final bank, a greedy
    coreset of the streamed bank (None: keep the streamed bank); ``image_score``,
    ``topk_fraction``, ``positional``: the image score and map rules
    (:mod:`flawscope.models.scoring`; ``reweighted-max`` is the paper's, with
    ``num_neighbors``/``reweight``); ``reduce_dims``: average channels down to this many;
    ``local_pool``: patch neighbourhood (3 = 3x3); ``map_sigma``: smoothing of the anomaly
    map; ``tile_input_size``: load images at this size and score them as overlapping tiles of
    ``image_size`` (``tile_stride`` apart, default half a tile); ``precision``: ``"bf16"`` runs
    the backbone and the distance products in bfloat16 (faster on CPUs with bf16 units,
    scores differ slightly); ``query_chunk``/``bank_chunk``: block sizes of the exact
    nearest-neighbour search (grid positions of every image in the batch x bank rows).
    """

    runtime_params = ("device", "batch_size", "progress", "query_chunk", "bank_chunk")
    image_scores = ("map-max", "topk-mean", "reweighted-max")
    #: what model files from before these options were stored meant
    legacy_params = {"image_score": "reweighted-max", "positional": "none", "bank_size": None}

    def __init__(
        self,
        image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
        channels: int | None = None,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike[str] | None = None,
        coreset_ratio: float = 0.1,
        projection_dims: int | None = 128,
        chunk_size: int | None = None,
        max_bank_size: int | None = DEFAULT_MAX_BANK_SIZE,
        bank_size: int | None = DEFAULT_BANK_SIZE,
        image_score: str = DEFAULT_IMAGE_SCORE,
        topk_fraction: float = DEFAULT_TOPK_FRACTION,
        positional: str = DEFAULT_POSITIONAL,
        num_neighbors: int = 9,
        reweight: bool = True,
        reduce_dims: int | None = None,
        local_pool: int = 3,
        map_sigma: float = 8.0,
        tile_input_size: int | Sequence[int] | None = None,
        tile_stride: int | Sequence[int] | None = None,
        keep_aspect: bool = True,
        calibration_images: int | None = DEFAULT_CALIBRATION_IMAGES,
        precision: str = "float32",
        query_chunk: int = 32,
        bank_chunk: int = 2048,
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(image_size, channels, backbone, layers, weights, map_sigma,
                         image_score, topk_fraction, positional, tile_input_size, tile_stride,
                         keep_aspect, calibration_images, precision, batch_size, device, seed,
                         progress)
        self.coreset_ratio = coreset_ratio
        self.projection_dims = projection_dims
        self.chunk_size = chunk_size
        self.max_bank_size = max_bank_size
        self.bank_size = bank_size
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reduce_dims = reduce_dims
        self.local_pool = local_pool
        self.query_chunk = query_chunk
        self.bank_chunk = bank_chunk

    def validate(self) -> None:
        super().validate()
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"coreset_ratio={self.coreset_ratio}: must be in (0, 1]")
        if self.num_neighbors < 1:
            raise ConfigError(f"num_neighbors={self.num_neighbors}: must be at least 1")
        for name in ("chunk_size", "max_bank_size", "bank_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: must be positive")

    def _embedding(self, extractor) -> PatchEmbedding:
        return PatchEmbedding(extractor, local_pool=self.local_pool, upsample="bilinear",
                              reduce_dims=self.reduce_dims, precision=self.precision,
                              tiler=self._tiler(extractor))

    # ------------------------------------------------------------------ training
    def _fit_features(
        self, extractor: FeatureExtractor, images: ImageInput, channels: int
    ) -> str:
        """The memory bank: streamed patch features, reduced chunk by chunk by the coreset,
        then to ``bank_size`` rows; sorted by training image (leave-one-out ranges)."""
        bank, ids, n_patches, grid = self._build_bank(self._embedding(extractor), images,
                                                      channels)
        order = torch.argsort(ids, stable=True)
        bank, ids = bank[order.to(bank.device)].contiguous(), ids[order]
        self.memory_bank_ = bank
        # fit-time only: the rows of training image i are bank[first[i]:end[i]]
        image_index = torch.arange(len(images))
        self._bank_ranges = torch.stack([torch.searchsorted(ids, image_index),
                                         torch.searchsorted(ids, image_index, right=True)], 1)
        self.n_train_patches_ = n_patches
        self.feature_dim_ = int(bank.shape[1])
        self.grid_size_ = list(grid)
        return f"memory bank {bank.shape[0]} x {bank.shape[1]} from {n_patches} patches"

    def _build_bank(
        self, embedding: PatchEmbedding, images: ImageInput, channels: int
    ) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
        """Stream features into chunks, reduce each chunk by the coreset, concatenate, reduce
        the result to ``bank_size`` rows.

        Returns the bank, the training-image index of each bank row, the number of patches
        seen and the feature grid. With ``max_bank_size``, the coreset ratio is lowered up front
        so that all patches fit (and the bank is re-reduced only if it still overflows).
        """
        dev = self.torch_device
        chunk = int(self.chunk_size or DEFAULT_CHUNK_SIZE)
        buffer: torch.Tensor | None = None
        id_buffer: torch.Tensor | None = None
        fill = n_patches = n_chunks = bank_rows = 0
        parts: list[torch.Tensor] = []
        part_ids: list[torch.Tensor] = []
        grid = (0, 0)
        ratio = float(self.coreset_ratio)
        capped = False
        coreset_s = 0.0

        def coreset(rows: torch.Tensor, ids: torch.Tensor, k: int, seed: int, what: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal coreset_s
            t0 = time.perf_counter()
            # the chunks' and the cap's coresets run inside the features bar (their own bars
            # would interleave with it); only the final one, after it, shows its own
            idx = greedy_coreset(rows, k, projection_dims=self.projection_dims, seed=seed,
                                 progress=self.progress and what == "coreset (bank)",
                                 desc=what)
            coreset_s += time.perf_counter() - t0
            return rows[idx.to(rows.device)], ids[idx]

        def reduce(rows: torch.Tensor, ids: torch.Tensor) -> None:
            nonlocal n_chunks, bank_rows, parts, part_ids
            want = ratio * rows.shape[0]
            # rounded down once the cap set the ratio: the chunks' shares then sum to at most
            # the cap, and the bank is never re-reduced
            k = max(1, math.floor(want) if capped else round(want))
            if k < rows.shape[0]:
                rows, ids = coreset(rows, ids, k, self.seed + n_chunks, "coreset (chunk)")
            parts.append(rows.clone())
            part_ids.append(ids.clone())
            bank_rows += rows.shape[0]
            n_chunks += 1
            if self.max_bank_size is not None and bank_rows > self.max_bank_size:
                merged, merged_ids = coreset(torch.cat(parts), torch.cat(part_ids),
                                             self.max_bank_size, self.seed + n_chunks,
                                             "coreset (cap)")
                parts, part_ids = [merged], [merged_ids]
                bank_rows = parts[0].shape[0]

        held = {int(i) for i in getattr(self, "_held_positions", ())}

        def keep_held(emb: torch.Tensor, first: int) -> None:
            """Keep the calibration images' embeddings for the leave-one-out pass, when they
            fit in :data:`HELD_EMBEDDINGS_BYTES` (else it runs the backbone again)."""
            if not held:
                return
            if self._held_embeddings is None:
                if len(held) * emb[0].numel() * emb.element_size() > HELD_EMBEDDINGS_BYTES:
                    held.clear()
                    return
                self._held_embeddings = {}
            for j in range(len(emb)):
                if first + j in held:
                    self._held_embeddings[first + j] = emb[j].clone()

        first_image = 0
        with torch.inference_mode(), progress_bar(len(images), "patchcore features",
                                                  self.progress) as bar:
            for batch, _ in iter_batches(images, self.input_size, channels, self.batch_size):
                emb = embedding(torch.from_numpy(batch).to(dev))
                grid = (int(emb.shape[2]), int(emb.shape[3]))
                keep_held(emb, first_image)
                rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
                per_image = rows.shape[0] // len(batch)
                ids = torch.arange(first_image, first_image + len(batch)).repeat_interleave(
                    per_image)
                first_image += len(batch)
                n_patches += rows.shape[0]
                if buffer is None:  # one chunk, or all patches if they are fewer
                    total = per_image * len(images)
                    cap = min(chunk, total)
                    buffer = torch.empty((cap, rows.shape[1]), device=dev)
                    id_buffer = torch.empty(cap, dtype=torch.long)
                    if self.max_bank_size is not None and self.max_bank_size / total < ratio:
                        ratio, capped = self.max_bank_size / total, True
                pos = 0
                while pos < rows.shape[0]:
                    take = min(rows.shape[0] - pos, buffer.shape[0] - fill)
                    buffer[fill : fill + take] = rows[pos : pos + take]
                    id_buffer[fill : fill + take] = ids[pos : pos + take]
                    fill += take
                    pos += take
                    if fill == buffer.shape[0]:
                        reduce(buffer[:fill], id_buffer[:fill])
                        fill = 0
                del emb, rows
                bar.update(len(batch))
            if fill:
                reduce(buffer[:fill], id_buffer[:fill])
        bank, ids = torch.cat(parts).contiguous(), torch.cat(part_ids)
        if self.bank_size is not None and bank.shape[0] > self.bank_size:
            bank, ids = coreset(bank, ids, self.bank_size, self.seed + n_chunks + 1,
                                "coreset (bank)")
        self.fit_timings_["coreset_s"] = coreset_s
        return bank.contiguous(), ids, n_patches, grid

    def _holdout_grids(
        self, pixels: torch.Tensor | None, positions: np.ndarray,
        embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Leave-one-image-out grids: each training image is scored against the memory bank
        without the rows that came from its own patches.

        This is slightly conservative (the coreset dropped rows of *other* images that the
        left-out image's rows covered, so its patches find their neighbours a little farther
        away than a new good part would): the calibrated threshold errs towards fewer false
        rejects, never more.
        """
        scorer = self._scorer_for_calibration()
        exclude = self._bank_ranges[torch.as_tensor(positions)].to(self.torch_device)
        dist, queries = scorer.patch_scores(pixels, exclude, embedding)
        scores = scorer.reweighted_scores(dist, queries, exclude) if scorer.reweighted else None
        return dist, scores

    # ------------------------------------------------------------------ inference
    def inference_module(self) -> PatchCoreScorer:
        self._check_fitted()
        dev = self.torch_device
        embedding = self._embedding(self._extractor_on_device())
        return PatchCoreScorer(
            embedding, self.memory_bank_.to(dev), self.head(),
            reweighted=self.image_score == "reweighted-max", num_neighbors=self.num_neighbors,
            reweight=self.reweight, query_chunk=self.query_chunk, bank_chunk=self.bank_chunk,
        ).to(dev).eval()

    def describe(self) -> dict[str, Any]:
        """Model facts for the model file's info and reports (includes the weight source)."""
        self._check_fitted()
        return {
            **self._describe_backbone(),
            "feature_dim": self.feature_dim_,
            "memory_bank": int(self.memory_bank_.shape[0]),
            "train_patches": int(self.n_train_patches_),
            "coreset_ratio": self.coreset_ratio,
            "image_score": self.image_score,
            "positional": self.positional,
        }

    # ------------------------------------------------------------------ persistence
    def learned_config(self) -> dict[str, Any]:
        return {
            **super().learned_config(),
            "n_train_patches_": self.n_train_patches_,
            "feature_dim_": self.feature_dim_,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {"memory_bank": self.memory_bank_.detach().cpu(), **self._backbone_tensors()}

    def load_state(self, learned: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.memory_bank_ = tensors["memory_bank"].float().to(self.torch_device)
        self.n_train_patches_ = int(learned.get("n_train_patches_", 0))
        self.feature_dim_ = int(learned.get("feature_dim_", self.memory_bank_.shape[1]))
        super().load_state(learned, tensors)
