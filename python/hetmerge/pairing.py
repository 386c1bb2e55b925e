"""Pairing of two permutation graphs (base ↔ target).

A layer map pairs base layers with target layers (default: shallow to shallow, within residual
stages; names before positions, "#N" for a position). Paired layers pair their parameters by role,
and every (base group, target group) they touch becomes a *link*: one index map to find (base size,
-1 = padding) that ``align`` solves and ``merge``/``sweep`` apply.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .heads import TieLink, fold_softmax_scales, pair_ties, tie_position_maps
from .maps import position_map
from .spec import LayerMapError, PermSpec, SpecError

__all__ = ["LayerMapError", "NothingToAlignError", "resolve_layer", "Link", "PairedParam", "Pairing",
           "pair_specs"]


class NothingToAlignError(SpecError):
    """No layer of the base pairs with a layer of the target: aligning or merging would silently
    return the base. The message lists both models' layers and why none paired."""



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
    scale: float = 1.0       # the target tensor's factor on merging (RMSNorm gains under padding)
    # per axis: () or, for an axis holding a concatenation (torch.cat along the channels, a fused
    # q|k|v projection), its parts in order as (link, n_a, n_b, block); links/blocks then hold the
    # first part's
    segments: tuple = ()
    # ((axis, start, length, factor), ...): target entries start:start+length of that axis are
    # multiplied by factor on merging (a padded head's Q: the softmax scale of the wider head)
    part_scales: tuple = ()
    # 2-D shapes the specs see the tensors as (PermSpec.views, maps.viewed; () = as stored)
    base_view: tuple = ()
    target_view: tuple = ()


@dataclass
class Pairing:
    layer_map: dict[str, str]            # base layer -> target layer
    links: dict[str, Link]
    params: list[PairedParam]
    cases: dict[str, str]                # base layer -> "same size" / "size-compatible" / "size-incompatible"
    base_layers: list[str] = field(default_factory=list)     # every layer, shallow to deep (per-layer λ
    target_layers: list[str] = field(default_factory=list)   # keys are resolved against them)
    ties: dict[str, TieLink] = field(default_factory=dict)   # attention heads (hetmerge.heads)

    def position_maps(self) -> dict[str, torch.Tensor]:
        """Unit i <- unit i (padding past the target's units); tied links head by head."""
        out = {n: position_map(l.n_a, l.n_b) for n, l in self.links.items()}
        for tie in self.ties.values():
            out.update(tie_position_maps(tie))
        return out

    def tie_of(self, link: str) -> TieLink | None:
        return next((t for t in self.ties.values() if link in t.links), None)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for c in self.cases.values():
            counts[c] = counts.get(c, 0) + 1
        pairs = ", ".join(f"{b}<-{t}" for b, t in list(self.layer_map.items())[:6])
        more = f", ... {len(self.layer_map) - 6} more" if len(self.layer_map) > 6 else ""
        solved = sum(1 for l in self.links.values() if l.free)
        return (f"Pairing({len(self.layer_map)} layers [{pairs}{more}], {len(self.links)} links "
                f"({solved} solved), {len(self.params)} paired tensors, "
                f"cases: {', '.join(f'{n} {c}' for c, n in sorted(counts.items())) or 'none'})")


def _layer_case(a: torch.Size, b: torch.Size) -> str:
    if tuple(a) == tuple(b):
        return "same size"
    if len(a) < 2:
        return "size-compatible"
    d0, d1 = a[0] - b[0], a[1] - b[1]
    return "size-incompatible" if d0 * d1 < 0 else "size-compatible"


def _numbered(layers: Sequence[str]) -> str:
    return ", ".join(f"#{i} {n}" for i, n in enumerate(layers)) or "(none)"


def resolve_layer(key, layers: Sequence[str], where: str = "layer_map", side: str = "base",
                  label: str | None = None) -> str:
    """The name of the layer that `key` designates among `layers` (one model's, shallow to deep).

    A name that exists is that layer, always: the layers of an nn.Sequential are named "0", "2", ...,
    and "2" (or the int 2) is the layer named 2, never the third layer. A position is written "#N"
    (0-based). Used for layer maps and per-layer λ alike, so both read keys the same way.
    Raises LayerMapError "{where}: {label}{key!r} ..." (label: "{side} layer " unless given) naming
    the valid names and positions.
    """
    what = f"{side} layer " if label is None else label
    if isinstance(key, bool) or not isinstance(key, (str, numbers.Integral)):
        raise LayerMapError(f"{where}: {what}{key!r} must be a layer name or '#N' (a position); "
                            f"layers of the {side}: {_numbered(layers)}")
    s = key.strip() if isinstance(key, str) else str(int(key))
    if s in layers:
        return s
    if s.startswith("#"):
        pos = s[1:].strip()
        if not pos.isdigit():
            raise LayerMapError(f"{where}: {what}{key!r}: a position is '#' and a number in "
                                f"0..{len(layers) - 1}; layers of the {side}: {_numbered(layers)}")
        if int(pos) >= len(layers):
            raise LayerMapError(f"{where}: {what}{key!r}: position {int(pos)} is out of range, the "
                                f"{side} has {len(layers)} layers: {_numbered(layers)}")
        return layers[int(pos)]
    hint = f" (a position is written '#{s}')" if s.isdigit() and int(s) < len(layers) else ""
    raise LayerMapError(f"{where}: {what}{key!r} is not a layer of the {side}{hint}; "
                        f"layers: {_numbered(layers)}")


def _in_order(base_layers, target_layers, base_kinds, target_kinds) -> dict[str, str]:
    # shallow to shallow, in order; a layer is paired with the next target layer of its kind
    # (a conv never with a Linear), so a deeper conv stack leaves its extra convs unpaired
    out, j = {}, 0
    for b, kb in zip(base_layers, base_kinds):
        k = j
        while k < len(target_layers) and target_kinds[k] != kb:
            k += 1
        if k < len(target_layers):
            out[b] = target_layers[k]
            j = k + 1
    return out


def _block_of(name: str) -> tuple[str, int] | None:
    """(stage, block index) of a layer inside a repeated block, from its module path: the innermost
    numeric component that more path follows (layer1.0.conv1 -> ("layer1", 0); stages.1.blocks.0.conv
    -> ("stages.1.blocks", 0); blocks.2.0 -> ("blocks", 2)). A trailing number is a layer of an
    nn.Sequential, not a block; None outside blocks (stem, transitions, head)."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i]), int(parts[i])
    return None


def _stage_runs(layers: Sequence[str]) -> list[str]:
    """Stage names in order of appearance (one entry per run of consecutive block layers)."""
    runs: list[str] = []
    for n in layers:
        blk = _block_of(n)
        if blk is not None and (not runs or runs[-1] != blk[0]):
            runs.append(blk[0])
    return runs


def _segments(layers: Sequence[str], by_name: bool) -> dict:
    """{segment: [layer indices]}: ("stage", stage, block) for block layers, ("gap", stage before)
    for layers outside blocks, ("gap", "end") after the last stage (heads meet heads whatever the
    stage counts). A stage is its name (by_name) or its position among the runs."""
    segs: dict = {}
    runs = _stage_runs(layers)
    k, prev, last = -1, None, None
    for i, n in enumerate(layers):
        blk = _block_of(n)
        if blk is None:
            segs.setdefault(("gap", "end" if k == len(runs) - 1 and k >= 0 else prev), []).append(i)
            continue
        if blk[0] != last:
            k, last = k + 1, blk[0]
        prev = blk[0] if by_name else k
        segs.setdefault(("stage", prev, blk[1]), []).append(i)
    return segs


def _default_layer_map(base_layers, target_layers, base_kinds, target_kinds) -> dict[str, str]:
    """Shallow to shallow. Residual nets (layers inside numbered blocks of stages) pair within
    stages: block i of stage s with block i of stage s, layer by layer in order, and the layers
    outside blocks (stem, transitions, head) with those at the same place; a deeper stage's extra
    blocks stay unpaired instead of spilling into the next stage (which in-order pairing does:
    resnet18's layer2.0 would meet resnet34's layer1.2). Stages pair by name when the models share
    stage names (layer1 with layer1), else by order. Without stages on both sides: in order."""
    bruns, truns = _stage_runs(base_layers), _stage_runs(target_layers)
    if not bruns or not truns:
        return _in_order(base_layers, target_layers, base_kinds, target_kinds)
    by_name = bool(set(bruns) & set(truns))
    bsegs, tsegs = _segments(base_layers, by_name), _segments(target_layers, by_name)
    out = {}
    for seg, bi in bsegs.items():
        ti = tsegs.get(seg)
        if ti is None:
            continue
        out.update(_in_order([base_layers[i] for i in bi], [target_layers[i] for i in ti],
                             [base_kinds[i] for i in bi], [target_kinds[i] for i in ti]))
    order = {n: i for i, n in enumerate(base_layers)}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def _resolve_layer_map(layer_map, base_layers: list[str], target_layers: list[str],
                       base_kinds=None, target_kinds=None) -> dict[str, str]:
    if layer_map is None:
        return _default_layer_map(base_layers, target_layers, base_kinds or [None] * len(base_layers),
                                  target_kinds or [None] * len(target_layers))
    items = list(layer_map.items() if isinstance(layer_map, Mapping) else layer_map)
    bad = [p for p in items if not isinstance(p, (tuple, list)) or len(p) != 2]
    if bad:
        raise LayerMapError(f"layer_map: expected {{base: target}} or (base, target) pairs, got {bad[0]!r}")
    out, given = {}, {}
    for b, t in items:
        bn = resolve_layer(b, base_layers, "layer_map", "base")
        tn = resolve_layer(t, target_layers, "layer_map", "target")
        if bn in out:   # "fc0" and "#0" are one layer: a dict would keep the last pair silently
            raise LayerMapError(f"layer_map: base layer {given[bn]!r} and {b!r} are both {bn!r}")
        out[bn], given[bn] = tn, b
    return out


def _kind_text(k) -> str:
    if k is None:
        return "no weight"
    dim, kernel, head, block = k
    s = "Linear" if dim == 2 else f"Conv{dim - 2}d {'x'.join(map(str, kernel))}"
    if block > 1:
        s += f" reading a flatten ({block} entries per unit)"
    return s + (" writing the output (head)" if head else " (hidden)")


def _nothing_to_align(layer_map, bl, tl, bkinds, tkinds, heads_dropped) -> NothingToAlignError:
    if layer_map is not None:
        why = "the layer map is empty"
    elif heads_dropped:
        why = (f"only the output layers are of one kind, and they pair only when every hidden layer of "
               f"both models is paired (hidden layers: base {heads_dropped[0]}, target {heads_dropped[1]}, "
               f"paired {heads_dropped[2]})")
    else:
        why = ("no base layer has the kind of a target layer (layer type and kernel size, hidden or "
               "head, and entries per unit after a flatten must all agree)")
    lines = "; ".join([f"{side} layers: " + (", ".join(f"{n} [{_kind_text(k)}]" for n, k in zip(ls, ks))
                                              or "(none)")
                       for side, ls, ks in (("base", bl, bkinds), ("target", tl, tkinds))])
    return NothingToAlignError(f"pair_specs: nothing to align: no layer of the base pairs with a layer "
                               f"of the target, {why}. {lines}. Merging would return the base unchanged; "
                               f"pair layers by hand with layer_map, or merge models that share layers")


def pair_specs(base: nn.Module, target: nn.Module, base_spec: PermSpec, target_spec: PermSpec,
               layer_map=None) -> Pairing:
    """Pair the layers of two graphs and derive the links (index maps) to solve.

    layer_map: None (shallow to shallow, in order, each base layer with the next target layer of the
    same kind: Linear with Linear, conv with conv of the same kernel; residual nets pair within
    stages, block i of stage s with block i of stage s; the output layers with each other only when
    every hidden layer of both models is paired, so with different depths the extra hidden layers
    and the head keep the base's weights), or {base layer: target layer}, or a list of pairs. Keys are
    layer names; a name that exists is that layer, always (nn.Sequential's "0", "2", ...), and a
    position is written "#N" (see resolve_layer). Base layers not in the map keep their weights.
    Pairing a deeper target layer into a shallower base layer by hand is allowed but warned about
    (the paper found it harmful). Parameters pair by role within a layer pair (weight, bias,
    norm.*); roles only one side has are left alone.
    Raises LayerMapError for a key that names no layer, NothingToAlignError when no layer pairs.
    """
    sa, sb = base_spec.viewed_state(base), target_spec.viewed_state(target)   # cls token [1, d], ...
    bl = [l.name for l in base_spec.layers]
    tl = [l.name for l in target_spec.layers]
    def kind(layer, sd, spec):
        key = layer.params.get("weight", "")
        w = sd.get(key)
        if w is None:
            return None
        # A layer writing the model's output (fixed output axis) pairs only with the other model's
        # output layer: pairing a hidden layer with a head would map hidden units onto classes.
        writes_output = all(spec.is_fixed(g) for g, _, _ in spec.axis_parts(key, 0, w.shape[0]))
        in_block = spec.block(key, 1) if w.dim() > 1 else 1
        return (w.dim(), tuple(w.shape[2:]), writes_output, in_block)
    bkinds = [kind(l, sa, base_spec) for l in base_spec.layers]
    tkinds = [kind(l, sb, target_spec) for l in target_spec.layers]
    lmap = _resolve_layer_map(layer_map, bl, tl, bkinds, tkinds)
    heads_dropped = None
    if layer_map is None:
        # Heads are merged only when every hidden layer of both models is paired (the depths
        # match, per stage in residual nets): otherwise the base head reads features of a layer the
        # target does not have at that depth (selective shallow-to-shallow merging).
        hidden_b = [n for n, k in zip(bl, bkinds) if k and not k[2]]
        hidden_t = [n for n, k in zip(tl, tkinds) if k and not k[2]]
        paired = [b for b in hidden_b if b in lmap]
        if len(paired) < len(hidden_b) or len(paired) < len(hidden_t):
            kept = {b: t for b, t in lmap.items() if not (bkinds[bl.index(b)] or (0, 0, False))[2]}
            if len(kept) < len(lmap):
                heads_dropped = (len(hidden_b), len(hidden_t), len(paired))
            lmap = kept
    if not lmap:
        raise _nothing_to_align(layer_map, bl, tl, bkinds, tkinds, heads_dropped)

    def output_pair(b, t):  # head with head is not a deep-to-shallow merge, whatever the depths
        kb, kt = bkinds[bl.index(b)], tkinds[tl.index(t)]
        return bool(kb and kt and kb[2] and kt[2])
    # only a map the user wrote is warned about: the default pairs shallow to shallow (within
    # stages), and a later index on the deeper side is its choice, not a deep-to-shallow merge
    deep = [(b, t) for b, t in lmap.items() if tl.index(t) > bl.index(b) and not output_pair(b, t)]
    if deep and layer_map is not None:
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
            axes = []
            for ax in range(min(a.dim(), 2)):
                pa = base_spec.axis_parts(bkey, ax, a.shape[ax])
                pb = target_spec.axis_parts(tkey, ax, b.shape[ax])
                if len(pa) != len(pb):
                    raise SpecError(f"pair_specs: axis {ax} of {bkey!r} concatenates {len(pa)} part(s) but "
                                    f"that of {tkey!r} {len(pb)}; they cannot be paired")
                parts = []
                for (g_a, n_a, ba), (g_b, n_b, bb) in zip(pa, pb):
                    if ba != bb:
                        why = ("attention heads of different sizes that cannot be padded: their Q/K "
                               "move only as whole heads (rotary position embeddings, whose "
                               "frequencies depend on the head size, or a per-head norm)"
                               if base_spec.tie_of(g_a) else
                               "different spatial sizes before a flatten, or different head sizes")
                        raise SpecError(f"pair_specs: {bkey!r} axis {ax} holds {ba} entries per unit but "
                                        f"{tkey!r} holds {bb}: {why}")
                    parts.append((g_a, g_b, n_a, n_b, ba))
                axes.append(parts)
            raw.append((bkey, tkey, bname, axes))
            if role == "weight":
                cases[bname] = _layer_case(a.shape, b.shape)
        cases.setdefault(bname, "same size")

    # one link per (base group, target group); named after the base group unless it is paired twice
    partners: dict[str, set] = {}
    for _, _, _, axes in raw:
        for parts in axes:
            for g_a, g_b, *_ in parts:
                partners.setdefault(g_a, set()).add(g_b)
    links: dict[str, Link] = {}
    params = []
    for bkey, tkey, bname, axes in raw:
        names, blocks, segments = [], [], []
        for parts in axes:
            seg = []
            for g_a, g_b, n_a, n_b, blk in parts:
                name = g_a if len(partners[g_a]) == 1 else f"{g_a}<-{g_b}"
                link = Link(name, g_a, g_b, n_a, n_b,
                            free=not (base_spec.is_fixed(g_a) and target_spec.is_fixed(g_b)))
                old = links.setdefault(name, link)
                if (old.n_a, old.n_b) != (n_a, n_b):
                    raise SpecError(f"pair_specs: link {name!r} has sizes {old.n_a}<-{old.n_b} on one tensor "
                                    f"but {n_a}<-{n_b} on {bkey!r}/{tkey!r}")
                seg.append((name, n_a, n_b, blk))
            names.append(seg[0][0])
            blocks.append(seg[0][3])
            segments.append(tuple(seg) if len(seg) > 1 else ())
        scale = 1.0
        if bkey in base_spec.rms_norms and tkey in target_spec.rms_norms and axes[0][0][2] != axes[0][0][3]:
            # mean of squares over n_a units of which n_b are the target's: the padded target's
            # statistic shrinks by sqrt(n_b / n_a), and its gain does too to keep its outputs
            scale = math.sqrt(axes[0][0][3] / axes[0][0][2])
        params.append(PairedParam(bkey, tkey, bname, tuple(names), tuple(blocks), scale,
                                  tuple(segments) if any(segments) else (),
                                  base_view=tuple(base_spec.views.get(bkey, ())),
                                  target_view=tuple(target_spec.views.get(tkey, ()))))
    ties = pair_ties(base_spec, target_spec, links)
    if ties:
        params = fold_softmax_scales(params, ties, target_spec)
    return Pairing(lmap, links, params, cases, bl, tl, ties)

