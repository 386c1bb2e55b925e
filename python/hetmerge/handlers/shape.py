"""Kinds that change a tensor's shape but keep units whole: flatten/view(batch, -1), nn.Flatten,
and reductions over spatial dims."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..trace import Val, register_handler


@register_handler(nn.Flatten)
def flatten_module(tracer, node, module):
    x = tracer.single_input(node, module)
    if module.start_dim != 1:
        tracer.fail(node, f"Flatten(start_dim={module.start_dim}) (only start_dim=1 keeps units whole)")
    return Val(x.group, True, x.layer)


@register_handler(torch.flatten, "flatten")
def flatten(tracer, node, target):
    first = tracer.value(node.args[0]) if node.args else None
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if start != 1 or first is None:
        tracer.fail(node, f"flatten(start_dim={start}) (only start_dim=1 keeps units whole)")
    return Val(first.group, True, first.layer)


@register_handler("view", "reshape", torch.reshape)
def view(tracer, node, target):
    first = tracer.value(node.args[0]) if node.args else None
    shape = node.args[1:] if target is not torch.reshape else node.args[1]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    batch_first = len(shape) == 2 and shape[1] == -1 and (isinstance(shape[0], fx.Node) or shape[0] == -1)
    if first is None or not batch_first:
        tracer.fail(node, f"{target}{tuple(shape)} (only view/reshape(batch, -1) can be followed)")
    return Val(first.group, True, first.layer)


@register_handler("mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax)
def reduce(tracer, node, target):
    first = tracer.value(node.args[0]) if node.args else None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if first is None or first.flat or not dims or any(d in (0, 1, -1) for d in dims):
        tracer.fail(node, f"{target} over dims {dims} (only spatial dims >= 2 can be reduced)")
    return first
