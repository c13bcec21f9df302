"""Anomaly scores from reconstruction residuals (original - reconstruction), batched.

The statistics of the NCAE design document, each computed per image over all pixels and
channels: mean, std, variance, kurtosis, skewness, range, min, max, cumulative sum,
information entropy and MSE. Conventions follow numpy/scipy defaults (population std and
variance; Fisher kurtosis and skewness without bias correction, as ``scipy.stats``; NaN -> 0
as in the seed).

Entropy: the seed passed the signed residual to ``scipy.stats.entropy``, which is undefined
(NaN or -inf) as soon as a residual is negative, i.e. for almost every image. flawscope takes
the entropy of the *absolute* residual as a distribution (``scipy.stats.entropy(|r|)``), which
is what the seed's idea needs: low for evenly spread small errors, different when the error
concentrates in a defect.
"""

from __future__ import annotations

import torch

STATISTICS = (
    "mean",
    "std",
    "var",
    "kurtosis",
    "skewness",
    "range",
    "min",
    "max",
    "cumsum",
    "entropy",
    "mse",
)

#: statistics for which *lower* means more abnormal: negated when used as a score rule, so
#: that every score follows "higher = more abnormal"
LOWER_IS_ABNORMAL = frozenset({"min"})


def residual_statistics(residual: torch.Tensor) -> torch.Tensor:
    """``N x ...`` residuals -> ``N x 11`` statistics in the order of :data:`STATISTICS`."""
    r = residual.flatten(1).to(torch.float64 if residual.dtype == torch.float64 else torch.float32)
    mean = r.mean(1)
    d = r - mean[:, None]
    m2 = (d * d).mean(1)
    m3 = (d * d * d).mean(1)
    m4 = (d * d).square().mean(1)
    std = m2.sqrt()
    tiny = torch.finfo(r.dtype).tiny
    degenerate = m2 <= tiny * 1e6  # constant residual: scipy gives NaN, the seed maps it to 0
    safe_m2 = torch.where(degenerate, torch.ones_like(m2), m2)
    skew = torch.where(degenerate, torch.zeros_like(m3), m3 / safe_m2.pow(1.5))
    kurt = torch.where(degenerate, torch.zeros_like(m4), m4 / safe_m2.square() - 3.0)
    rmin, rmax = r.aminmax(dim=1)
    total = r.sum(1)
    a = r.abs()
    a_sum = a.sum(1, keepdim=True)
    p = a / torch.where(a_sum > 0, a_sum, torch.ones_like(a_sum))
    entropy = -torch.special.xlogy(p, p).sum(1)
    mse = (r * r).mean(1)
    return torch.stack(
        [mean, std, m2, kurt, skew, rmax - rmin, rmin, rmax, total, entropy, mse], dim=1
    )
