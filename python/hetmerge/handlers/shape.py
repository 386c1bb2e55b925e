"""Kinds that change a tensor's shape but keep units whole: flatten/view(batch, -1), nn.Flatten,
and reductions over spatial dims. A view that splits the channels into attention heads hands over
to heads.py."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..trace import Val, register_handler
from .heads import split_heads


def _not_channels_last(tracer, node, x):
    if x.dim == -1 and x.nd is not None and x.nd > 2:
        tracer.fail(node, "flattens a channels-last tensor (its entries would not be grouped by unit)")


@register_handler(nn.Flatten)
def flatten_module(tracer, node, module):
    x = tracer.single_input(node, module)
    if module.start_dim != 1:
        tracer.fail(node, f"Flatten(start_dim={module.start_dim}) (only start_dim=1 keeps units whole)")
    _not_channels_last(tracer, node, x)
    return Val(x.group, True, x.layer, 1, 2)


@register_handler(torch.flatten, "flatten")
def flatten(tracer, node, target):
    """flatten(1) flattens the channels with the spatial dims (unit-major); a flatten of spatial
    dims only (a patch embedding's x.flatten(2): [B, C, H, W] -> [B, C, H·W]) keeps the channels
    where they are."""
    first = tracer.value(node.args[0]) if node.args else None
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if first is not None and isinstance(start, int) and isinstance(end, int) and start >= 2 \
            and first.dim == 1 and not first.flat and first.nd is not None:
        s, e = start % first.nd, end % first.nd
        if s <= e:
            return Val(first.group, False, first.layer, 1, first.nd - (e - s))
    if start != 1 or first is None or not (end == -1 or first.nd is not None and end % first.nd == first.nd - 1):
        tracer.fail(node, f"flatten(start_dim={start}, end_dim={end}) (only start_dim=1, or a flatten of "
                          "spatial dims after channels-first features of known rank, keeps units whole)")
    _not_channels_last(tracer, node, first)
    return Val(first.group, True, first.layer, 1, 2)


@register_handler("view", "reshape", torch.reshape)
def view(tracer, node, target):
    """view/reshape(batch, -1) flattens the channels with the spatial dims; view(batch, C or -1,
    1, ...) of an unflattened [N, C] adds size-1 dims after the channels (an SE gate)."""
    first = tracer.value(node.args[0]) if node.args else None
    shape = node.args[1:] if target is not torch.reshape else node.args[1]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    batch = len(shape) >= 2 and (isinstance(shape[0], fx.Node) or shape[0] == -1)
    if first is not None and batch and len(shape) == 2 and shape[1] == -1:
        _not_channels_last(tracer, node, first)
        return Val(first.group, True, first.layer, 1, 2)
    gate = (first is not None and batch and len(shape) > 2 and not first.flat
            and (first.nd == 2 or first.nd is None and first.dim == -1)
            and all(not isinstance(s, fx.Node) and s == 1 for s in shape[2:]))
    if gate:
        return Val(first.group, False, first.layer, 1, len(shape))
    heads = split_heads(tracer, node, first, shape) if first is not None else None
    if heads is not None:
        return heads
    tracer.fail(node, f"{target}{tuple(shape)} (only view/reshape(batch, -1), (batch, C, 1, ...) of a "
                      "[batch, C] tensor, or (*batch, [parts,] heads, head_dim) of channels-last "
                      "features can be followed)")


@register_handler("mean", "sum", "amax", "amin", "var", "std", torch.mean, torch.sum, torch.amax,
                  torch.amin, torch.var, torch.std)
def reduce(tracer, node, target):
    """A reduction over spatial dims keeps the channels. One over the channels (a LayerNorm written
    out: x.mean(1, keepdim=True)) is the same whatever their order: a value with no units (None)."""
    first = tracer.value(node.args[0]) if node.args else None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    keep = node.args[2] if len(node.args) > 2 and target not in ("var", "std", torch.var, torch.std) \
        else node.kwargs.get("keepdim", False)
    if first is None or not dims or not all(isinstance(d, int) for d in dims):
        tracer.fail(node, f"{target} over dims {dims} (only reductions over given dims can be followed)")
    nd = 2 if first.flat else first.nd
    on_features = [tracer.is_feature_dim(node, first, d, nd) for d in dims]
    if any(on_features):
        return None
    if any(d == 0 or nd is not None and d == -nd for d in dims):
        tracer.fail(node, f"{target} over the batch dim")
    if first.flat:
        tracer.fail(node, f"{target} over a flattened tensor's features")
    if keep or nd is None:
        return first if keep else Val(first.group, first.flat, first.layer, first.dim, None)
    return Val(first.group, False, first.layer, first.dim, nd - len(dims))


def index_features(tracer, node, x: Val, index) -> Val:
    """x[idx] of a feature tensor: indexing along other dims (timm's cls pooling x[:, 0], token
    slices x[:, 1:]) keeps every unit; the feature axis itself must be taken whole (``:`` or
    ``...``). The result's feature axis is where that dim lands."""
    idx = index if isinstance(index, tuple) else (index,)
    nd = 2 if x.flat else x.nd
    if nd is None:
        tracer.fail(node, "indexing of a tensor of unknown rank (pass example_input)")
    if x.flat:
        tracer.fail(node, "indexing of a flattened tensor")
    ok = lambda i: i is None or i is Ellipsis or isinstance(i, (int, slice)) and not any(  # noqa: E731
        isinstance(v, fx.Node) for v in ((i.start, i.stop, i.step) if isinstance(i, slice) else ()))
    if not all(ok(i) for i in idx) or sum(i is Ellipsis for i in idx) > 1:
        tracer.fail(node, f"indexing with {index!r} (only constant ints, slices, None and ... are followed)")
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if used > nd:
        tracer.fail(node, f"indexing {used} dims of a {nd}-d tensor")
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (nd - used) + idx[e + 1:]
    else:
        idx = idx + (slice(None),) * (nd - used)
    f = tracer.feature_index(node, x, nd)
    d, out_f, out_nd = 0, None, 0
    for i in idx:
        if i is None:
            out_nd += 1
            continue
        if d == f:
            if i != slice(None):
                tracer.fail(node, f"indexing {i!r} of the channel axis (dim {f}) would pick units")
            out_f = out_nd
        if d == 0 and i != slice(None):
            tracer.fail(node, "indexing of the batch dim")
        if not isinstance(i, int):
            out_nd += 1
        d += 1
    if out_f == out_nd - 1 and out_nd > 2:
        return Val(x.group, False, x.layer, -1, out_nd)
    if out_f == 1:
        return Val(x.group, False, x.layer, 1, out_nd)
    tracer.fail(node, f"indexing {index!r} moves the channels to dim {out_f} of {out_nd} (only dim 1 or "
                      "the last dim can hold them)")
