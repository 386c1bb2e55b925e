"""Functional layers called with a module's own parameters (get_attr nodes): F.linear,
F.batch_norm, F.layer_norm, F.group_norm -- e.g. timm's BatchNormAct2d-style modules, custom
linears. The parameters get the same axes as their module counterparts'."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..trace import register_handler


def _input(tracer, node, what):
    x = tracer.value(tracer.arg(node, 0, "input"))
    if x is None:
        tracer.fail(node, f"{what} whose input is not the feature tensor")
    return x


@register_handler(F.linear, torch._C._nn.linear)
def linear(tracer, node, fn):
    x = _input(tracer, node, "F.linear")
    tracer.require_last(node, x, "F.linear")
    weight = tracer.param_key(node, tracer.arg(node, 1, "weight"), "weight")
    bias = tracer.param_key(node, tracer.arg(node, 2, "bias"), "bias")
    return tracer.weighted(weight.rpartition(".")[0] if weight.endswith(".weight") else weight,
                           x, weight, bias, probe=False)


def _per_unit(tracer, node, x, args):
    """Parameters passed as (position, keyword, role) that hold one entry per channel."""
    params = {}
    for i, kw, role in args:
        key = tracer.param_key(node, tracer.arg(node, i, kw), kw)
        if key is not None:
            params[role] = key
    path = next(iter(params.values())).rpartition(".")[0] if params else str(node.name)
    return tracer.per_unit(path, x, params)


@register_handler(F.batch_norm, torch.batch_norm)
def batch_norm(tracer, node, fn):
    x = _input(tracer, node, "F.batch_norm")
    tracer.require_first(node, x, "F.batch_norm")
    return _per_unit(tracer, node, x, [(1, "running_mean", "running_mean"), (2, "running_var", "running_var"),
                                       (3, "weight", "weight"), (4, "bias", "bias")])


@register_handler(F.layer_norm, torch.layer_norm)
def layer_norm(tracer, node, fn):
    x = _input(tracer, node, "F.layer_norm")
    shape = tracer.arg(node, 1, "normalized_shape")
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        tracer.fail(node, f"F.layer_norm over {shape} (only the last dim can be permuted)")
    tracer.require_last(node, x, "F.layer_norm")
    return _per_unit(tracer, node, x, [(2, "weight", "weight"), (3, "bias", "bias")])


@register_handler(F.group_norm, torch.group_norm)
def group_norm(tracer, node, fn):
    x = _input(tracer, node, "F.group_norm")
    tracer.require_first(node, x, "F.group_norm")
    groups = tracer.arg(node, 1, "num_groups")
    weight = tracer.arg(node, 2, "weight")
    p = tracer.params.get(weight)
    if groups != 1 and not (p is not None and p.shape and groups == p.shape[0]):
        tracer.join(x.group, tracer.new_group(f"{node.name}.groups", fixed=True))
    return _per_unit(tracer, node, x, [(2, "weight", "weight"), (3, "bias", "bias")])
