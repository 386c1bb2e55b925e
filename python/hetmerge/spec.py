"""Permutation graph of a model and the pairing of two graphs (base ↔ target).

A *group* is a set of parameter axes (key, axis) that hold the same hidden units and therefore must be
permuted together: a Linear/Conv output axis, the next layer's input axis, the bias, BatchNorm/LayerNorm
parameters and running statistics; residual additions join the groups they add. Model input and output
axes form *fixed* groups (never permuted). After a flatten of a conv output, the next Linear's input
axis holds ``size(group) · block`` entries with block = H·W (unit-major), which ``ops.cost_matrix(block=)``
and the block-expanded index maps cover.

``trace_spec`` derives the graph with torch.fx; ``PermSpec.from_groups`` accepts a hand-written one.
``pair_specs`` pairs a base graph with a target graph through a layer map and yields the *links* (one
index map each, base size, -1 = padding) that ``align`` solves and ``merge``/``sweep`` apply.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SpecError", "Layer", "PermSpec", "trace_spec", "as_spec", "Link", "PairedParam",
           "Pairing", "pair_specs", "expand_map", "position_map", "permute_state"]


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
    """
    groups: dict[str, list[tuple[str, int]]]
    blocks: dict[tuple[str, int], int]
    sizes: dict[str, int]
    fixed: frozenset
    layers: list[Layer]
    probes: dict[str, tuple[str, str]] = field(default_factory=dict)

    def axis_groups(self, key: str, ndim: int) -> tuple[str, ...]:
        """Group of each of the first min(ndim, 2) axes of `key`; unlisted axes get a fixed
        pseudo-group named "key:axis" (paired by position)."""
        out = []
        for ax in range(min(ndim, 2)):
            out.append(self._axis_to_group.get((key, ax), f"{key}:{ax}"))
        return tuple(out)

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
            _attach_norm(layers[-1][1], params)
    return [Layer(n, p) for n, p in layers]


def _attach_norm(params: dict, norm_params: Mapping[str, str]):
    i = 0
    while any(r.startswith(f"norm{i or ''}.") for r in params):
        i += 1
    for local, key in norm_params.items():
        params[f"norm{i or ''}.{local}"] = key


def as_spec(model: nn.Module, spec=None, example_input=None) -> PermSpec:
    """`spec` as given (PermSpec), validated from a hand-written dict, or traced from `model`."""
    if spec is None:
        return trace_spec(model, example_input)
    if isinstance(spec, PermSpec):
        return spec
    if isinstance(spec, Mapping):
        if "groups" in spec:
            return PermSpec.from_groups(model, spec["groups"], spec.get("fixed", ()), spec.get("layers"))
        return PermSpec.from_groups(model, spec)
    raise TypeError(f"spec: expected a PermSpec, a dict group -> [(key, axis)], or None; got {type(spec)}")


# ---------------------------------------------------------------------------------------------
# torch.fx tracing
# ---------------------------------------------------------------------------------------------

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU,
    nn.LeakyReLU, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink,
    nn.Softsign, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.softplus,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.relu, torch.tanh, torch.sigmoid, torch.abs, torch.neg, F.tanh, F.sigmoid, operator.neg,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "abs", "neg", "contiguous", "clone", "detach",
                        "float", "to", "type_as", "relu_", "sigmoid_", "tanh_"}
_JOIN = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, "add", "sub",
         "mul", "add_", "mul_", operator.iadd, operator.imul}
_FLATTEN = {torch.flatten, "flatten"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


@dataclass
class _Val:
    group: int                 # union-find id of the feature axis (dim 1, or the last dim of [N, F])
    flat: bool = False         # spatial dims were flattened into the feature axis
    layer: int | None = None   # index of the layer that produced it (norms attach there)


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.names: list[str] = []
        self.fixed: list[bool] = []

    def new(self, name: str, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.names.append(name)
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> int:
        i, j = self.find(i), self.find(j)
        if i == j:
            return i
        # a fixed group (model input/output) names the union, otherwise the shallowest one
        lo, hi = min(i, j), max(i, j)
        if self.fixed[hi] and not self.fixed[lo]:
            self.names[lo] = self.names[hi]
        self.parent[hi] = lo
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]
        return lo


def _node_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0]) or "<root>"
    return "<root>"


def _fail(node: fx.Node, why: str):
    tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    raise SpecError(f"trace_spec: cannot follow node {node.name!r} ({node.op} {tgt}) in module "
                    f"{_node_path(node)!r}: {why}; pass a hand-written spec "
                    "(group -> [(parameter, axis)]) instead")


def trace_spec(model: nn.Module, example_input: Any = None) -> PermSpec:
    """Permutation graph of `model`, derived with torch.fx.

    Follows Linear, Conv1d/2d/3d, BatchNorm, LayerNorm (last dim), elementwise activations, dropout,
    pooling, flatten/view(N, -1) and residual additions. `example_input`, when given, is run through the
    model to check that it traces (shapes are otherwise read from the parameters).
    Raises SpecError naming the node and module path for anything else.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_spec: model must be a torch.nn.Module, got {type(model)}")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:   # data-dependent control flow and the like
        raise SpecError(f"trace_spec: torch.fx could not trace {type(model).__name__}: {e}; "
                        "pass a hand-written spec (group -> [(parameter, axis)]) instead") from e
    if example_input is not None:
        with torch.no_grad():
            gm(example_input) if not isinstance(example_input, tuple) else gm(*example_input)

    modules = dict(model.named_modules())
    uf = _UnionFind()
    vals: dict[fx.Node, _Val | None] = {}
    entries: list[tuple[str, int, int, Any]] = []   # (key, axis, uf id, block: int or ("flat", n_in))
    layers: list[list] = []                           # [name, {role: key}]
    layer_out: dict[str, tuple[int, int]] = {}        # shared modules: path -> (in id, out id)
    probes: dict[int, tuple[str, str]] = {}
    n_inputs = 0

    def tensor_args(node):
        # every tensor the node reads, nested lists (torch.cat([a, b])) and kwargs included
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        return [vals[a] for a in found if vals.get(a) is not None]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            vals[node] = _Val(uf.new("input" if n_inputs == 0 else f"input{n_inputs}", fixed=True))
            n_inputs += 1
        elif node.op == "get_attr":
            _fail(node, "parameters used outside their module")
        elif node.op == "output":
            outs = node.args[0]
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            for i, o in enumerate(outs):
                if isinstance(o, fx.Node) and vals.get(o) is not None:
                    uf.union(vals[o].group, uf.new("output" if i == 0 else f"output{i}", fixed=True))
        elif node.op == "call_module":
            mod = modules[node.target]
            path = str(node.target)
            args = tensor_args(node)
            if len(args) != 1:
                _fail(node, f"{type(mod).__name__} with {len(args)} tensor inputs")
            x = args[0]
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                is_conv = not isinstance(mod, nn.Linear)
                if is_conv and (mod.groups != 1 or x.flat):
                    _fail(node, "grouped convolution" if mod.groups != 1 else "convolution after flatten")
                if path in layer_out:   # the same module called again: its axes stay one group each
                    gin, gout = layer_out[path]
                    uf.union(gin, x.group)
                    vals[node] = _Val(gout, False, next(i for i, l in enumerate(layers) if l[0] == path))
                    continue
                gout = uf.new(path)
                w = f"{path}.weight" if path else "weight"
                n_in = mod.weight.shape[1]
                entries.append((w, 0, gout, 1))
                entries.append((w, 1, x.group, ("flat", n_in) if x.flat else 1))
                params = {"weight": w}
                if mod.bias is not None:
                    params["bias"] = f"{path}.bias" if path else "bias"
                    entries.append((params["bias"], 0, gout, 1))
                layers.append([path, params])
                layer_out[path] = (x.group, gout)
                probes.setdefault(x.group, (path, "conv" if is_conv else ("flat" if x.flat else "linear")))
                vals[node] = _Val(gout, False, len(layers) - 1)
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
                if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
                    _fail(node, f"LayerNorm over {tuple(mod.normalized_shape)} (only the last dim can be "
                                "permuted)")
                if x.flat and isinstance(mod, nn.BatchNorm1d):
                    _fail(node, "BatchNorm after flatten")
                norm = {local: (f"{path}.{local}" if path else local)
                        for local, t in mod.state_dict(keep_vars=True).items()
                        if t.is_floating_point()}
                for key in norm.values():
                    entries.append((key, 0, x.group, 1))
                if x.layer is None:
                    layers.append([path, {f"norm.{k}": v for k, v in norm.items()}])
                    vals[node] = _Val(x.group, x.flat, len(layers) - 1)
                else:
                    _attach_norm(layers[x.layer][1], norm)
                    vals[node] = x
            elif isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU)
                                                           and mod.num_parameters == 1):
                vals[node] = x
            elif isinstance(mod, _POOL_MODULES):
                if x.flat:
                    _fail(node, "pooling after flatten")
                vals[node] = x
            elif isinstance(mod, nn.Flatten):
                if mod.start_dim != 1:
                    _fail(node, f"Flatten(start_dim={mod.start_dim}) (only start_dim=1 keeps units whole)")
                vals[node] = _Val(x.group, True, x.layer)
            else:
                _fail(node, f"module type {type(mod).__name__} is not supported (attention heads, "
                            "embeddings and custom modules need a hand-written spec)")
        elif node.op in ("call_function", "call_method"):
            tgt = node.target
            args = tensor_args(node)
            first = node.args[0] if node.args else None
            first_val = vals.get(first) if isinstance(first, fx.Node) else None
            if tgt in ("size", "dim") or tgt is getattr or (tgt is operator.getitem and first_val is None):
                vals[node] = None   # shapes and other non-tensor values
            elif not args:
                vals[node] = None   # arithmetic on sizes / constants
            elif tgt in _JOIN:
                g = args[0].group
                for a in args[1:]:
                    g = uf.union(g, a.group)
                if any(a.flat != args[0].flat for a in args):
                    _fail(node, "adds a flattened tensor to an unflattened one")
                vals[node] = _Val(g, args[0].flat, args[0].layer)
            elif tgt in _ELEMENTWISE_FUNCS or tgt in _ELEMENTWISE_METHODS:
                if first_val is None:
                    _fail(node, "elementwise op whose first argument is not the feature tensor")
                vals[node] = first_val
            elif tgt in _FLATTEN:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                if start != 1 or first_val is None:
                    _fail(node, f"flatten(start_dim={start}) (only start_dim=1 keeps units whole)")
                vals[node] = _Val(first_val.group, True, first_val.layer)
            elif tgt in ("view", "reshape") or tgt is torch.reshape:
                shape = node.args[1:] if tgt != torch.reshape else node.args[1]
                if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                    shape = shape[0]
                batch_first = len(shape) == 2 and shape[1] == -1 and (
                    isinstance(shape[0], fx.Node) or shape[0] == -1)
                if first_val is None or not batch_first:
                    _fail(node, f"{tgt}{tuple(shape)} (only view/reshape(batch, -1) can be followed)")
                vals[node] = _Val(first_val.group, True, first_val.layer)
            elif tgt in _REDUCE_METHODS or tgt in (torch.mean, torch.sum, torch.amax):
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                dims = (dims,) if isinstance(dims, int) else dims
                if first_val is None or first_val.flat or not dims or any(d in (0, 1, -1) for d in dims):
                    _fail(node, f"{tgt} over dims {dims} (only spatial dims >= 2 can be reduced)")
                vals[node] = first_val
            else:
                _fail(node, "operation not supported (concatenation, attention, indexing, ...)")
        else:
            _fail(node, f"op {node.op}")

    # resolve the union-find into named groups
    root_name = {}
    groups: dict[str, list[tuple[str, int]]] = {}
    blocks: dict[tuple[str, int], int] = {}
    sizes: dict[str, int] = {}
    fixed = set()
    sd = dict(model.state_dict(keep_vars=True))
    # group sizes from the axes whose block is known (1)
    for key, ax, gid, blk in entries:
        r = uf.find(gid)
        name = root_name.setdefault(r, uf.names[r])
        if uf.fixed[r]:
            fixed.add(name)
        if blk == 1 and not uf.fixed[r]:
            n = sd[key].shape[ax]
            if sizes.setdefault(name, n) != n:
                raise SpecError(f"trace_spec: group {name!r} has {sizes[name]} units but "
                                f"{key!r}.shape[{ax}] = {n}")
    for key, ax, gid, blk in entries:
        r = uf.find(gid)
        name = root_name[r]
        if isinstance(blk, tuple):
            n_in = blk[1]
            if name in fixed:
                blk = 1   # fixed axes pair by position, whole
            elif name not in sizes or n_in % sizes[name]:
                raise SpecError(f"trace_spec: {key!r} takes {n_in} flattened inputs, not a multiple of "
                                f"the {sizes.get(name)} units of group {name!r}")
            else:
                blk = n_in // sizes[name]
        groups.setdefault(name, []).append((key, ax))
        if blk != 1:
            blocks[(key, ax)] = blk
    named_probes = {root_name[uf.find(g)]: p for g, p in probes.items() if uf.find(g) in root_name}
    for g in list(named_probes):
        if g in fixed:
            del named_probes[g]
    return PermSpec(groups, blocks, sizes, frozenset(fixed), [Layer(n, p) for n, p in layers],
                    named_probes)


# ---------------------------------------------------------------------------------------------
# index maps
# ---------------------------------------------------------------------------------------------

def position_map(n_a: int, n_b: int) -> torch.Tensor:
    """Pad/crop by position: base slot i takes target unit i (or padding when i >= n_b)."""
    m = torch.arange(n_a, dtype=torch.long)
    m[n_b:] = -1
    return m


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
    from . import ops
    out = {k: v.detach().clone() for k, v in state.items()}
    for key, t in state.items():
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() == 0:
            continue
        gs = spec.axis_groups(key, t.dim())
        maps = []
        for ax, g in enumerate(gs):
            if g in perms:
                maps.append(expand_map(torch.as_tensor(perms[g]), spec.block(key, ax)))
            else:
                maps.append(None)
        if all(m is None for m in maps):
            continue
        rows = maps[0] if maps[0] is not None else torch.arange(t.shape[0])
        cols = maps[1] if len(maps) > 1 else None
        out[key] = ops.permute_pad(t.detach(), rows, cols)
    return out


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
