"""Conflict-aware denoising of several sources' transferred updates, in the target's basis (our design).

1. Agreement: each source's updates, all modules flattened into one vector v_k, against the
   consensus of the others, a_k = cos(v_k, Σ_{j≠k} v_j/|v_j|) (others unit-normalized, so that one
   large noisy update cannot make itself the consensus). A random update is nearly orthogonal to
   everything (a ≈ 0); sources that learned the same thing agree (a > 0).
2. Weights: w = softmax(a / temperature); one source gets weight 1.
3. Per entry, TIES-like (tasks.sparsify): each update trimmed to its `density` largest magnitudes, a
   sign elected from Σ_k w_k τ_k, and the w-weighted mean of the entries that carry the elected sign
   (0 where none does). One source at density 1 passes through unchanged.
"""
from __future__ import annotations

import torch

from ..tasks.sparsify import magnitude_mask

__all__ = ["agreement", "source_weights", "fuse_updates"]


def agreement(updates: list[dict]) -> torch.Tensor:
    """a: [K] cosine of each source's flattened update with the sum of the others' unit vectors."""
    keys = sorted(set().union(*updates))
    vecs = []
    for u in updates:
        vecs.append(torch.cat([(u[k] if k in u else torch.zeros_like(next(v[k] for v in updates if k in v)))
                               .reshape(-1).double() for k in keys]))
    v = torch.stack(vecs)
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    others = unit.sum(0, keepdim=True) - unit
    return torch.nn.functional.cosine_similarity(v, others, dim=1, eps=1e-30)


def source_weights(updates: list[dict], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [K] summing to 1, agreement [K]); one source: ([1], [1])."""
    if len(updates) == 1:
        return torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    a = agreement(updates)
    return torch.softmax(a / temperature, 0), a


def fuse_updates(updates: list[dict], weights: torch.Tensor, density: float) -> dict:
    """{module: fused ΔW}: weighted TIES merge per entry of the sources' updates of that module."""
    out = {}
    for k in sorted(set().union(*updates)):
        have = [(w, u[k]) for w, u in zip(weights.tolist(), updates) if k in u]
        tau = torch.stack([t * magnitude_mask(t, density) for _, t in have])
        w = torch.tensor([x for x, _ in have], dtype=tau.dtype).view(-1, *([1] * (tau.dim() - 1)))
        positive = (w * tau).sum(0) >= 0
        agree = torch.where(positive, tau > 0, tau < 0)
        wa = torch.where(agree, w, torch.zeros((), dtype=tau.dtype))
        den = wa.sum(0)
        out[k] = torch.where(den > 0, (wa * tau).sum(0) / den.clamp_min(1e-300), torch.zeros((), dtype=tau.dtype))
    return out
