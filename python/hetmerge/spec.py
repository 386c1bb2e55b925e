"""Permutation graph of a model: the PermSpec type.

A *group* is a set of parameter axes (key, axis) that hold the same hidden units and therefore must be
permuted together: a Linear/Conv output axis, the next layer's input axis, the bias, BatchNorm/LayerNorm
parameters and running statistics; residual additions join the groups they add. Model input and output
axes form *fixed* groups (never permuted). After a flatten of a conv output, the next Linear's input
axis holds ``size(group) · block`` entries with block = H·W (unit-major), which ``ops.cost_matrix(block=)``
and the block-expanded index maps cover.

``hetmerge.trace.trace_spec`` derives the graph with torch.fx; ``PermSpec.from_groups`` accepts a
hand-written one; ``hetmerge.pairing`` pairs two graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn


__all__ = ["SpecError", "LayerMapError", "Layer", "Tie", "PermSpec", "attach_norm"]


class SpecError(ValueError):
    """The permutation graph cannot be derived or a hand-written one is inconsistent."""


class LayerMapError(SpecError, KeyError):
    """A layer key (in a layer map or a per-layer λ) names no layer of its model, or no paired one.

    A KeyError too, as unknown layer keys always were; printed without KeyError's quotes."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Layer:
    """One weighted layer: a Linear/Conv module plus the normalization parameters that follow it.

    params: role -> state-dict key ("weight", "bias", "norm.weight", "norm.running_mean", ...);
    roles are what pairs a base layer's parameters with a target layer's.
    """
    name: str
    params: Mapping[str, str]


@dataclass(frozen=True)
class Tie:
    """Groups whose units come in heads (attention): every group of a tie holds the same number of
    heads, ``head_units[i]`` consecutive units per head in ``groups[i]``. A map of a tied group moves
    whole heads, one head map for all groups of the tie (a head's Q/K and V/O stay one head), and
    inside a head any permutation of that group's units (its own per head and per group).

    An attention block without RoPE ties "qk" (units = the q/k dimensions, head_dim per head) and
    "vo" (the v dimensions / o's input columns): Q and K share one permutation inside a head, V and
    O another. With RoPE a rotary pair must keep its frequency, so Q/K cannot move inside a head:
    its "qk" group's unit is the whole head (head_units 1, head_dim entries per unit as the block).

    queries: (key, axis, part) of the tensors holding Q (part: the place in a concatenated axis such
    as a fused q|k|v, else 0). A model zero-padded into wider heads computes its logits with the
    wider model's softmax scale 1/sqrt(d_head); merging multiplies its Q by sqrt(d_base / d_target)
    so that its logits stay what they were.
    """
    groups: tuple
    head_units: tuple
    queries: tuple = ()

    def heads(self, sizes) -> int:
        """Number of heads, from the first group's size in `sizes` (group -> units)."""
        return sizes[self.groups[0]] // self.head_units[0]


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
    rms_norms: keys of RMSNorm gains (statistic: root mean square over their group). A target gain
                                            zero-padded into a wider base is multiplied by
                                            sqrt(n_target / n_base) on merging, so that the mean
                                            over the extra zeros leaves the normalized output as it
                                            was (exact up to the norm's eps)
    ties: name -> Tie                       attention heads: groups whose maps move whole heads, one
                                            head map for the tie (see Tie)
    views: key -> (n, d)                    tensors seen through a 2-D view: a parameter holding
                                            units on its last axis past axis 1 (a cls token
                                            [1, 1, d], a position embedding [1, n, d]) is read as
                                            [n, d]; its groups, blocks and sizes refer to the view,
                                            and every reader of paired tensors goes through
                                            ``view`` (merged tensors are stored back in the
                                            tensor's own shape)
    """
    groups: dict[str, list[tuple[str, int]]]
    blocks: dict[tuple[str, int], int]
    sizes: dict[str, int]
    fixed: frozenset
    layers: list[Layer]
    probes: dict[str, tuple[str, str]] = field(default_factory=dict)
    segments: dict[tuple[str, int], tuple] = field(default_factory=dict)
    rms_norms: frozenset = frozenset()
    ties: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)

    def view(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Tensor `t` stored under `key` as the spec sees it (its 2-D view, when it has one)."""
        v = self.views.get(key)
        if v is None:
            return t
        if t.numel() != v[0] * v[1]:
            raise SpecError(f"spec: {key!r} has shape {tuple(t.shape)}, which cannot be seen as its "
                            f"view {tuple(v)}")
        return t.reshape(v)

    def viewed_state(self, model) -> dict[str, torch.Tensor]:
        """A module's (or state dict's) tensors as the spec sees them (``view`` of each)."""
        return {k: self.view(k, v) for k, v in state_dict_of(model).items()}

    def axis_groups(self, key: str, ndim: int) -> tuple[str, ...]:
        """Group of each of the first min(ndim, 2) axes of `key`; unlisted axes get a fixed
        pseudo-group named "key:axis" (paired by position). An axis made of segments of several
        groups has no single group: SpecError (see axis_parts)."""
        return tuple(self.axis_group(key, ax) for ax in range(min(ndim, 2)))

    def axis_group(self, key: str, axis: int) -> str:
        """Group of one axis (see axis_groups)."""
        if (key, axis) in self.segments:
            parts = [g for g, _, _ in self.segments[(key, axis)]]
            raise SpecError(f"spec: axis {axis} of {key!r} is a concatenation of groups {parts} "
                            "(torch.cat along the channels) and has no single group; use "
                            "axis_parts")
        return self._axis_to_group.get((key, axis), f"{key}:{axis}")

    def axis_parts(self, key: str, axis: int, size: int) -> tuple:
        """((group, units, block), ...) of one axis of `size` entries: the parts of a concatenation,
        or the axis's one group (a fixed "key:axis" pseudo-group when no group lists it)."""
        segs = self.segments.get((key, axis))
        if segs is not None:
            return tuple(segs)
        blk = self.block(key, axis)
        return ((self._axis_to_group.get((key, axis), f"{key}:{axis}"), size // blk, blk),)

    def axis_segments(self, key: str, axis: int) -> tuple | None:
        """((group, units, block), ...) when axis `axis` of `key` is a concatenation, else None."""
        return self.segments.get((key, axis))

    def axis_count(self, group: str) -> int:
        """Parameter axes that hold units of `group`: its own axes plus the parts of concatenated
        axes (a fused q|k|v's q and k parts each count once)."""
        return len(self.groups.get(group, ())) + sum(
            1 for segs in self.segments.values() for g, _, _ in segs if g == group)

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
        self.check_ties()

    def check_ties(self) -> None:
        """SpecError unless every tie names free groups, each in one tie, holding whole heads and
        the same number of heads."""
        seen: dict[str, str] = {}
        for name, tie in self.ties.items():
            if len(tie.groups) != len(tie.head_units) or not tie.groups:
                raise SpecError(f"spec: tie {name!r}: one head size per group, got groups {tie.groups} "
                                f"and head_units {tie.head_units}")
            heads = set()
            for g, hu in zip(tie.groups, tie.head_units):
                if g not in self.sizes:
                    raise SpecError(f"spec: tie {name!r}: group {g!r} is not a free group of the spec")
                if g in seen:
                    raise SpecError(f"spec: group {g!r} is in ties {seen[g]!r} and {name!r}")
                seen[g] = name
                if hu < 1 or self.sizes[g] % hu:
                    raise SpecError(f"spec: tie {name!r}: group {g!r} has {self.sizes[g]} units, not a "
                                    f"multiple of {hu} units per head")
                heads.add(self.sizes[g] // hu)
            if len(heads) != 1:
                raise SpecError(f"spec: tie {name!r}: its groups hold different numbers of heads "
                                f"{dict(zip(tie.groups, [self.sizes[g] // hu for g, hu in zip(tie.groups, tie.head_units)]))}")

    def tie_of(self, group: str) -> tuple[str, int] | None:
        """(tie name, position in the tie) of a group, or None."""
        for name, tie in self.ties.items():
            if group in tie.groups:
                return name, tie.groups.index(group)
        return None

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
                    layers: Sequence[Layer] | None = None,
                    ties: Mapping[str, Tie] | None = None,
                    views: Mapping[str, Sequence[int]] | None = None) -> "PermSpec":
        """Validate a hand-written spec: group -> [(key, axis) or (key, axis, block)].
        ties: {name: Tie} for attention heads (see Tie). views: {key: (n, d)} tensors seen as 2-D
        (see PermSpec.views); their entries name axes of the view.

        Every axis of a group must hold the same number of units (axis size / block) in this model;
        only axes 0 and 1 can be permuted. Layers default to the state dict's modules in order, a
        module with only 1-D tensors (a norm) being attached to the layer before it.
        """
        sd = state_dict_of(model)
        views = {k: tuple(int(n) for n in v) for k, v in (views or {}).items()}
        for k, v in views.items():
            if k not in sd:
                raise SpecError(f"spec: view of {k!r}: not in the model's state dict")
            if len(v) != 2 or v[0] * v[1] != sd[k].numel():
                raise SpecError(f"spec: view {v} of {k!r} {tuple(sd[k].shape)} is not a 2-D shape of "
                                "its entries")
            sd[k] = sd[k].reshape(v)
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
                   list(layers), ties=dict(ties or {}), views=views)


def state_dict_of(model) -> dict[str, torch.Tensor]:
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
