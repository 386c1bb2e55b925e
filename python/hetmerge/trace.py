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

Anything without a handler raises SpecError naming the node, the module path and this remedy.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from .spec import Layer, PermSpec, SpecError, attach_norm

__all__ = ["Val", "Tracer", "register_handler", "handler_for", "trace_spec", "as_spec"]


@dataclass
class Val:
    """What the tracer knows about a tensor: which group its feature axis (dim 1, or the last dim
    of [N, F]) belongs to."""
    group: int                 # union-find id of the feature axis
    flat: bool = False         # spatial dims were flattened into the feature axis
    layer: int | None = None   # index of the layer that produced it (norms attach there)


Handler = Callable[["Tracer", fx.Node, Any], "Val | None"]
_MODULE_HANDLERS: dict[type, Handler] = {}
_CALL_HANDLERS: dict[Any, Handler] = {}


def register_handler(*kinds: Any) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of `kinds`.

    A kind is an ``nn.Module`` subclass (the handler is called as ``fn(tracer, node, module)`` for
    every call of such a module, subclasses included unless they have their own handler), a function
    such as ``torch.cat`` or ``operator.add`` (``fn(tracer, node, function)``), or a method name such
    as ``"permute"`` (``fn(tracer, node, name)``). The handler returns the output's ``Val``, or None
    for a value that carries no features (a shape, a constant). A later registration of the same
    kind replaces the earlier one.
    """
    if not kinds:
        raise TypeError("register_handler: name at least one module class, function or method name")

    for kind in kinds:
        if inspect.isclass(kind):
            if not issubclass(kind, nn.Module):
                raise TypeError(f"register_handler: class {kind.__name__} is not an nn.Module")
        elif not (isinstance(kind, str) or callable(kind)):
            raise TypeError(f"register_handler: {kind!r} is not a module class, function or method name")

    def deco(fn: Handler) -> Handler:
        for kind in kinds:
            table = _MODULE_HANDLERS if inspect.isclass(kind) else _CALL_HANDLERS
            table[kind] = fn
        return fn
    return deco


def handler_for(kind: Any) -> Handler | None:
    """The handler the tracer would use for a module instance, a module class, a function or a
    method name; None when there is none."""
    if isinstance(kind, nn.Module):
        kind = type(kind)
    if inspect.isclass(kind):
        for cls in kind.__mro__:
            if cls in _MODULE_HANDLERS:
                return _MODULE_HANDLERS[cls]
        return None
    try:
        return _CALL_HANDLERS.get(kind)
    except TypeError:   # an unhashable target
        return None


class _LeafTracer(fx.Tracer):
    """fx's tracer, except that a module with a registered handler is a leaf: the handler describes
    it whole, so a custom module is not traced into (where its parameters would be used outside it)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return handler_for(m) is not None or super().is_leaf_module(m, qualname)


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


def node_path(node: fx.Node) -> str:
    """Module path a node belongs to (its own target for call_module)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0]) or "<root>"
    return "<root>"


class Tracer:
    """State of one trace: the union-find of feature axes, the parameter axes recorded so far, the
    layers in order and the value of every node. Handlers call its methods."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model = model
        self.gm = gm
        self.modules = dict(model.named_modules())
        self.uf = _UnionFind()
        self.vals: dict[fx.Node, Val | None] = {}
        self.entries: list[tuple[str, int, int, Any]] = []   # (key, axis, uf id, block: 1 or ("flat", n))
        self.layers: list[list] = []                           # [name, {role: key}]
        self.layer_out: dict[str, tuple[int, int]] = {}        # shared modules: path -> (in id, out id)
        self.probes: dict[int, tuple[str, str]] = {}

    # -- reading the node ---------------------------------------------------------------------
    def inputs(self, node: fx.Node) -> list[Val]:
        """Values of every tensor the node reads, nested lists (torch.cat([a, b])) and kwargs included."""
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        return [self.vals[a] for a in found if self.vals.get(a) is not None]

    def value(self, arg: Any) -> Val | None:
        return self.vals.get(arg) if isinstance(arg, fx.Node) else None

    def single_input(self, node: fx.Node, module: nn.Module) -> Val:
        args = self.inputs(node)
        if len(args) != 1:
            self.fail(node, f"{type(module).__name__} with {len(args)} tensor inputs")
        return args[0]

    def fail(self, node: fx.Node, why: str):
        tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        raise SpecError(f"trace_spec: cannot follow node {node.name!r} ({node.op} {tgt}) in module "
                        f"{node_path(node)!r}: {why}; pass a hand-written spec "
                        "(group -> [(parameter, axis)]) instead, or register a handler for it "
                        "(hetmerge.register_handler)")

    # -- recording ----------------------------------------------------------------------------
    def new_group(self, name: str, fixed: bool = False) -> int:
        return self.uf.new(name, fixed)

    def join(self, *groups: int) -> int:
        g = groups[0]
        for other in groups[1:]:
            g = self.uf.union(g, other)
        return g

    def add_axis(self, key: str, axis: int, group: int, block: Any = 1) -> None:
        """Record that axis `axis` of parameter `key` holds the units of `group` (`block` entries
        each; ("flat", n_in) when only the total n_in is known)."""
        self.entries.append((key, axis, group, block))

    def add_layer(self, path: str, params: dict[str, str]) -> int:
        self.layers.append([path, params])
        return len(self.layers) - 1

    def layer_index(self, path: str) -> int:
        return next(i for i, layer in enumerate(self.layers) if layer[0] == path)

    @staticmethod
    def key(path: str, local: str) -> str:
        return f"{path}.{local}" if path else local

    # -- the common layer shapes, for handlers ------------------------------------------------
    def linear(self, node: fx.Node, module: nn.Module, x: Val, kind: str = "linear") -> Val:
        """A layer whose weight is [out, in, *kernel] and bias [out]: a new group on the output
        axis, the input's group on the input axis. A module called twice keeps one group per axis."""
        path = str(node.target)
        if path in self.layer_out:
            gin, gout = self.layer_out[path]
            self.join(gin, x.group)
            return Val(gout, False, self.layer_index(path))
        gout = self.new_group(path)
        w = self.key(path, "weight")
        n_in = module.weight.shape[1]
        self.add_axis(w, 0, gout)
        self.add_axis(w, 1, x.group, ("flat", n_in) if x.flat else 1)
        params = {"weight": w}
        if getattr(module, "bias", None) is not None:
            params["bias"] = self.key(path, "bias")
            self.add_axis(params["bias"], 0, gout)
        index = self.add_layer(path, params)
        self.layer_out[path] = (x.group, gout)
        self.probes.setdefault(x.group, (path, "flat" if x.flat and kind == "linear" else kind))
        return Val(gout, False, index)

    def norm(self, node: fx.Node, module: nn.Module, x: Val) -> Val:
        """Per-unit parameters and buffers on the input's feature axis, attached to the layer that
        produced the input (or a layer of their own when no layer did)."""
        path = str(node.target)
        params = {local: self.key(path, local)
                  for local, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()}
        for key in params.values():
            self.add_axis(key, 0, x.group)
        if x.layer is None:
            index = self.add_layer(path, {f"norm.{k}": v for k, v in params.items()})
            return Val(x.group, x.flat, index)
        attach_norm(self.layers[x.layer][1], params)
        return x

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> PermSpec:
        n_inputs = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.vals[node] = Val(self.new_group("input" if n_inputs == 0 else f"input{n_inputs}",
                                                     fixed=True))
                n_inputs += 1
            elif node.op == "get_attr":
                self.fail(node, "parameters used outside their module")
            elif node.op == "output":
                outs = node.args[0]
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                for i, o in enumerate(outs):
                    if self.value(o) is not None:
                        self.join(self.vals[o].group,
                                  self.new_group("output" if i == 0 else f"output{i}", fixed=True))
            elif node.op == "call_module":
                module = self.modules[node.target]
                handler = handler_for(module)
                if handler is None:
                    self.fail(node, f"module type {type(module).__name__} is not supported (attention "
                                    "heads, embeddings and custom modules need a hand-written spec)")
                self.vals[node] = handler(self, node, module)
            elif node.op in ("call_function", "call_method"):
                self.vals[node] = self._call(node)
            else:
                self.fail(node, f"op {node.op}")
        return self._spec()

    def _call(self, node: fx.Node) -> Val | None:
        import operator
        tgt = node.target
        first = self.value(node.args[0]) if node.args else None
        if tgt in ("size", "dim") or tgt is getattr or (tgt is operator.getitem and first is None):
            return None   # shapes and other non-tensor values
        if not self.inputs(node):
            return None   # arithmetic on sizes / constants
        handler = handler_for(tgt)
        if handler is None:
            self.fail(node, "operation not supported (concatenation, attention, indexing, ...)")
        return handler(self, node, tgt)

    def _spec(self) -> PermSpec:
        uf = self.uf
        root_name: dict[int, str] = {}
        groups: dict[str, list[tuple[str, int]]] = {}
        blocks: dict[tuple[str, int], int] = {}
        sizes: dict[str, int] = {}
        fixed = set()
        sd = dict(self.model.state_dict(keep_vars=True))
        # group sizes from the axes whose block is known (1)
        for key, ax, gid, blk in self.entries:
            r = uf.find(gid)
            name = root_name.setdefault(r, uf.names[r])
            if uf.fixed[r]:
                fixed.add(name)
            if blk == 1 and not uf.fixed[r]:
                n = sd[key].shape[ax]
                if sizes.setdefault(name, n) != n:
                    raise SpecError(f"trace_spec: group {name!r} has {sizes[name]} units but "
                                    f"{key!r}.shape[{ax}] = {n}")
        for key, ax, gid, blk in self.entries:
            name = root_name[uf.find(gid)]
            if isinstance(blk, tuple):
                n_in = blk[1]
                if name in fixed:
                    blk = 1   # fixed axes pair by position, whole
                elif name not in sizes or n_in % sizes[name]:
                    raise SpecError(f"trace_spec: {key!r} takes {n_in} flattened inputs, not a multiple "
                                    f"of the {sizes.get(name)} units of group {name!r}")
                else:
                    blk = n_in // sizes[name]
            groups.setdefault(name, []).append((key, ax))
            if blk != 1:
                blocks[(key, ax)] = blk
        probes = {root_name[uf.find(g)]: p for g, p in self.probes.items() if uf.find(g) in root_name}
        for g in list(probes):
            if g in fixed:
                del probes[g]
        return PermSpec(groups, blocks, sizes, frozenset(fixed), [Layer(n, p) for n, p in self.layers],
                        probes)


def trace_spec(model: nn.Module, example_input: Any = None) -> PermSpec:
    """Permutation graph of `model`, derived with torch.fx.

    Follows every kind that has a registered handler (built in: Linear, Conv1d/2d/3d, BatchNorm,
    LayerNorm (last dim), elementwise activations, dropout, pooling, flatten/view(N, -1) and residual
    additions). `example_input`, when given, is run through the model to check that it traces (shapes
    are otherwise read from the parameters). Raises SpecError naming the node and module path for
    anything else.
    """
    from . import handlers  # noqa: F401  (registers the built-in handlers)
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_spec: model must be a torch.nn.Module, got {type(model)}")
    try:
        tracer = _LeafTracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:   # data-dependent control flow and the like
        raise SpecError(f"trace_spec: torch.fx could not trace {type(model).__name__}: {e}; "
                        "pass a hand-written spec (group -> [(parameter, axis)]) instead") from e
    if example_input is not None:
        with torch.no_grad():
            gm(example_input) if not isinstance(example_input, tuple) else gm(*example_input)
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
