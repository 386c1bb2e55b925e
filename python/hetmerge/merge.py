"""Merge: apply the index maps and a merging factor λ; the merged model has the base's architecture."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn as nn

from . import ops
from .maps import transform
from .spec import Pairing

__all__ = ["merge", "resolve", "interpolate_params"]


def resolve(base: nn.Module, target: nn.Module, res, layer_map=None) -> tuple[Pairing, dict]:
    """(pairing, maps) from an AlignResult, or for res=None the unaligned baseline: the default (or
    given) layer map with maps by position (pad/crop)."""
    if res is None:
        from .alignment import prepare
        pairing = prepare(base, target, layer_map)[0]
        return pairing, pairing.position_maps()
    if getattr(res, "pairing", None) is None:
        raise ValueError("res: expected an AlignResult from hm.align (or None for the unaligned baseline)")
    return res.pairing, res.maps


def _layer_lams(pairing: Pairing, lam) -> dict[str, float] | float:
    if isinstance(lam, Mapping):
        layers = set(pairing.layer_map)
        for k in lam:
            if k not in layers:
                raise KeyError(f"lam: {k!r} is not a paired base layer; paired layers: {sorted(layers)}")
        return {k: float(v) for k, v in lam.items()}
    return float(lam)


def interpolate_params(pairing: Pairing, maps, sa, sb, lambdas: torch.Tensor, fill: str = "zero",
                       keys=None) -> dict[str, torch.Tensor]:
    """{base key: [K, *shape]} for every paired tensor: (1 - λ_k)·A + λ_k·T(B), one
    ``ops.interpolate`` per tensor for all K factors."""
    out = {}
    for pp in pairing.params:
        if keys is not None and pp.base_key not in keys:
            continue
        rows, cols = transform(pp, maps)
        a, b = sa[pp.base_key].detach(), sb[pp.target_key].detach()
        out[pp.base_key] = ops.interpolate(a, b, lambdas.to(a.device), rows.to(a.device),
                                           None if cols is None else cols.to(a.device), fill=fill)
    return out


def merge(base: nn.Module, target: nn.Module, res=None, lam=0.5, fill: str = "zero",
          layer_map=None) -> nn.Module:
    """A new module with the base's architecture: every paired tensor becomes
    ``ops.interpolate(base, target, [λ], maps, fill)``; other tensors are the base's.

    res: AlignResult from hm.align, or None (maps by position: the unaligned baseline).
    lam: float, or {base layer: λ} (unlisted layers keep the base's weights; 0 = base).
    fill: "zero" (padded target units are zero) or "base" (padding keeps the base's value).
    base and target are left untouched.
    """
    if fill not in ("zero", "base"):
        raise ValueError(f"fill: expected 'zero' or 'base', got {fill!r}")
    pairing, maps = resolve(base, target, res, layer_map)
    lams = _layer_lams(pairing, lam)
    sa = base.state_dict()
    sb = target.state_dict()
    merged = copy.deepcopy(base)
    new = dict(sa)
    for pp in pairing.params:
        l = lams if isinstance(lams, float) else lams.get(pp.layer, 0.0)
        if l == 0.0:
            continue
        dtype = sa[pp.base_key].dtype
        vals = interpolate_params(Pairing(pairing.layer_map, pairing.links, [pp], pairing.cases), maps,
                                  sa, sb, torch.tensor([l], dtype=torch.float64 if dtype == torch.float64
                                                       else torch.float32), fill)
        new[pp.base_key] = vals[pp.base_key][0]
    merged.load_state_dict(new)
    return merged
