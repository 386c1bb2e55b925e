"""Index maps and what they do to tensors.

An index map aligns a base axis of n_a units with a target axis: ``src[i] = j`` puts target unit j in
base slot i, ``-1`` is zero padding (DESIGN.md). These helpers expand a unit map to an axis holding
several entries per unit, invert it, turn a paired tensor's links into (rows, cols) for the
primitives, and permute a whole state dict (used to check a graph by its invariance).
"""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Mapping

import torch

from . import ops

if TYPE_CHECKING:
    from .spec import PermSpec

__all__ = ["position_map", "expand_map", "inverse_map", "axis_map", "transform", "pieces", "unit_view",
           "permute_state", "viewed"]



def position_map(n_a: int, n_b: int) -> torch.Tensor:
    """Pad/crop by position: base slot i takes target unit i (or padding when i >= n_b)."""
    m = torch.arange(n_a, dtype=torch.long)
    m[n_b:] = -1
    return m


def viewed(t: torch.Tensor, view: tuple) -> torch.Tensor:
    """A paired tensor as its spec sees it: its 2-D view (PermSpec.views, PairedParam.base_view /
    target_view: a cls token [1, 1, d] seen as [1, d]), or as stored when `view` is ()."""
    return t.reshape(view) if view else t


def expand_map(src: torch.Tensor, block: int) -> torch.Tensor:
    """Unit map [n] -> entry map [n·block] for an axis that holds `block` entries per unit."""
    if block == 1:
        return src
    r = torch.arange(block, dtype=torch.long, device=src.device)
    out = src[:, None] * block + r
    return torch.where(src[:, None] >= 0, out, torch.full_like(out, -1)).reshape(-1)


def permute_state(spec: PermSpec, state: Mapping[str, torch.Tensor],
                  perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with the units of each group in `perms` reordered: new unit i = old unit
    perms[g][i] (a permutation of the group). Used to check a graph by its invariance."""
    out = {k: v.detach().clone() for k, v in state.items()}
    for key, stored in state.items():
        if not torch.is_tensor(stored) or not stored.is_floating_point() or stored.dim() == 0:
            continue
        t = spec.view(key, stored)   # groups name axes of the spec's view (cls token, pos embed)
        maps = []
        for ax in range(min(t.dim(), 2)):
            segs = spec.axis_segments(key, ax)
            if segs is not None:
                maps.append(_segment_map(segs, perms))
                continue
            g = spec.axis_group(key, ax)
            if g in perms:
                maps.append(expand_map(torch.as_tensor(perms[g]), spec.block(key, ax)))
            else:
                maps.append(None)
        if all(m is None for m in maps):
            continue
        rows = maps[0] if maps[0] is not None else torch.arange(t.shape[0])
        cols = maps[1] if len(maps) > 1 else None
        out[key] = ops.permute_pad(t.detach(), rows, cols).reshape(stored.shape)
    return out


def _segment_map(segments, perms) -> torch.Tensor | None:
    """Entry map of a concatenated axis: each part permuted by its group's map, in place."""
    if not any(g in perms for g, _, _ in segments):
        return None
    out, offset = [], 0
    for g, n, block in segments:
        src = torch.as_tensor(perms[g]) if g in perms else torch.arange(n)
        out.append(expand_map(src, block) + offset)
        offset += n * block
    return torch.cat(out)


def inverse_map(src: torch.Tensor, n_b: int) -> torch.Tensor:
    """Target unit -> base slot (-1 where the target unit was dropped)."""
    inv = torch.full((n_b,), -1, dtype=torch.long, device=src.device)
    ok = src >= 0
    inv[src[ok]] = torch.nonzero(ok)[:, 0]
    return inv


def unit_view(t: torch.Tensor, d: int, blocks: tuple) -> tuple[torch.Tensor, int]:
    """View tensor `t` as [units of axis d, units of the other axis · block] (other axis major).

    t: [n0·b0, n1·b1, *trailing] (or [n0·b0] for 1-D); returns (view, block) with
    block = b0·b1·prod(trailing), which is what ``ops.cost_matrix`` needs to apply the other axis's
    map without materializing it. Linear weights come back as plain (transposed) views; conv kernels
    and flattened inputs need one copy (done once per alignment).
    """
    if t.dim() == 1:
        return t.view(-1, blocks[0]), blocks[0]
    b0, b1 = blocks[0], blocks[1]
    n0, n1 = t.shape[0] // b0, t.shape[1] // b1
    trail = math.prod(t.shape[2:])
    v = t.reshape(n0, b0, n1, b1 * trail)
    v = v.permute(0, 2, 1, 3) if d == 0 else v.permute(2, 0, 1, 3)
    return v.reshape(v.shape[0], -1), b0 * b1 * trail


def axis_map(pp, d: int, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Entry map of axis d of a paired tensor. A concatenated axis maps part by part: base part i
    takes entries of target part i (its offset added), in place."""
    segs = pp.segments[d] if pp.segments else ()
    if not segs:
        return expand_map(maps[pp.links[d]], pp.blocks[d])
    out, offset = [], 0
    for link, _n_a, n_b, block in segs:
        m = expand_map(maps[link], block)
        out.append(torch.where(m >= 0, m + offset, m))
        offset += n_b * block
    return torch.cat(out)


def transform(pp, maps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, cols) entry maps of one paired tensor, for ops.permute_pad / ops.interpolate."""
    rows = axis_map(pp, 0, maps)
    cols = axis_map(pp, 1, maps) if len(pp.links) > 1 else None
    return rows, cols


def pieces(pp, a: torch.Tensor, b: torch.Tensor):
    """(a piece, b piece, links, blocks) of one paired tensor for cost terms: the tensor itself, or,
    where an axis is a concatenation, one slice per part (costs add up over the parts)."""
    per_axis = []
    for d in range(len(pp.links)):
        segs = pp.segments[d] if pp.segments else ()
        if not segs:
            per_axis.append([(None, pp.links[d], pp.blocks[d])])
            continue
        parts, oa, ob = [], 0, 0
        for link, n_a, n_b, block in segs:
            parts.append(((oa, n_a * block, ob, n_b * block), link, block))
            oa, ob = oa + n_a * block, ob + n_b * block
        per_axis.append(parts)
    for combo in itertools.product(*per_axis):
        ap, bp = a, b
        for d, (cut, _, _) in enumerate(combo):
            if cut is not None:
                ap, bp = ap.narrow(d, cut[0], cut[1]), bp.narrow(d, cut[2], cut[3])
        yield ap, bp, tuple(c[1] for c in combo), tuple(c[2] for c in combo)


