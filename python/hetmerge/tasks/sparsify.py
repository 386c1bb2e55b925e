"""Sparsification and sign election shared by ties, dare and dare_ties.

    magnitude_mask: keep the k = max(1, int(density·n)) largest |τ| entries of a tensor
    dare_mask:      keep each entry with probability density, from a seeded generator
    disjoint_merge: TIES sign election and the mean (or sum) of the entries that agree with it
"""
from __future__ import annotations

import math

import torch

from .plumbing import tensor_seed

__all__ = ["keep_count", "magnitude_mask", "dare_mask", "disjoint_merge"]


def keep_count(density: float, n: int) -> int:
    """Entries kept per tensor: max(1, int(density·n)), the float product truncated as in mergekit, so
    that both keep the same count (e.g. density 0.29 of 100 entries keeps 28)."""
    return n if density >= 1.0 else min(n, max(1, int(density * n)))


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-D tensor x (exact). torch.kthvalue is a single-threaded
    quickselect; for large x, a seeded random sample brackets the answer in a narrow band, and
    only the band (about 1 % of x) goes through kthvalue. The bracket only saves time: when the
    sample misses, the whole of x is used, so the value is always exact."""
    n = x.numel()
    if n <= _SAMPLE_ABOVE:
        return torch.kthvalue(x, n - k + 1).values
    g = torch.Generator(device=x.device).manual_seed(n)
    sample = x[torch.randint(n, (_SAMPLE,), generator=g, device=x.device)].sort().values
    q = (n - k) / n                                   # fraction of x below the answer
    half = 6 * math.sqrt(q * (1 - q) / _SAMPLE) + 2 / _SAMPLE   # 6 standard errors of a sample quantile
    i_lo, i_hi = math.floor((q - half) * _SAMPLE), math.ceil((q + half) * _SAMPLE)
    lo = sample[i_lo] if i_lo >= 0 else None
    hi = sample[i_hi] if i_hi < _SAMPLE else None
    above = int(torch.count_nonzero(x > hi)) if hi is not None else 0
    band = x > lo if lo is not None else torch.ones_like(x, dtype=torch.bool)
    if hi is not None:
        band &= x <= hi
    need = k - above                                  # the answer is the need-th largest in the band
    n_band = int(torch.count_nonzero(band))
    if not 1 <= need <= n_band or n_band > n // 8:    # missed, or no narrower (massive ties)
        return torch.kthvalue(x, n - k + 1).values
    inside = x[band]
    return torch.kthvalue(inside, inside.numel() - need + 1).values


_SAMPLE, _SAMPLE_ABOVE = 1 << 16, 1 << 21


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask of tau's shape with exactly keep_count(density, tau.numel()) entries: the largest |tau|;
    among equal magnitudes at the threshold, the lowest flat indices (a stable descending sort's
    choice), so that the result never depends on the selection algorithm. O(n), no sort."""
    n = tau.numel()
    k = keep_count(density, n)
    if k >= n:
        return torch.ones_like(tau, dtype=torch.bool)
    mag = tau.abs().reshape(-1)
    if mag.dtype in (torch.float16, torch.bfloat16):
        mag = mag.float()
    thr = kth_largest(mag, k)
    keep = mag > thr
    need = k - int(torch.count_nonzero(keep))
    if need > 0:
        eq = mag == thr
        # ties at the threshold: the first `need` of them in flat order
        keep |= eq & (torch.cumsum(eq, 0, dtype=torch.int64) <= need)
    return keep.view(tau.shape)


def dare_mask(shape: torch.Size, density: float, seed: int, key: str, t: int, device) -> torch.Tensor:
    """Bool mask keeping each entry with probability `density`: u < density for u ~ U[0, 1) drawn from
    a generator seeded by (seed, tensor name, expert index), so a tensor's mask does not depend on the
    order of the walk. Reproducible for a given seed and device type."""
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(tensor_seed(seed, key, t))
    return torch.rand(shape, generator=g, device=device) < density


def disjoint_merge(tau: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES merge of sparsified task vectors tau: [T, *shape] -> [*shape].

    The elected sign of an entry is that of Σ_t tau[t] (+ where the sum is 0, as in mergekit); an
    entry of tau[t] agrees when it is nonzero with the elected sign. normalize: the mean of the
    agreeing entries (0 where none agrees); else their sum (mergekit's dare_ties default).
    """
    positive = tau.sum(0) >= 0
    agree = torch.where(positive, tau > 0, tau < 0)
    kept = torch.where(agree, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)).sum(0)
    if not normalize:
        return kept
    count = agree.sum(0, dtype=tau.dtype).clamp_(min=1)
    return kept.div_(count)
