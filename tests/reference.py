"""Independent references for the primitives, in plain torch (float64 where it matters).

They materialize padding and gathers explicitly — the obvious code that hetmerge.ops must match.
"""
from __future__ import annotations

import numpy as np
import torch


def to_torch(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def gather_pad(x: torch.Tensor, index, dim: int) -> torch.Tensor:
    """x.index_select(dim, index) with zeros where index == -1."""
    if index is None:
        return x
    index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
    if x.shape[dim] == 0:  # nothing to pick from: every slot is padding
        shape = list(x.shape)
        shape[dim] = len(index)
        return torch.zeros(shape, dtype=x.dtype)
    picked = x.index_select(dim, index.clamp(min=0))
    keep = (index >= 0).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = -1
    return picked * keep.reshape(shape)


def permute_pad_ref(w, rows, cols=None) -> torch.Tensor:
    w = to_torch(w)
    out = gather_pad(w, rows, 0)
    if w.ndim >= 2:
        out = gather_pad(out, cols, 1)
    return out


def interpolate_ref(a, b, lambdas, rows=None, cols=None, fill="zero") -> torch.Tensor:
    """(1 - λ) a + λ b~ computed in float32 (float64 for float64), rounded once to a's dtype."""
    a, b = to_torch(a), to_torch(b)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a32, b32 = a.to(acc), b.to(acc)
    bt = permute_pad_ref(b32, rows, cols)
    if fill == "base":
        ones = torch.ones_like(b32)
        present = permute_pad_ref(ones, rows, cols).bool()
        bt = torch.where(present, bt, a32)
    lam = torch.as_tensor(np.asarray(lambdas, dtype=np.float64)).to(acc)
    lam = lam.reshape(-1, *([1] * a.ndim))
    return ((1 - lam) * a32 + lam * bt).to(a.dtype)


def weighted_sum_ref(tensors, coeffs) -> torch.Tensor:
    ts = [to_torch(t) for t in tensors]
    acc = torch.float64 if ts[0].dtype == torch.float64 else torch.float32
    c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64)).to(acc)
    if c.ndim == 1:
        c = c[None]
    stacked = torch.stack([t.to(acc) for t in ts])  # [T, *shape]
    return torch.einsum("kt,t...->k...", c, stacked).to(ts[0].dtype)


def cost_matrix_ref(terms) -> torch.Tensor:
    """Sum over terms of A_gathered @ B_gathered.T in float64, padding materialized as zeros."""
    total = None
    for term in terms:
        A, B = to_torch(term[0]).double(), to_torch(term[1]).double()
        m = term[2] if len(term) > 2 else None
        block = term[3] if len(term) > 3 else 1
        if m is not None:
            m = torch.as_tensor(np.asarray(m), dtype=torch.int64)
            Bg = B.reshape(B.shape[0], -1, block)
            Bg = gather_pad(Bg, m, 1).reshape(B.shape[0], -1)
        else:
            Bg = B
        c = A @ Bg.T
        total = c if total is None else total + c
    return total


def assignment_cost(cost, row_ind, col_ind) -> float:
    cost = np.asarray(cost, dtype=np.float64)
    return float(cost[np.asarray(row_ind), np.asarray(col_ind)].sum())
