"""The merge engine: one way to turn paired tensors, index maps and merging factors into merged
tensors, used by every merge in hetmerge.

    pairing + maps + λ  ->  merge_items()  ->  MergeItem per paired tensor (λ decided here, once)
    MergeItem + base/target tensor sources  ->  merge_tensor()  ->  [K, rows...] (K factors at once)

and three sinks on top of it: ``merge`` (a new module), ``stream_merge`` (row blocks of
memory-mapped safetensors into a streaming writer) and ``evaluate.sweep`` (K stacked copies for a
batched forward). A tensor source is any Mapping of tensors; sources with ``get_rows`` /
``gather_rows`` (checkpoint.LazyState) are read block by block without loading whole tensors.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from . import ops
from .maps import transform
from .pairing import LayerMapError, Pairing, resolve_layer

__all__ = ["MergeItem", "merge_items", "merge_tensor", "scaled_target", "merge", "stream_merge", "resolve", "layer_lams",
           "check_lam", "memory_estimate"]


@dataclass(frozen=True)
class MergeItem:
    """One paired tensor: base[base_key] <- target[target_key] through entry maps (rows over axis 0,
    cols over axis 1; None = not permuted), merged at factor `lam` (0 keeps the base); the target
    tensor is multiplied by `scale` first (RMSNorm gains zero-padded into a wider stream), and its
    entries start:start+length of an axis by factor for each (axis, start, length, factor) in
    `part_scales` (the Q part of a fused q|k|v whose heads are padded)."""
    base_key: str
    target_key: str
    layer: str
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    lam: float
    scale: float = 1.0
    part_scales: tuple = ()
    base_view: tuple = ()      # 2-D views the maps refer to (PairedParam; () = as stored)
    target_view: tuple = ()


def layer_lams(pairing: Pairing, lam, extrapolate: bool = False) -> dict[str, float]:
    """λ per paired base layer: a float applies to every paired layer; a {layer: λ} dict to the
    layers it lists, unlisted layers getting 0 (they keep the base's weights). The one place where
    that default is decided. Keys resolve like layer-map keys (spec.resolve_layer: a name that
    exists is that layer, "#N" a position)."""
    layers = list(pairing.layer_map)
    if isinstance(lam, Mapping):
        out = {layer: 0.0 for layer in layers}
        given: dict[str, Any] = {}
        for k, v in lam.items():
            name = resolve_layer(k, pairing.base_layers or layers, "lam", "base", label="")
            if name not in pairing.layer_map:
                raise LayerMapError(f"lam: {k!r} is not a paired base layer; paired layers: {layers} "
                                    "(unpaired layers keep the base's weights)")
            if name in given:
                raise LayerMapError(f"lam: keys {given[name]!r} and {k!r} are both base layer {name!r}")
            out[name] = check_lam(v, f"lam[{k!r}]", extrapolate)
            given[name] = k
        return out
    value = check_lam(lam, "lam", extrapolate)
    return {layer: value for layer in layers}


def check_lam(value: Any, where: str = "lam", extrapolate: bool = False) -> float:
    """One merging factor as a float: finite, and in [0, 1] unless `extrapolate` (then the merge is
    still (1 - λ)·base + λ·target, read past the endpoints)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not (
            torch.is_tensor(value) and value.numel() == 1):   # numbers.Real: numpy scalars too
        raise TypeError(f"{where}: expected a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{where} = {x} is not a finite number")
    if not extrapolate and not 0.0 <= x <= 1.0:
        raise ValueError(f"{where} = {x} is outside [0, 1] (0 = base, 1 = target); pass extrapolate=True "
                         "to extrapolate (1 - λ)·base + λ·target")
    return x


def merge_items(pairing: Pairing, maps: Mapping[str, torch.Tensor], lam=1.0,
                extrapolate: bool = False) -> list[MergeItem]:
    """A MergeItem per paired tensor whose layer has λ != 0 (the others keep the base's tensor)."""
    lams = layer_lams(pairing, lam, extrapolate)
    items = []
    for pp in pairing.params:
        value = lams.get(pp.layer, 0.0)
        if value == 0.0:
            continue
        rows, cols = transform(pp, maps)
        items.append(MergeItem(pp.base_key, pp.target_key, pp.layer, rows, cols, value, pp.scale,
                               pp.part_scales, pp.base_view, pp.target_view))
    return items


def scaled_target(b: torch.Tensor, scale: float, part_scales=(), target_rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """A target tensor with its merge factors applied: all of it times `scale`, and its entries
    start:start+length along an axis times factor for each (axis, start, length, factor) in
    `part_scales` (b holds the target rows `target_rows` when only some were read)."""
    if scale != 1.0:
        b = b * scale
    for ax, start, length, factor in part_scales:
        idx = torch.arange(b.shape[ax]) if target_rows is None or ax != 0 else target_rows
        f = torch.where((idx >= start) & (idx < start + length), factor, 1.0).to(b.dtype).to(b.device)
        b = b * f.reshape([-1] + [1] * (b.dim() - 1 - ax))
    return b


def _lambda_tensor(lambdas, dtype: torch.dtype) -> torch.Tensor:
    # λ in float32 for low-precision weights: the kernels accumulate in float32 anyway
    return torch.as_tensor(lambdas, dtype=torch.float64 if dtype == torch.float64 else torch.float32).reshape(-1)


def merge_tensor(item: MergeItem, base: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 lambdas=None, fill: str = "zero", row_range: tuple[int, int] | None = None) -> torch.Tensor:
    """[K, *rows of the base tensor]: (1 - λ_k)·A + λ_k·T(B) for λ_k in `lambdas` (default
    [item.lam]), one ``ops.interpolate``. `row_range` = (i0, i1) merges base rows i0:i1 only and reads
    just the target rows they use, from sources that can read rows (memory-mapped checkpoints)."""
    if item.base_view or item.target_view:
        # merged in the view the maps refer to, handed back in the base tensor's stored shape; a
        # viewed tensor ([1, ..., 1, n, d]) has one stored row, so a row range is all of it
        a = base[item.base_key].detach()
        if row_range is not None and tuple(row_range) != (0, a.shape[0]):
            raise ValueError(f"merge_tensor: {item.base_key!r} is merged through a 2-D view and cannot "
                             f"be merged by row ranges (got {row_range})")
        flat = dataclasses.replace(item, base_view=(), target_view=())
        va = {item.base_key: a.reshape(item.base_view) if item.base_view else a}
        b = target[item.target_key].detach()
        vb = {item.target_key: b.reshape(item.target_view) if item.target_view else b}
        out = merge_tensor(flat, va, vb, lambdas, fill)
        return out.reshape(out.shape[0], *a.shape)
    target_rows = None     # target row of each row of b, where b holds only some
    if row_range is None:
        a = base[item.base_key].detach()
        b = target[item.target_key].detach()
        rows = item.rows
    else:
        i0, i1 = row_range
        a = _rows(base, item.base_key, i0, i1)
        if item.rows is None:   # axis 0 is not permuted (same size): the same rows of the target
            b, rows = _rows(target, item.target_key, i0, i1), None
            target_rows = torch.arange(i0, i0 + b.shape[0])
        else:                   # gather just the target rows this block uses, renumbered
            rows = item.rows[i0:i1]
            used = rows[rows >= 0]
            b = _gather(target, item.target_key, used)
            target_rows = used.cpu()
            local = torch.full_like(rows, -1)
            local[rows >= 0] = torch.arange(len(used), dtype=rows.dtype, device=rows.device)
            rows = local
    rows = None if rows is None else rows.to(a.device)
    cols = None if item.cols is None else item.cols.to(a.device)
    if item.scale != 1.0 or item.part_scales:
        # scaled in float32 (or wider) and rounded once, with the interpolation
        wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        lam = _lambda_tensor([item.lam] if lambdas is None else lambdas, wide).to(a.device)
        b = scaled_target(b.to(wide), item.scale, item.part_scales, target_rows)
        return ops.interpolate(a.to(wide), b, lam, rows, cols, fill=fill).to(a.dtype)
    if a.dtype != b.dtype:
        # mixed precision (a bf16 base, a float32 fine-tune): interpolate in the wider dtype and
        # round once to the base's, rather than rounding the target first
        wide = torch.promote_types(a.dtype, b.dtype)
        lam = _lambda_tensor([item.lam] if lambdas is None else lambdas, wide).to(a.device)
        return ops.interpolate(a.to(wide), b.to(wide), lam, rows, cols, fill=fill).to(a.dtype)
    lam = _lambda_tensor([item.lam] if lambdas is None else lambdas, a.dtype).to(a.device)
    return ops.interpolate(a, b, lam, rows, cols, fill=fill)


def _rows(source, key: str, i0: int, i1: int) -> torch.Tensor:
    get_rows = getattr(source, "get_rows", None)
    return get_rows(key, i0, i1) if get_rows is not None else source[key].detach()[i0:i1]


def _gather(source, key: str, idx: torch.Tensor) -> torch.Tensor:
    gather_rows = getattr(source, "gather_rows", None)
    if gather_rows is not None:
        return gather_rows(key, idx)
    t = source[key].detach()
    return t.index_select(0, idx.to(t.device))


def resolve(base: nn.Module, target: nn.Module, res, layer_map=None) -> tuple[Pairing, dict]:
    """(pairing, maps) from an AlignResult or Alignment, or for res=None the unaligned baseline: the default (or
    given) layer map with maps by position (pad/crop)."""
    if res is None:
        from .alignment import prepare
        pairing = prepare(base, target, layer_map)[0]
        return pairing, pairing.position_maps()
    if getattr(res, "pairing", None) is None:
        raise ValueError("res: expected an AlignResult from hm.align or an hm.Alignment (or None for the "
                         "unaligned baseline)")
    return res.pairing, res.maps


def stream_merge(base, target, out_path: str | os.PathLike, items, fill: str = "zero",
                 metadata: Mapping[str, str] | None = None, progress=None, chunk_bytes: int = 64 << 20) -> dict:
    """Merge two memory-mapped safetensors checkpoints into `out_path`, streaming.

    items: the merge engine's MergeItems (``merging.merge_items``) for the tensors to merge; every
    other base tensor is copied as is. Each merged tensor is ``merging.merge_tensor`` of the item,
    computed in blocks of base rows of about `chunk_bytes` and written as soon as each block is done.
    Inputs are memory-mapped per block and unmapped after it, so peak resident memory is a few blocks
    (plus the target rows they gather), not two whole models, nor even one whole tensor.
    progress(key, nbytes) is called per tensor. Returns {"tensors", "bytes", "seconds"}.
    """
    import time

    from .checkpoint import CheckpointError, StreamWriter

    t0 = time.perf_counter()
    by_key = {it.base_key: it for it in items}
    unknown = [k for k in by_key if k not in base.infos]
    if unknown:
        raise CheckpointError(f"{base.path}: no tensor(s) {unknown[:3]} named in the merge")
    entries = [(k, i.dtype, i.shape) for k, i in base.infos.items()]
    done = 0
    with StreamWriter(out_path, entries, metadata) as w:
        for k, dt, shape in entries:
            info = base.infos[k]
            item = by_key.get(k)
            n0 = shape[0] if shape else 1
            step = max(1, chunk_bytes // max(1, info.nbytes // max(1, n0)))
            copy = item is None or not dt.is_floating_point or not shape
            if not copy and item.target_key not in target.infos:
                raise CheckpointError(f"{target.path}: no tensor {item.target_key!r} (paired with base {k!r})")
            for i0 in range(0, n0, step):
                i1 = min(n0, i0 + step)
                if copy:
                    a = base.get_rows(k, i0, i1) if shape else base.get(k)
                    w.write_part(k, a)
                    del a   # drops the mapping: its pages leave this process's resident set
                else:
                    out = merge_tensor(item, base, target, fill=fill, row_range=(i0, i1))
                    w.write_part(k, out[0])
                    del out
            w.end_tensor(k)
            done += info.nbytes
            if progress is not None:
                progress(k, info.nbytes)
    return {"tensors": len(entries), "bytes": done, "seconds": time.perf_counter() - t0}


def merge(base: nn.Module, target: nn.Module, res=None, lam=0.5, fill: str = "zero",
          layer_map=None, extrapolate: bool = False, repair: Any = None) -> nn.Module:
    """A new module with the base's architecture: every paired tensor becomes
    ``ops.interpolate(base, target, [λ], maps, fill)``; other tensors are the base's.

    res: AlignResult from hm.align or an Alignment, or None (maps by position: the unaligned baseline).
    lam: float in [0, 1], or {base layer: λ} (unlisted layers keep the base's weights; 0 = base).
    extrapolate: allow λ outside [0, 1] ((1 - λ)·A + λ·T(B) all the same).
    fill: "zero" (padded target units are zero) or "base" (padding keeps the base's value).
    repair: data X (a tensor, (X, y), or an iterable of batches): REPAIR the merge on it, i.e. give
      every paired hidden unit the interpolated mean and std of the ends' on X (hetmerge.repair).
    base and target are left untouched.
    """
    if fill not in ("zero", "base"):
        raise ValueError(f"fill: expected 'zero' or 'base', got {fill!r}")
    pairing, maps = resolve(base, target, res, layer_map)
    sa = base.state_dict()
    sb = target.state_dict()
    new = dict(sa)
    for item in merge_items(pairing, maps, lam, extrapolate):
        new[item.base_key] = merge_tensor(item, sa, sb, fill=fill)[0]
    merged = copy.deepcopy(base)
    merged.load_state_dict(new)
    if repair is not None:
        from .repair import Repairer
        Repairer(base, target, res, repair, fill, layer_map)(merged, lam, extrapolate)
    return merged


def memory_estimate(pairing: Pairing, base_state: Mapping[str, torch.Tensor],
                    target_state: Mapping[str, torch.Tensor], n_lambdas: int) -> dict[str, int]:
    """Bytes each step needs for these two models (weights in their stored dtype, float32 costs):
    align (both models + the largest cost matrix), merge in memory or streamed (row blocks), and a
    sweep of `n_lambdas` factors (hm.sweep bounds its stacked weights at 512 MB). Works on
    meta-device states: only shapes are read."""
    def nbytes(t):
        return t.numel() * t.element_size()
    bytes_a = sum(nbytes(v) for v in base_state.values())
    bytes_b = sum(nbytes(v) for v in target_state.values())
    cost = max((l.n_a * l.n_b * 4 for l in pairing.links.values() if l.free), default=0)
    paired = sum(nbytes(base_state[pp.base_key]) for pp in pairing.params)
    sweep_chunk = min(n_lambdas * paired, max(paired, 1 << 29))
    biggest = max((nbytes(v) for v in base_state.values()), default=0)
    return {"base_weights": bytes_a, "target_weights": bytes_b, "largest_cost_matrix": cost,
            "align_peak": bytes_a + bytes_b + cost, "merge_in_memory_peak": 2 * bytes_a + bytes_b,
            "merge_streaming_peak": min(biggest, 64 << 20) * 3, "sweep_stacked_weights": sweep_chunk,
            "sweep_peak": bytes_a + bytes_b + sweep_chunk}
