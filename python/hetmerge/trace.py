"""Derive a model's permutation graph (PermSpec) with torch.fx.

The tracer walks the fx graph once and looks every node's kind up in a registry of *handlers*: a
module class (matched through its MRO, nearest class first), a function (``call_function`` target)
or a method name (``call_method`` target). A handler reads the values of the node's tensor inputs
(which group their feature axis belongs to), records the parameter axes the node touches, and
returns the value of the node's output. The built-in handlers live in ``hetmerge.handlers``; a new
layer kind is one more handler::

    @hm.register_handler(MyGatedLinear)
    def _gated(tracer, node, module):
        x = tracer.single_input(node, module)
        return tracer.linear(node, module, x)

Parameters read outside their module (``get_attr`` nodes: ``F.linear(x, self.weight)``,
``self.gamma * x``) are followed to the op that consumes them; an op whose handler does not take
such a parameter fails rather than leave it unpermuted.

Anything without a handler raises SpecError naming the node, the module path and this remedy.

Why this module is long: the walk and the Tracer methods handlers call (recording axes, segments,
layouts, get_attr parameters) are one unit; every kind-specific rule lives in handlers/.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from .spec import Layer, PermSpec, SpecError, Tie, attach_norm

__all__ = ["Val", "Param", "Tracer", "register_handler", "handler_for", "trace_spec", "as_spec"]


@dataclass
class Val:
    """What the tracer knows about a tensor: which group its feature axis belongs to and where
    that axis is."""
    group: int                 # union-find id of the feature axis (or of a concatenation of groups)
    flat: bool = False         # spatial dims were flattened into the feature axis
    layer: int | None = None   # index of the layer that produced it (norms attach there)
    dim: int = 1               # feature axis: 1 (channels first; also [N, F]) or -1 (channels last)
    nd: int | None = None      # number of dims, when known (from a layer or from example_input)


@dataclass(frozen=True)
class Param:
    """A parameter read outside its module (a get_attr node), possibly reshaped on the way."""
    key: str | None             # state-dict key; None for a tensor attribute outside the state dict
    name: str                   # attribute path, for messages
    shape: tuple | None         # shape of this view; None when computed by an op the tracer cannot follow
    axes: tuple | None          # per dim of this view: the parameter axis it holds (None: a size-1 dim)


Handler = Callable[["Tracer", fx.Node, Any], "Val | None"]
_MODULE_HANDLERS: dict[type, Handler] = {}
_CALL_HANDLERS: dict[Any, Handler] = {}
# a value other than Val (a tensor split into attention heads) has tables of its own: an op that
# reads one is followed only by a handler written for it, never by one that expects a Val
_VALUE_HANDLERS: dict[type, tuple[dict[type, Handler], dict[Any, Handler]]] = {}


def _tables(value: type | None) -> tuple[dict[type, Handler], dict[Any, Handler]]:
    if value is None or value is Val:
        return _MODULE_HANDLERS, _CALL_HANDLERS
    return _VALUE_HANDLERS.get(value, ({}, {}))


def register_handler(*kinds: Any, value: type | None = None) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of `kinds`.

    A kind is an ``nn.Module`` subclass (the handler is called as ``fn(tracer, node, module)`` for
    every call of such a module, subclasses included unless they have their own handler or their own
    ``forward``), a function
    such as ``torch.cat`` or ``operator.add`` (``fn(tracer, node, function)``), or a method name such
    as ``"permute"`` (``fn(tracer, node, name)``). The handler returns the output's ``Val``, or None
    for a value that carries no features (a shape, a constant). A later registration of the same
    kind replaces the earlier one.

    `value`: a class of values other than ``Val`` that handlers may return (handlers/heads.py's
    per-head attention tensors); the handler is then used for nodes that read such a value, and a
    node that reads one with no handler registered for its kind and that value class fails.
    """
    if not kinds:
        raise TypeError("register_handler: name at least one module class, function or method name")
    if value is not None and not inspect.isclass(value):
        raise TypeError(f"register_handler: value={value!r} is not a class")

    for kind in kinds:
        if inspect.isclass(kind):
            if not issubclass(kind, nn.Module):
                raise TypeError(f"register_handler: class {kind.__name__} is not an nn.Module")
        elif not (isinstance(kind, str) or callable(kind)):
            raise TypeError(f"register_handler: {kind!r} is not a module class, function or method name")

    def deco(fn: Handler) -> Handler:
        tables = _tables(None) if value is None else _VALUE_HANDLERS.setdefault(value, ({}, {}))
        for kind in kinds:
            tables[0 if inspect.isclass(kind) else 1][kind] = fn
        return fn
    return deco


def handler_for(kind: Any, value: type | None = None) -> Handler | None:
    """The handler the tracer would use for a module instance, a module class, a function or a
    method name (reading values of class `value`, default Val); None when there is none."""
    modules, calls = _tables(value)
    if isinstance(kind, nn.Module):
        kind = type(kind)
    if inspect.isclass(kind):
        for cls in kind.__mro__:
            if cls in modules:
                # a subclass with its own forward (timm's LayerNorm2d permutes around
                # F.layer_norm) is not described by its base's handler: fx traces into it instead
                return modules[cls] if kind.forward is cls.forward else None
        return None
    try:
        return calls.get(kind)
    except TypeError:   # an unhashable target
        return None


class _LeafTracer(fx.Tracer):
    """fx's tracer, except that a module with a registered handler is a leaf: the handler describes
    it whole, so a custom module is not traced into (where its parameters would be used outside it).
    Remembers the innermost module whose forward failed, so that the error can name it."""

    def __init__(self):
        super().__init__()
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return handler_for(m) is not None or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    path = self.path_of_module(m) or "<root>"
                except NameError:
                    path = "?"
                self.failed_in = (path, type(m).__name__)
            raise


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


def _what(kind: type) -> str:
    """How messages name a value class: its `what` ("a tensor split into attention heads")."""
    return getattr(kind, "what", f"{kind.__name__} values")


def node_path(node: fx.Node) -> str:
    """Module path a node belongs to (its own target for call_module)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0]) or "<root>"
    return "<root>"


def _layer_name(key: str) -> str:
    """Layer named after a functional layer's weight key: "blocks.0.fc.weight" -> "blocks.0.fc"."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


# ops on a parameter alone whose result keeps the parameter's entries in order (only size-1 dims
# added or removed, or values changed entry by entry), so a permutation of it is still an axis map
_PARAM_KEEPS_ORDER = {
    "view", "reshape", "unsqueeze", "squeeze", "flatten", "to", "float", "double", "half", "type_as",
    "contiguous", "clone", "detach", "neg", "exp", "sigmoid", "sqrt", "abs", "tanh", "relu", "mul", "add",
    "sub", "div", "pow", torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.exp,
    torch.sigmoid, torch.sqrt, torch.abs, torch.tanh, torch.relu, torch.neg, operator.getitem,
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.nn.functional.softplus,
}


class Tracer:
    """State of one trace: the union-find of feature axes, the parameter axes recorded so far, the
    layers in order and the value of every node. Handlers call its methods."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model = model
        self.gm = gm
        self.modules = dict(model.named_modules())
        self.sd = dict(model.state_dict(keep_vars=True))
        self.uf = _UnionFind()
        self.vals: dict[fx.Node, Val | None] = {}
        self.params: dict[fx.Node, Param] = {}                 # get_attr nodes and views of them
        self.taken: set[tuple[fx.Node, fx.Node]] = set()       # (consumer, parameter node) followed
        self.composite: dict[int, tuple[int, ...]] = {}        # concatenation id -> its parts' ids
        self.entries: list[tuple[str, int, int, Any]] = []   # (key, axis, uf id, block: 1 or ("flat", n))
        self.axis_entry: dict[tuple[str, int], int] = {}       # (key, axis) -> uf id it was recorded with
        self.in_layer: set[str] = set()                        # keys already in some layer
        self.layers: list[list] = []                           # [name, {role: key}]
        self.layer_out: dict[str, tuple[int, int, int, int]] = {}   # weight key -> (in id, out id, layer, dim)
        self.probes: dict[int, tuple[str, str]] = {}
        self.part_entries: list[tuple[str, int, list]] = []     # add_parts: fused axes
        self.input_groups: list[int] = []                      # groups of the model's inputs
        self.ties: list[tuple[str, list[tuple[int, int]]]] = []    # add_tie: attention heads
        self.unit_blocks: dict[int, int] = {}                  # coarsen: root -> recorded units per unit
        self.node: fx.Node | None = None                       # node being handled (for messages)
        self.views: dict[str, tuple[int, int]] = {}            # key -> 2-D view (param_axis)

    # -- reading the node ---------------------------------------------------------------------
    def inputs(self, node: fx.Node) -> list[Val]:
        """Values of every tensor the node reads, nested lists (torch.cat([a, b])) and kwargs included."""
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        return [self.vals[a] for a in found if self.vals.get(a) is not None]

    def value_kind(self, node: fx.Node) -> type | None:
        """The class of the non-Val values the node reads (elements of tuples included), whose
        handler tables decide how it is followed; None when it reads only Vals."""
        kinds = set()
        for v in self.inputs(node):
            for e in (v if isinstance(v, tuple) else (v,)):
                if e is not None and not isinstance(e, Val):
                    kinds.add(type(e))
        if len(kinds) > 1:
            self.fail(node, f"it combines values of kinds {sorted(k.__name__ for k in kinds)}")
        return kinds.pop() if kinds else None

    def value(self, arg: Any) -> Val | None:
        return self.vals.get(arg) if isinstance(arg, fx.Node) else None

    def single_input(self, node: fx.Node, module: nn.Module) -> Val:
        args = self.inputs(node)
        if len(args) != 1:
            self.fail(node, f"{type(module).__name__} with {len(args)} tensor inputs")
        return args[0]

    def arg(self, node: fx.Node, i: int, name: str, default: Any = None) -> Any:
        """Argument `i` (positional) or `name` (keyword) of a call."""
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def fail(self, node: fx.Node, why: str):
        tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        raise SpecError(f"trace_spec: cannot follow node {node.name!r} ({node.op} {tgt}) in module "
                        f"{node_path(node)!r}: {why}; pass a hand-written spec "
                        "(group -> [(parameter, axis)]) instead, or register a handler for it "
                        "(hetmerge.register_handler)")

    # -- where the feature axis is --------------------------------------------------------------
    def feature_index(self, node: fx.Node, x: Val, nd: int | None = None) -> int:
        """Index (>= 0) of x's feature axis in a tensor of `nd` dims (default x.nd)."""
        nd = nd if nd is not None else (2 if x.flat else x.nd)
        if x.dim == 1:
            return 1
        if nd is None:
            self.fail(node, "the rank of a channels-last tensor is unknown here (pass example_input)")
        return nd - 1

    def is_feature_dim(self, node: fx.Node, x: Val, d: int, nd: int | None = None) -> bool:
        """Whether dim `d` (possibly negative) of x is its feature axis."""
        nd = nd if nd is not None else (2 if x.flat else x.nd)
        if d >= 0 and x.dim == 1:
            return d == 1
        if d < 0 and x.dim == -1:
            return d == -1
        if nd is None:
            self.fail(node, f"cannot tell whether dim {d} is the channel axis: the tensor's rank is unknown "
                            "here (pass example_input)")
        return d % nd == self.feature_index(node, x, nd)

    def require_last(self, node: fx.Node, x: Val, what: str) -> None:
        """`what` acts on the last dim: fail when x's features are known to be elsewhere."""
        # the model's own input is never permuted: a sequence [B, T, F] read by a Linear is fine
        is_input = self.uf.find(x.group) in {self.uf.find(g) for g in self.input_groups}
        if x.dim == 1 and not x.flat and x.nd is not None and x.nd > 2 and not is_input:
            self.fail(node, f"{what} acts on the last dim of a {x.nd}-d tensor whose channels are dim 1 "
                            "(permute the channels last first)")

    def require_first(self, node: fx.Node, x: Val, what: str) -> None:
        if x.flat:
            self.fail(node, f"{what} after flatten")
        if x.dim == -1 and x.nd is not None and x.nd > 2:
            self.fail(node, f"{what} on a channels-last tensor (its channels must be dim 1)")

    # -- recording ----------------------------------------------------------------------------
    def new_group(self, name: str, fixed: bool = False) -> int:
        return self.uf.new(name, fixed)

    def join(self, *groups: int) -> int:
        """Units of these groups move together. A concatenation joins only fixed groups (which fixes
        each of its parts) or itself."""
        roots = list(dict.fromkeys(self.uf.find(g) for g in groups))
        comps = [r for r in roots if r in self.composite]
        if comps and len(roots) > 1:
            others = [r for r in roots if r not in self.composite]
            if len(comps) > 1 or not all(self.uf.fixed[o] for o in others):
                raise SpecError("trace_spec: cannot join a channel concatenation with another tensor's "
                                "channels (e.g. adding a concatenated tensor); "
                                + (f"at node {self.node.name!r} in module {node_path(self.node)!r}; "
                                   if self.node is not None else "")
                                + "pass a hand-written spec instead")
            for part in self.composite[comps[0]]:
                self.uf.union(part, others[0])
            return comps[0]
        # a fixed group never moves: what its units are does not matter
        fixed = any(self.uf.fixed[r] for r in roots)
        factors = {self.unit_blocks.get(r, 1) for r in roots}
        if len(factors) > 1 and not fixed:
            raise SpecError("trace_spec: cannot join groups whose units are whole attention heads with "
                            "groups whose units are single channels"
                            + (f" at node {self.node.name!r} in module {node_path(self.node)!r}"
                               if self.node is not None else "") + "; pass a hand-written spec instead")
        g = roots[0]
        for other in roots[1:]:
            g = self.uf.union(g, other)
        if factors != {1} and not fixed:
            self.unit_blocks[g] = factors.pop()
        return g

    def coarsen(self, group: int, block: int) -> None:
        """The units of `group` are runs of `block` consecutive units as recorded (whole attention
        heads of head_dim channels, when an op such as LayerNorm(head_dim) mixes the channels of a
        head): every axis of it, recorded before or after, holds `block` times the entries per unit
        it was recorded with, and a tie counts its units per head as recorded (spec.Tie)."""
        r = self.uf.find(group)
        if self.uf.fixed[r]:
            return
        old = self.unit_blocks.get(r, 1)
        if old not in (1, block):
            raise SpecError(f"trace_spec: group {self.uf.names[r]!r} has units of {old} channels and "
                            f"of {block}")
        self.unit_blocks[r] = block

    def name_group(self, group: int, name: str) -> None:
        """Name the group (unless it is fixed, whose name says so): "blocks.0.attn.qk"."""
        r = self.uf.find(group)
        if not self.uf.fixed[r]:
            self.uf.names[r] = name

    def split(self, group: int, parts: list[int]) -> None:
        """The units of `group` (a fused projection's output, read by nothing else) are the
        concatenation of the units of `parts`, in order (q | k | v): each axis recorded on it
        becomes a concatenated axis (spec.PermSpec.segments), and it can no longer be joined."""
        r = self.uf.find(group)
        if r in self.composite or self.uf.fixed[r]:
            raise SpecError(f"trace_spec: cannot split group {self.uf.names[r]!r} into parts"
                            + (f" at node {self.node.name!r} in module {node_path(self.node)!r}"
                               if self.node is not None else ""))
        self.composite[r] = tuple(parts)

    def add_axis(self, key: str, axis: int, group: int, block: Any = 1) -> None:
        """Record that axis `axis` of parameter `key` holds the units of `group` (`block` entries
        each; ("flat", n_in) when only the total n_in is known). An axis recorded twice (a module or
        parameter used twice) joins the two groups."""
        seen = self.axis_entry.get((key, axis))
        if seen is not None:
            self.join(seen, group)
            return
        self.axis_entry[(key, axis)] = group
        self.entries.append((key, axis, group, block))

    def add_parts(self, key: str, axis: int, parts: list[tuple[int, int]]) -> None:
        """Record that axis `axis` of `key` is a concatenation: (group, block) per part, in order
        (a fused q|k|v projection: three parts of one heads group). Each group's size must be
        known from another axis (a plain or blocked entry)."""
        self.part_entries.append((key, axis, list(parts)))

    def add_tie(self, name: str, groups: list[tuple[int, int]], queries=()) -> None:
        """Record that these groups hold attention heads: (group, units per head) each, e.g.
        [(qk, head_dim), (vo, head_dim)] (one head map for all, any permutation inside a head);
        a group whose units are whole heads (RoPE Q/K) has 1 unit per head. queries: (key, axis,
        part) of the Q tensors (spec.Tie)."""
        self.ties.append((name, list(groups), tuple(queries)))

    def add_layer(self, path: str, params: dict[str, str]) -> int:
        self.layers.append([path, params])
        self.in_layer.update(params.values())
        return len(self.layers) - 1

    def layer_index(self, path: str) -> int:
        return next(i for i, layer in enumerate(self.layers) if layer[0] == path)

    def attach(self, x: Val, path: str, params: dict[str, str]) -> int | None:
        """Per-unit parameters `params` (local name -> key) go with the layer that produced x (as
        norm.* roles), or form a layer `path` of their own when none did. Returns the layer index
        (None when there was nothing new to attach and no layer)."""
        params = {local: key for local, key in params.items() if key not in self.in_layer}
        if x.layer is None:
            if not params:
                return None
            return self.add_layer(path, {f"norm.{k}": v for k, v in params.items()})
        attach_norm(self.layers[x.layer][1], params)
        self.in_layer.update(params.values())
        return x.layer

    @staticmethod
    def key(path: str, local: str) -> str:
        return f"{path}.{local}" if path else local

    # -- parameters read outside their module ---------------------------------------------------
    def param_args(self, node: fx.Node) -> list[fx.Node]:
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        return [a for a in dict.fromkeys(found) if a in self.params]

    def take(self, node: fx.Node, arg: Any) -> Param | None:
        """The parameter `arg` (a get_attr node or a view of one) consumed by `node`; None when
        `arg` is not a parameter."""
        if not isinstance(arg, fx.Node) or arg not in self.params:
            return None
        self.taken.add((node, arg))
        return self.params[arg]

    def param_key(self, node: fx.Node, arg: Any, what: str, ndim: int | None = None) -> str | None:
        """State-dict key of a parameter passed whole to a functional layer (F.linear's weight, ...);
        None when `arg` is None."""
        if arg is None:
            return None
        p = self.take(node, arg)
        if p is None or p.key is None or p.shape is None or tuple(p.axes) != tuple(range(len(p.shape))):
            self.fail(node, f"its {what} is not a parameter of the model as stored (computed, reshaped or "
                            "not in the state dict), so its axes cannot be followed")
        return p.key

    def scale_param(self, node: fx.Node, arg: fx.Node, x: Val) -> None:
        """Parameter `arg` broadcast against x entry by entry (``gamma * x``): the parameter axis
        that meets x's feature axis holds x's units."""
        p = self.take(node, arg)
        if p.shape is None:
            self.fail(node, f"{p.name} is computed by an op the tracer does not follow before it meets "
                            "the features")
        nd = 2 if x.flat else x.nd
        after = 0 if (x.dim == -1 or nd == 2) else (None if nd is None else nd - 2)
        if after is None:
            if all(s == 1 for s in p.shape):
                return
            self.fail(node, f"cannot tell which axis of {p.name} {tuple(p.shape)} meets the channels: the "
                            "tensor's rank is unknown here (pass example_input)")
        d = len(p.shape) - 1 - after
        if d < 0 or p.shape[d] == 1:
            return   # constant along the channels
        a = p.axes[d]
        if p.key is None:
            self.fail(node, f"{p.name} scales the channels but is not in the state dict, so it cannot be "
                            "permuted with them")
        self.param_axis(node, p, a, x.group)
        self.attach(x, _layer_name(p.key), {p.key.rpartition(".")[2]: p.key})

    def param_axis(self, node: fx.Node, p: Param, a: int, group: int) -> None:
        """Axis `a` of parameter `p` (read outside its module) holds the units of `group`. A spec
        permutes axes 0 and 1 only: a parameter holding them on its last axis past axis 1, with
        size-1 dims before the next-to-last (timm's cls_token [1, 1, D], pos_embed [1, N+1, D]), is
        seen as the 2-D view [N+1, D] (spec.PermSpec.views) whose axis 1 joins the group."""
        if a <= 1:
            self.add_axis(p.key, a, group)
            return
        shape = tuple(self.sd[p.key].shape)
        if a != len(shape) - 1 or any(s != 1 for s in shape[:-2]):
            self.fail(node, f"{p.name} {shape} holds the channels on its axis {a}: only axes 0 and 1 "
                            "can be permuted, or the last axis of a parameter shaped [1, ..., 1, n, C] "
                            "(seen as [n, C]: a cls token or position embedding)")
        self.views[p.key] = (shape[-2], shape[-1])
        self.add_axis(p.key, 1, group)

    def _param_op(self, node: fx.Node) -> Param:
        """A parameter transformed on its own (``self.gamma.view(1, -1, 1, 1)``): follow the axes
        when the op keeps the entries in order, else mark it as not followable."""
        srcs = self.param_args(node)
        p = self.params[srcs[0]]
        opaque = Param(p.key, p.name, None, None)
        if node.target == "expand" and len(srcs) == 1 and node.args[0] is srcs[0] and p.shape is not None:
            return self._expanded(node, p, opaque)
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        if len(srcs) != 1 or len(found) != 1 or p.shape is None or node.target not in _PARAM_KEEPS_ORDER:
            return opaque
        if node.target is operator.getitem:
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if not all(i is None or i is Ellipsis or i == slice(None) for i in idx):
                return opaque   # indexing picks entries
        meta = torch.empty(p.shape, device="meta")
        sub = lambda a: meta if a is srcs[0] else a   # noqa: E731
        args = fx.node.map_arg(node.args, sub)
        kwargs = fx.node.map_arg(node.kwargs, sub)
        try:
            if node.op == "call_method":
                out = getattr(meta, node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        except Exception:
            return opaque
        if not torch.is_tensor(out):
            return opaque
        big_in = [(s, a) for s, a in zip(p.shape, p.axes) if s != 1]
        big_out = [i for i, s in enumerate(out.shape) if s != 1]
        if [s for s, _ in big_in] != [out.shape[i] for i in big_out]:
            return opaque
        axes = [None] * out.dim()
        for i, (_, a) in zip(big_out, big_in):
            axes[i] = a
        return Param(p.key, p.name, tuple(out.shape), tuple(axes))

    @staticmethod
    def _expanded(node: fx.Node, p: Param, opaque: Param) -> Param:
        """``self.cls_token.expand(B, -1, -1)``: size-1 dims repeated (sizes unknown here, e.g. the
        batch), every other dim kept: the entries of each repeat are the parameter's, in order, so
        the view keeps its shape with the repeated dims as size-1 dims."""
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if len(sizes) != len(p.shape):
            return opaque   # new leading dims: rare, not followed
        for s, n in zip(sizes, p.shape):
            if not (s == -1 or n == 1 or (isinstance(s, int) and s == n)):
                return opaque
        return p

    def _get_attr(self, node: fx.Node) -> Param:
        obj = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        key = str(node.target) if str(node.target) in self.sd else None
        shape = tuple(obj.shape) if torch.is_tensor(obj) else ()
        return Param(key, str(node.target), shape, tuple(range(len(shape))))

    # -- the common layer shapes, for handlers ------------------------------------------------
    def weighted(self, path: str, x: Val, weight: str, bias: str | None = None, kind: str = "linear",
                 probe: bool = True) -> Val:
        """A layer whose weight is [out, in, *kernel] and bias [out]: a new group on the output
        axis, the input's group on the input axis. A weight used twice keeps one group per axis.
        kind "linear" reads the last dim (output: channels last), "conv" dim 1."""
        out_dim = -1 if kind == "linear" else 1
        nd = 2 if x.flat else x.nd
        if weight in self.layer_out:
            gin, gout, index, _ = self.layer_out[weight]
            self.join(gin, x.group)
            return Val(gout, False, index, out_dim, nd)
        gout = self.new_group(path)
        n_in = self.sd[weight].shape[1]
        self.add_axis(weight, 0, gout)
        self.add_axis(weight, 1, x.group, ("flat", n_in) if x.flat else 1)
        params = {"weight": weight}
        if bias is not None:
            params["bias"] = bias
            self.add_axis(bias, 0, gout)
        index = self.add_layer(path, params)
        self.layer_out[weight] = (x.group, gout, index, out_dim)
        if probe:
            self.probes.setdefault(x.group, (path, "flat" if x.flat and kind == "linear" else kind))
        return Val(gout, False, index, out_dim, nd)

    def linear(self, node: fx.Node, module: nn.Module, x: Val, kind: str = "linear") -> Val:
        """``weighted`` for a module at node.target with `weight` and optional `bias`."""
        path = str(node.target)
        if kind == "linear":
            self.require_last(node, x, type(module).__name__)
        else:
            self.require_first(node, x, type(module).__name__)
        bias = self.key(path, "bias") if getattr(module, "bias", None) is not None else None
        return self.weighted(path, x, self.key(path, "weight"), bias, kind)

    def per_unit(self, path: str, x: Val, params: dict[str, str]) -> Val:
        """Per-unit parameters and buffers (local name -> key) on x's feature axis, attached to the
        layer that produced x (or a layer of their own when no layer did)."""
        for key in params.values():
            self.add_axis(key, 0, x.group)
        index = self.attach(x, path, params)
        return dataclasses.replace(x, layer=index) if x.layer is None else x

    def norm(self, node: fx.Node, module: nn.Module, x: Val) -> Val:
        """A norm module's floating-point parameters and buffers on the input's feature axis."""
        path = str(node.target)
        params = {local: self.key(path, local)
                  for local, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()}
        return self.per_unit(path, x, params)

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> PermSpec:
        n_inputs = 0
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.vals[node] = Val(self.new_group("input" if n_inputs == 0 else f"input{n_inputs}",
                                                     fixed=True))
                self.input_groups.append(self.vals[node].group)
                n_inputs += 1
            elif node.op == "get_attr":
                self.params[node] = self._get_attr(node)
                self.vals[node] = None
            elif node.op == "output":
                outs = node.args[0]
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                for i, o in enumerate(outs):
                    if self.value(o) is not None and not isinstance(self.value(o), Val):
                        self.fail(node, f"the model returns {_what(type(self.value(o)))}")
                    if self.value(o) is not None:
                        self.join(self.vals[o].group,
                                  self.new_group("output" if i == 0 else f"output{i}", fixed=True))
            elif node.op == "call_module":
                module = self.modules[node.target]
                kind = self.value_kind(node)
                handler = handler_for(module, kind)
                if handler is None and kind is not None:
                    self.fail(node, f"module type {type(module).__name__} is not followed on "
                                    f"{_what(kind)}")
                if handler is None:
                    self.fail(node, f"module type {type(module).__name__} is not supported (attention "
                                    "modules other than torch's, embeddings and custom modules need a "
                                    "hand-written spec)")
                self.vals[node] = handler(self, node, module)
                self._check_taken(node)
            elif node.op in ("call_function", "call_method"):
                self.vals[node] = self._call(node)
            else:
                self.fail(node, f"op {node.op}")
            self._note_rank(node)
        self.node = None
        return self._spec()

    def _note_rank(self, node: fx.Node) -> None:
        # ranks from example_input (ShapeProp) where the handlers could not tell
        val = self.vals.get(node)
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if isinstance(val, Val) and shape is not None and val.nd != len(shape):
            self.vals[node] = dataclasses.replace(val, nd=len(shape))

    def _check_taken(self, node: fx.Node) -> None:
        for p in self.param_args(node):
            if (node, p) not in self.taken:
                self.fail(node, f"it reads parameter {self.params[p].name!r}, which its handler does not "
                                "follow (parameters used outside their module)")

    def _call(self, node: fx.Node) -> Val | None:
        tgt = node.target
        first = self.value(node.args[0]) if node.args else None
        on_param = isinstance(node.args[0], fx.Node) and node.args[0] in self.params if node.args else False
        if tgt in ("size", "dim") or tgt is getattr or (tgt is operator.getitem and first is None
                                                         and not on_param):
            return None   # shapes and other non-tensor values
        if not self.inputs(node):
            if self.param_args(node):
                self.params[node] = self._param_op(node)
            return None   # arithmetic on sizes / constants / parameters alone
        kind = self.value_kind(node)
        handler = handler_for(tgt, kind)
        if handler is None and kind is not None:
            self.fail(node, f"this operation is not followed on {_what(kind)}")
        if handler is None:
            self.fail(node, "operation not supported (indexing, matrix products, ...)")
        out = handler(self, node, tgt)
        self._check_taken(node)
        return out

    def _spec(self) -> PermSpec:
        uf = self.uf
        root_name: dict[int, str] = {}
        groups: dict[str, list[tuple[str, int]]] = {}
        blocks: dict[tuple[str, int], int] = {}
        segments: dict[tuple[str, int], tuple] = {}
        sizes: dict[str, int] = {}
        units: dict[int, int] = {}        # every plain group's size, fixed ones included
        fixed = set()
        # a parameter seen through a 2-D view (param_axis) is measured in that view
        sd = {**self.sd, **{k: torch.empty(v, device="meta") for k, v in self.views.items()}}

        def name_of(r: int) -> str:
            name = root_name.setdefault(r, uf.names[r])
            if uf.fixed[r]:
                fixed.add(name)
            return name

        def factor(r: int) -> int:       # recorded units per unit (coarsen)
            return self.unit_blocks.get(r, 1)

        # group sizes from the axes whose block is known (1)
        for key, ax, gid, blk in self.entries:
            r = uf.find(gid)
            if r in self.composite:
                continue
            name = name_of(r)
            if isinstance(blk, int):
                if sd[key].shape[ax] % (blk * factor(r)):
                    raise SpecError(f"trace_spec: {key!r}.shape[{ax}] = {sd[key].shape[ax]} does not hold "
                                    f"whole units of {blk * factor(r)} entries (group {name!r})")
                n = sd[key].shape[ax] // (blk * factor(r))
                units.setdefault(r, n)
                if not uf.fixed[r] and sizes.setdefault(name, n) != n:
                    raise SpecError(f"trace_spec: group {name!r} has {sizes[name]} units but "
                                    f"{key!r}.shape[{ax}] = {n}")
        self._part_sizes(units, sizes, groups, name_of, factor)
        for key, ax, gid, blk in self.entries:
            r = uf.find(gid)
            if r in self.composite:
                parts = [uf.find(p) for p in self.composite[r]]
                if all(uf.fixed[p] for p in parts):
                    r, blk = parts[0], 1   # a concatenation of fixed groups is fixed, paired by position
                else:
                    segments[(key, ax)] = self._segments(key, ax, blk, parts, units, name_of, factor)
                    continue
            name = name_of(r)
            if isinstance(blk, tuple):
                n_in = blk[1]
                if name in fixed:
                    blk = 1   # fixed axes pair by position, whole
                elif name not in sizes or n_in % sizes[name]:
                    raise SpecError(f"trace_spec: {key!r} takes {n_in} flattened inputs, not a multiple "
                                    f"of the {sizes.get(name)} units of group {name!r}")
                else:
                    blk = n_in // sizes[name]
            else:
                blk *= factor(r)
            groups.setdefault(name, []).append((key, ax))
            if blk != 1:
                blocks[(key, ax)] = blk
        for key, ax, parts in self.part_entries:
            found = []
            for g, blk in parts:
                r = uf.find(g)
                if r not in units:
                    raise SpecError(f"trace_spec: {key!r} axis {ax}: a fused part's group {uf.names[r]!r} has no "
                                    "other parameter that tells its size")
                found.append((name_of(r), units[r], blk * factor(r)))
            if sum(n * b for _, n, b in found) != sd[key].shape[ax]:
                raise SpecError(f"trace_spec: {key!r}.shape[{ax}] = {sd[key].shape[ax]} is not the fused parts "
                                f"{[(g, n, b) for g, n, b in found]}")
            segments[(key, ax)] = tuple(found)
        probes = {root_name[uf.find(g)]: p for g, p in self.probes.items() if uf.find(g) in root_name}
        for g in list(probes):
            if g in fixed:
                del probes[g]
        return PermSpec(groups, blocks, sizes, frozenset(fixed), [Layer(n, p) for n, p in self.layers],
                        probes, segments, ties=self._ties(name_of, factor), views=dict(self.views))

    def _part_sizes(self, units: dict, sizes: dict, groups: dict, name_of, factor) -> None:
        """Sizes of groups that only fused axes hold (the "qk" of a packed q|k|v projection): an
        axis whose parts are all known but one group's tells that group's size (what remains)."""
        uf, sd = self.uf, self.sd
        fused = [(key, ax, [(uf.find(g), blk * factor(uf.find(g))) for g, blk in parts])
                 for key, ax, parts in self.part_entries]
        for key, ax, gid, blk in self.entries:
            r = uf.find(gid)
            if r in self.composite and isinstance(blk, int):
                fused.append((key, ax, [(uf.find(p), blk * factor(uf.find(p))) for p in self.composite[r]]))
        changed = True
        while changed:
            changed = False
            for key, ax, parts in fused:
                unknown = {r for r, _ in parts if r not in units}
                if len(unknown) != 1:
                    continue
                r = unknown.pop()
                rest = sd[key].shape[ax] - sum(units[q] * b for q, b in parts if q != r)
                per = sum(b for q, b in parts if q == r)
                if rest <= 0 or rest % per:
                    raise SpecError(f"trace_spec: {key!r}.shape[{ax}] = {sd[key].shape[ax]} leaves {rest} "
                                    f"entries for the parts of group {uf.names[r]!r}, not a multiple of their "
                                    f"{per} entries per unit")
                units[r] = rest // per
                name = name_of(r)
                if not uf.fixed[r]:
                    sizes[name] = units[r]
                    groups.setdefault(name, [])
                changed = True

    def _ties(self, name_of, factor) -> dict:
        ties: dict[str, Tie] = {}
        for name, members, queries in self.ties:
            roots = [self.uf.find(g) for g, _ in members]
            if any(self.uf.fixed[r] for r in roots):
                continue    # heads whose units reach a fixed axis cannot move (nothing to tie)
            head_units = []
            for r, (_, hu) in zip(roots, members):
                if hu % factor(r):
                    raise SpecError(f"trace_spec: tie {name!r}: group {self.uf.names[r]!r} has units of "
                                    f"{factor(r)} channels, which do not divide its {hu} channels per head")
                head_units.append(hu // factor(r))
            tie = Tie(tuple(name_of(r) for r in roots), tuple(head_units), queries)
            if tie in ties.values():
                continue    # the same heads reached twice
            unique, i = name, 1
            while unique in ties:   # two attentions in one module
                unique, i = f"{name}#{i}", i + 1
            ties[unique] = tie
        return ties

    def _segments(self, key: str, ax: int, blk: Any, parts: list[int], units: dict, name_of, factor) -> tuple:
        """(group, units, block) per part of a concatenated axis, checked against the tensor."""
        missing = [self.uf.names[p] for p in parts if p not in units]
        if missing:
            raise SpecError(f"trace_spec: {key!r} axis {ax} reads a concatenation whose part(s) {missing} "
                            "have no parameter that tells their size; pass a hand-written spec")
        total = sum(units[p] * factor(p) for p in parts)
        n = self.sd[key].shape[ax]
        block = n // total if isinstance(blk, tuple) else blk
        if n != total * block:
            raise SpecError(f"trace_spec: {key!r}.shape[{ax}] = {n} does not hold the concatenation of "
                            f"{[units[p] for p in parts]} units")
        return tuple((name_of(p), units[p], block * factor(p)) for p in parts)


def trace_spec(model: nn.Module, example_input: Any = None, concrete_args: dict | None = None) -> PermSpec:
    """Permutation graph of `model`, derived with torch.fx.

    Follows every kind that has a registered handler (built in: Linear, Conv1d/2d/3d (depthwise
    too; grouped convolutions fix their channels), BatchNorm, LayerNorm and GroupNorm, their
    functional forms with the module's own parameters (F.linear, F.conv2d, F.batch_norm,
    F.layer_norm), per-channel parameters scaling the features, elementwise activations, dropout,
    pooling, flatten/view(N, -1), channels-last permutes, channel concatenation, residual
    additions, torch's MultiheadAttention/TransformerEncoderLayer and hand-written attention: q/k/v
    split into heads, SDPA or softmax(q·kᵀ)·v, recorded as qk/vo groups tied by heads, see
    handlers/heads.py). `example_input`, when given, is run through the model (in eval mode, so running
    statistics are untouched) to check that it traces and to learn tensor ranks. `concrete_args`
    is passed to torch.fx (fix inputs that decide a branch). Raises SpecError naming the node and
    module path for anything else.
    """
    from . import handlers  # noqa: F401  (registers the built-in handlers)
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_spec: model must be a torch.nn.Module, got {type(model)}")
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:   # data-dependent control flow and the like
        path, cls = tracer.failed_in or ("<root>", type(model).__name__)
        raise SpecError(f"trace_spec: torch.fx could not trace {type(model).__name__}: module {path!r} "
                        f"({cls}) failed: {e}. Register a handler for {cls} (hetmerge.register_handler) so "
                        "it is traced as a leaf, pass concrete_args= to fix the inputs that decide a "
                        "branch, or pass a hand-written spec (group -> [(parameter, axis)]) instead") from e
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*args)
        finally:
            model.train(was)
    return Tracer(model, gm).run()


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
