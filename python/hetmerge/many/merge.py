"""hm.merge_many: the weighted average of N models aligned into one universe, in model 0's frame."""
from __future__ import annotations

import copy
import math
import numbers

import torch

from .. import ops
from ..maps import transform, viewed
from ..merging import scaled_target
from .universe import ManyAlignment

__all__ = ["merge_many", "check_weights"]


def check_weights(weights, n: int) -> list[float]:
    """N non-negative finite numbers with a positive sum, normalized to sum 1 (None: uniform)."""
    if weights is None:
        return [1.0 / n] * n
    if torch.is_tensor(weights):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights: expected a list of {n} numbers, got {weights!r}")
    ws = list(weights)
    if len(ws) != n:
        raise ValueError(f"weights: expected {n} numbers (one per model), got {len(ws)}")
    out = []
    for i, w in enumerate(ws):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights[{i}]: expected a number, got {w!r}")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] = {w}: weights must be finite and >= 0")
        out.append(w)
    total = sum(out)
    if total <= 0:
        raise ValueError(f"weights: {ws} sum to 0; give at least one positive weight")
    return [w / total for w in out]


def merge_many(models, res: ManyAlignment, weights=None, fill: str = "zero") -> torch.nn.Module:
    """A new module with models[0]'s architecture: every paired tensor is
    Σ_i weights[i] · T_i(W_i), T_i = model i mapped into model 0's frame by res.pair(0, i)
    (model 0's units as they are; a narrower model's missing units are padding).

    models: the N models res was computed for (or others with the same shapes, e.g. retrained).
    weights: None (uniform) or N non-negative numbers, normalized to sum 1.
    fill: "zero" (padding is zero, as hm.merge) or "base" (padding takes model 0's value, so units
      that only wider models have are not shrunk toward zero).
    Tensors that are not paired keep model 0's values. The models are left untouched.
    """
    if not isinstance(res, ManyAlignment):
        raise TypeError(f"res: expected a ManyAlignment from hm.align_many, got {type(res).__name__}")
    if fill not in ("zero", "base"):
        raise ValueError(f"fill: expected 'zero' or 'base', got {fill!r}")
    models = list(models) if not isinstance(models, torch.nn.Module) else [models]
    n = res.n_models
    if len(models) != n:
        raise ValueError(f"models: res aligns {n} models, got {len(models)}")
    w = check_weights(weights, n)
    sds = [m.state_dict() for m in models]
    ref = [m.state_dict() for m in res.universe.models]
    for term in res.universe.terms:
        for i, key in enumerate(term.keys):
            want = tuple(ref[i][key].shape)
            have = tuple(sds[i][key].shape) if key in sds[i] else None
            if have != want:
                raise ValueError(f"models[{i}]: {key!r} has shape {have}, but res was computed for "
                                 f"{want}; align these models with hm.align_many")
    items = []   # per model j >= 1: {base key: (target key, rows, cols)}
    for j in range(1, n):
        al = res.pair(0, j)
        items.append({pp.base_key: (pp, *transform(pp, al.maps)) for pp in al.pairing.params})
    new = dict(sds[0])
    for key in items[0]:
        a = viewed(sds[0][key], items[0][key][0].base_view).detach()   # as the spec sees it (a 2-D view)
        wide = torch.promote_types(a.dtype, torch.float32)
        parts = [a.to(wide)]
        for j, it in enumerate(items, start=1):
            pp, rows, cols = it[key]
            # RMSNorm gains of a narrower stream are rescaled as hm.merge rescales them
            b = scaled_target(viewed(sds[j][pp.target_key], pp.target_view).detach().to(device=a.device, dtype=wide), pp.scale,
                              pp.part_scales)
            rows = None if rows is None else rows.to(a.device)
            cols = None if cols is None else cols.to(a.device)
            if fill == "zero":
                parts.append(ops.permute_pad(b, rows, cols))
            else:
                lam = torch.ones(1, dtype=wide if wide == torch.float64 else torch.float32)
                parts.append(ops.interpolate(parts[0], b, lam, rows, cols, fill="base")[0])
        new[key] = ops.weighted_sum(parts, torch.tensor([w], dtype=torch.float64))[0].to(a.dtype) \
            .reshape(sds[0][key].shape)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(new)
    return merged
