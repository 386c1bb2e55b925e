"""Permutation graph of a model and the pairing of two graphs (base ↔ target).

A *group* is a set of parameter axes (key, axis) that hold the same hidden units and therefore must be
permuted together: a Linear/Conv output axis, the next layer's input axis, the bias, BatchNorm/LayerNorm
parameters and running statistics; residual additions join the groups they add. Model input and output
axes form *fixed* groups (never permuted). After a flatten of a conv output, the next Linear's input
axis holds ``size(group) · block`` entries with block = H·W (unit-major), which ``ops.cost_matrix(block=)``
and the block-expanded index maps cover.

``hetmerge.trace.trace_spec`` derives the graph with torch.fx; ``PermSpec.from_groups`` accepts a
hand-written one.
``pair_specs`` pairs a base graph with a target graph through a layer map and yields the *links* (one
index map each, base size, -1 = padding) that ``align`` solves and ``merge``/``sweep`` apply.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .maps import position_map

__all__ = ["SpecError", "Layer", "PermSpec", "Link", "PairedParam", "Pairing", "pair_specs"]


class SpecError(ValueError):
    """The permutation graph cannot be derived or a hand-written one is inconsistent."""


@dataclass(frozen=True)
class Layer:
    """One weighted layer: a Linear/Conv module plus the normalization parameters that follow it.

    params: role -> state-dict key ("weight", "bias", "norm.weight", "norm.running_mean", ...);
    roles are what pairs a base layer's parameters with a target layer's.
    """
    name: str
    params: Mapping[str, str]


@dataclass
class PermSpec:
    """Permutation graph of one model.

    groups: group -> [(key, axis)]          every permuted axis (axes 0 and 1 only)
    blocks: (key, axis) -> block            entries per unit on that axis (H·W after a flatten), default 1
    sizes:  group -> number of units        (free groups)
    fixed:  groups that are never permuted  (model input / output, and axes no group lists)
    layers: weighted layers, shallow to deep
    probes: group -> (module path, kind)    where the group's activations enter a layer (activation matching)
    segments: (key, axis) -> ((group, units, block), ...)
                                            an axis holding a concatenation (torch.cat along the
                                            channels): consecutive parts, each the units of one group
                                            (`block` entries each); no new freedom, so these axes are
                                            listed under no group
    """
    groups: dict[str, list[tuple[str, int]]]
    blocks: dict[tuple[str, int], int]
    sizes: dict[str, int]
    fixed: frozenset
    layers: list[Layer]
    probes: dict[str, tuple[str, str]] = field(default_factory=dict)
    segments: dict[tuple[str, int], tuple] = field(default_factory=dict)

    def axis_groups(self, key: str, ndim: int) -> tuple[str, ...]:
        """Group of each of the first min(ndim, 2) axes of `key`; unlisted axes get a fixed
        pseudo-group named "key:axis" (paired by position). An axis made of segments of several
        groups has no single group: SpecError (pairing such axes is not supported yet)."""
        return tuple(self.axis_group(key, ax) for ax in range(min(ndim, 2)))

    def axis_group(self, key: str, axis: int) -> str:
        """Group of one axis (see axis_groups)."""
        if (key, axis) in self.segments:
            parts = [g for g, _, _ in self.segments[(key, axis)]]
            raise SpecError(f"spec: axis {axis} of {key!r} is a concatenation of groups {parts} "
                            "(torch.cat along the channels); pairing, aligning and merging models "
                            "with concatenated channels is not supported yet (the graph and "
                            "maps.permute_state handle it)")
        return self._axis_to_group.get((key, axis), f"{key}:{axis}")

    def axis_segments(self, key: str, axis: int) -> tuple | None:
        """((group, units, block), ...) when axis `axis` of `key` is a concatenation, else None."""
        return self.segments.get((key, axis))

    def is_fixed(self, group: str) -> bool:
        return group in self.fixed or group not in self.groups

    def block(self, key: str, axis: int) -> int:
        return self.blocks.get((key, axis), 1)

    def __post_init__(self):
        self._axis_to_group = {}
        for g, entries in self.groups.items():
            for key, ax in entries:
                if (key, ax) in self._axis_to_group:
                    raise SpecError(f"spec: axis ({key!r}, {ax}) is listed in groups "
                                    f"{self._axis_to_group[(key, ax)]!r} and {g!r}")
                self._axis_to_group[(key, ax)] = g
        for (key, ax) in self.segments:
            if (key, ax) in self._axis_to_group:
                raise SpecError(f"spec: axis ({key!r}, {ax}) is both a concatenation and in group "
                                f"{self._axis_to_group[(key, ax)]!r}")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{g}={n}" for g, n in list(self.sizes.items())[:8])
        more = f", ... {len(self.sizes) - 8} more" if len(self.sizes) > 8 else ""
        cat = f", {len(self.segments)} concatenated axes" if self.segments else ""
        return (f"PermSpec({len(self.free_groups)} free groups [{sizes}{more}], "
                f"{len(self.layers)} layers, fixed {sorted(self.fixed)}{cat})")

    @property
    def free_groups(self) -> list[str]:
        return [g for g in self.groups if g not in self.fixed]

    # -- hand-written specs -------------------------------------------------------------------
    @classmethod
    def from_groups(cls, model: nn.Module | Mapping[str, torch.Tensor],
                    groups: Mapping[str, Sequence[Sequence[Any]]], fixed: Sequence[str] = (),
                    layers: Sequence[Layer] | None = None) -> "PermSpec":
        """Validate a hand-written spec: group -> [(key, axis) or (key, axis, block)].

        Every axis of a group must hold the same number of units (axis size / block) in this model;
        only axes 0 and 1 can be permuted. Layers default to the state dict's modules in order, a
        module with only 1-D tensors (a norm) being attached to the layer before it.
        """
        sd = _state(model)
        gs: dict[str, list[tuple[str, int]]] = {}
        blocks: dict[tuple[str, int], int] = {}
        sizes: dict[str, int] = {}
        for g, entries in groups.items():
            if not entries:
                raise SpecError(f"spec: group {g!r} is empty")
            gs[g] = []
            for e in entries:
                if len(e) not in (2, 3):
                    raise SpecError(f"spec: group {g!r}: entry {e!r} is not (key, axis[, block])")
                key, ax = e[0], int(e[1])
                blk = int(e[2]) if len(e) == 3 else 1
                if key not in sd:
                    raise SpecError(f"spec: group {g!r}: key {key!r} is not in the model's state dict")
                t = sd[key]
                if not 0 <= ax < min(t.dim(), 2):
                    raise SpecError(f"spec: group {g!r}: axis {ax} of {key!r} (shape {tuple(t.shape)}) "
                                    "cannot be permuted (only axes 0 and 1)")
                if blk < 1 or t.shape[ax] % blk:
                    raise SpecError(f"spec: group {g!r}: block {blk} does not divide {key!r}.shape[{ax}]"
                                    f" = {t.shape[ax]}")
                n = t.shape[ax] // blk
                if g in sizes and sizes[g] != n and g not in fixed:
                    raise SpecError(f"spec: group {g!r} has {sizes[g]} units on {gs[g][0]} but {n} on "
                                    f"({key!r}, {ax}); every axis of a group needs one size per model")
                sizes.setdefault(g, n)
                gs[g].append((key, ax))
                if blk != 1:
                    blocks[(key, ax)] = blk
        unknown = [f for f in fixed if f not in gs]
        if unknown:
            raise SpecError(f"spec: fixed group(s) {unknown} are not in groups")
        if layers is None:
            layers = _layers_from_state(sd)
        return cls(gs, blocks, {g: n for g, n in sizes.items() if g not in fixed}, frozenset(fixed),
                   list(layers))


def _state(model) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return dict(model.state_dict(keep_vars=True))
    return dict(model)


def _float_keys(sd) -> list[str]:
    # num_batches_tracked and other integer buffers are bookkeeping, not weights
    return [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()]


def _layers_from_state(sd) -> list[Layer]:
    mods: dict[str, dict[str, str]] = {}
    for k in _float_keys(sd):
        prefix, _, local = k.rpartition(".")
        mods.setdefault(prefix, {})[local] = k
    layers: list[list] = []
    for prefix, params in mods.items():
        if any(sd[k].dim() >= 2 for k in params.values()) or not layers:
            layers.append([prefix, dict(params)])
        else:
            attach_norm(layers[-1][1], params)
    return [Layer(n, p) for n, p in layers]


def attach_norm(params: dict, norm_params: Mapping[str, str]):
    i = 0
    while any(r.startswith(f"norm{i or ''}.") for r in params):
        i += 1
    for local, key in norm_params.items():
        params[f"norm{i or ''}.{local}"] = key


# ---------------------------------------------------------------------------------------------
# pairing base and target graphs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """One index map to find: base group <- target group; src has n_a entries (base units)."""
    name: str
    base_group: str
    target_group: str
    n_a: int
    n_b: int
    free: bool     # solved by assignment; otherwise pad/crop by position (both sides fixed)


@dataclass(frozen=True)
class PairedParam:
    """A base tensor interpolated with a target tensor; links[d] maps axis d (None past axis 1)."""
    base_key: str
    target_key: str
    layer: str               # base layer name (per-layer λ)
    links: tuple             # link name per permutable axis (1 or 2 entries)
    blocks: tuple            # entries per unit per axis (same in base and target)


@dataclass
class Pairing:
    layer_map: dict[str, str]            # base layer -> target layer
    links: dict[str, Link]
    params: list[PairedParam]
    cases: dict[str, str]                # base layer -> "same size" / "size-compatible" / "size-incompatible"

    def position_maps(self) -> dict[str, torch.Tensor]:
        return {n: position_map(l.n_a, l.n_b) for n, l in self.links.items()}


def _layer_case(a: torch.Size, b: torch.Size) -> str:
    if tuple(a) == tuple(b):
        return "same size"
    if len(a) < 2:
        return "size-compatible"
    d0, d1 = a[0] - b[0], a[1] - b[1]
    return "size-incompatible" if d0 * d1 < 0 else "size-compatible"


def _resolve_layer_map(layer_map, base_layers: list[str], target_layers: list[str],
                       base_kinds=None, target_kinds=None) -> dict[str, str]:
    if layer_map is None:
        # shallow to shallow, in order; a layer is paired with the next target layer of its kind
        # (a conv never with a Linear), so a deeper conv stack leaves its extra convs unpaired
        out, j = {}, 0
        for b, kb in zip(base_layers, base_kinds or [None] * len(base_layers)):
            k = j
            while k < len(target_layers) and target_kinds and target_kinds[k] != kb:
                k += 1
            if k < len(target_layers):
                out[b] = target_layers[k]
                j = k + 1
        return out
    items = layer_map.items() if isinstance(layer_map, Mapping) else layer_map
    out = {}
    for b, t in items:
        bn = base_layers[b] if isinstance(b, int) and not isinstance(b, bool) else b
        tn = target_layers[t] if isinstance(t, int) and not isinstance(t, bool) else t
        if bn not in base_layers:
            raise KeyError(f"layer_map: base layer {b!r} is not a layer of the base; layers: {base_layers}")
        if tn not in target_layers:
            raise KeyError(f"layer_map: target layer {t!r} is not a layer of the target; "
                           f"layers: {target_layers}")
        out[bn] = tn
    return out


def pair_specs(base: nn.Module, target: nn.Module, base_spec: PermSpec, target_spec: PermSpec,
               layer_map=None) -> Pairing:
    """Pair the layers of two graphs and derive the links (index maps) to solve.

    layer_map: None (shallow to shallow, in order, each base layer with the next target layer of the
    same kind: Linear with Linear, conv with conv of the same kernel; the output layers with each
    other only when both models have as many hidden layers, so with different depths the extra
    hidden layers and the head keep the base's weights), or {base layer: target layer} by name or index,
    or a list of pairs. Base layers not in the map keep their weights. Pairing a deeper target layer
    into a shallower base layer is allowed but warned about (the paper found it harmful).
    Parameters pair by role within a layer pair (weight, bias, norm.*); roles only one side has are
    left alone.
    """
    sa, sb = _state(base), _state(target)
    bl = [l.name for l in base_spec.layers]
    tl = [l.name for l in target_spec.layers]
    def kind(layer, sd, spec):
        key = layer.params.get("weight", "")
        w = sd.get(key)
        if w is None:
            return None
        # A layer writing the model's output (fixed output axis) pairs only with the other model's
        # output layer: pairing a hidden layer with a head would map hidden units onto classes.
        writes_output = spec.is_fixed(spec.axis_groups(key, w.dim())[0])
        in_block = spec.block(key, 1) if w.dim() > 1 else 1
        return (w.dim(), tuple(w.shape[2:]), writes_output, in_block)
    bkinds = [kind(l, sa, base_spec) for l in base_spec.layers]
    tkinds = [kind(l, sb, target_spec) for l in target_spec.layers]
    lmap = _resolve_layer_map(layer_map, bl, tl, bkinds, tkinds)
    if layer_map is None:
        # Heads are merged only when the depths match: otherwise the base head reads features of
        # a layer the target does not have at that depth (selective shallow-to-shallow merging).
        hidden_b = sum(1 for k in bkinds if k and not k[2])
        hidden_t = sum(1 for k in tkinds if k and not k[2])
        if hidden_b != hidden_t:
            lmap = {b: t for b, t in lmap.items() if not (bkinds[bl.index(b)] or (0, 0, False))[2]}

    def output_pair(b, t):  # head with head is not a deep-to-shallow merge, whatever the depths
        kb, kt = bkinds[bl.index(b)], tkinds[tl.index(t)]
        return bool(kb and kt and kb[2] and kt[2])
    deep = [(b, t) for b, t in lmap.items() if tl.index(t) > bl.index(b) and not output_pair(b, t)]
    if deep:
        warnings.warn(f"layer_map pairs deeper target layers into shallower base layers {deep}; the "
                      "paper found deep-to-shallow merging harmful", stacklevel=3)
    blayer = {l.name: l for l in base_spec.layers}
    tlayer = {l.name: l for l in target_spec.layers}

    raw: list[tuple[str, str, str, list[tuple[str, str, int, int, int]]]] = []
    cases = {}
    for bname, tname in lmap.items():
        lb, lt = blayer[bname], tlayer[tname]
        for role, bkey in lb.params.items():
            tkey = lt.params.get(role)
            if tkey is None:
                continue
            a, b = sa[bkey], sb[tkey]
            if a.dim() != b.dim() or tuple(a.shape[2:]) != tuple(b.shape[2:]):
                raise SpecError(f"pair_specs: cannot pair {bkey!r} {tuple(a.shape)} (base layer {bname!r})"
                                f" with {tkey!r} {tuple(b.shape)} (target layer {tname!r}): "
                                "different kinds of layer or kernel sizes")
            ga = base_spec.axis_groups(bkey, a.dim())
            gb = target_spec.axis_groups(tkey, b.dim())
            axes = []
            for ax in range(len(ga)):
                ba, bb = base_spec.block(bkey, ax), target_spec.block(tkey, ax)
                if ba != bb:
                    raise SpecError(f"pair_specs: {bkey!r} axis {ax} holds {ba} entries per unit but "
                                    f"{tkey!r} holds {bb} (different spatial sizes before a flatten)")
                axes.append((ga[ax], gb[ax], a.shape[ax] // ba, b.shape[ax] // bb, ba))
            raw.append((bkey, tkey, bname, axes))
            if role == "weight":
                cases[bname] = _layer_case(a.shape, b.shape)
        cases.setdefault(bname, "same size")

    # one link per (base group, target group); named after the base group unless it is paired twice
    partners: dict[str, set] = {}
    for _, _, _, axes in raw:
        for g_a, g_b, *_ in axes:
            partners.setdefault(g_a, set()).add(g_b)
    links: dict[str, Link] = {}
    params = []
    for bkey, tkey, bname, axes in raw:
        names, blocks = [], []
        for g_a, g_b, n_a, n_b, blk in axes:
            name = g_a if len(partners[g_a]) == 1 else f"{g_a}<-{g_b}"
            link = Link(name, g_a, g_b, n_a, n_b,
                        free=not (base_spec.is_fixed(g_a) and target_spec.is_fixed(g_b)))
            old = links.setdefault(name, link)
            if (old.n_a, old.n_b) != (n_a, n_b):
                raise SpecError(f"pair_specs: link {name!r} has sizes {old.n_a}<-{old.n_b} on one tensor "
                                f"but {n_a}<-{n_b} on {bkey!r}/{tkey!r}")
            names.append(name)
            blocks.append(blk)
        params.append(PairedParam(bkey, tkey, bname, tuple(names), tuple(blocks)))
    return Pairing(lmap, links, params, cases)
