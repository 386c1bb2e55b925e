"""Convolutions: dense, depthwise and grouped, as modules and as F.conv1d/2d/3d with a module's
own parameters; and channel concatenation (torch.cat along the channels, DenseNet).

Depthwise (groups == in_channels == out_channels): output channel c reads only input channel c,
so the channel permutation passes through; the weight [C, 1, *k] and the bias follow it on axis 0.

Other grouped convolutions (1 < groups, or a depth multiplier out = m·in): a permutation must keep
every channel inside its conv group and permute every group's inputs alike, which one index map
per axis cannot say; their input and output channels are fixed (never permuted, paired by position).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..trace import Val, register_handler


def conv_layer(tracer, node, path: str, x: Val, weight: str, bias: str | None, groups: int,
               probe: bool = True) -> Val:
    tracer.require_first(node, x, "convolution")
    w = tracer.sd[weight]
    # a batched input has as many dims as the weight [out, in, *kernel] (unbatched ones are not followed)
    x = dataclasses.replace(x, nd=w.dim())
    if groups == 1:
        return tracer.weighted(path, x, weight, bias, kind="conv", probe=probe)
    if w.shape[0] == groups and w.shape[1] == 1:   # depthwise: the channels pass through
        if weight in tracer.layer_out:
            gin, _, index, _ = tracer.layer_out[weight]
            return Val(tracer.join(gin, x.group), False, index, 1, x.nd)
        tracer.add_axis(weight, 0, x.group)
        params = {"weight": weight}
        if bias is not None:
            params["bias"] = bias
            tracer.add_axis(bias, 0, x.group)
        index = tracer.add_layer(path, params)
        tracer.layer_out[weight] = (x.group, x.group, index, 1)
        return Val(x.group, False, index, 1, x.nd)
    # grouped: fixed in and out channels; the weight's in axis (in/groups wide) is left unlisted
    tracer.join(x.group, tracer.new_group(f"{path}.in", fixed=True))
    if weight in tracer.layer_out:
        _, gout, index, _ = tracer.layer_out[weight]
        return Val(gout, False, index, 1, x.nd)
    gout = tracer.new_group(f"{path}.out", fixed=True)
    tracer.add_axis(weight, 0, gout)
    params = {"weight": weight}
    if bias is not None:
        params["bias"] = bias
        tracer.add_axis(bias, 0, gout)
    index = tracer.add_layer(path, params)
    tracer.layer_out[weight] = (x.group, gout, index, 1)
    return Val(gout, False, index, 1, x.nd)


@register_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(tracer, node, module):
    x = tracer.single_input(node, module)
    path = str(node.target)
    bias = tracer.key(path, "bias") if module.bias is not None else None
    return conv_layer(tracer, node, path, x, tracer.key(path, "weight"), bias, module.groups)


@register_handler(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def conv_functional(tracer, node, fn):
    """F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups) in a custom module."""
    x = tracer.value(tracer.arg(node, 0, "input"))
    if x is None:
        tracer.fail(node, "convolution whose input is not the feature tensor")
    weight = tracer.param_key(node, tracer.arg(node, 1, "weight"), "weight")
    bias = tracer.param_key(node, tracer.arg(node, 2, "bias"), "bias")
    groups = tracer.arg(node, 6, "groups", 1)
    if not isinstance(groups, int):
        tracer.fail(node, f"groups={groups!r} is not a constant")
    # a functional layer has no module whose input a probe could hook
    return conv_layer(tracer, node, weight.rpartition(".")[0] or weight, x, weight, bias, groups, probe=False)


@register_handler(torch.cat, torch.concat, torch.concatenate)
def cat(tracer, node, fn):
    """torch.cat along the channels: the result's channel axis is the parts' channel axes one after
    the other (a concatenation of groups, no new freedom). Along any other dim the parts hold the
    same units: their groups join."""
    tensors = tracer.arg(node, 0, "tensors")
    dim = tracer.arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        tracer.fail(node, "concatenation of a non-constant list or along a non-constant dim")
    # parameters concatenated with the features along another dim (timm's cls token, prepended
    # along the tokens) hold the same units: they are followed like a per-unit parameter
    params = [t for t in tensors if isinstance(t, fx.Node) and t in tracer.params]
    vals = [tracer.value(t) for t in tensors if t not in params]
    if any(v is None for v in vals) or not vals:
        tracer.fail(node, "concatenates a tensor the tracer does not follow (a constant or a channel "
                          "statistic)")
    nd = next((v.nd for v in vals if v.nd is not None), None)
    along = {tracer.is_feature_dim(node, v, dim, nd) for v in vals}
    if len(along) != 1 or (True in along and len({(v.dim, v.flat) for v in vals}) != 1):
        tracer.fail(node, "concatenates tensors whose channels are on different dims")
    first = vals[0]
    if True not in along:
        out = Val(tracer.join(*(v.group for v in vals)), first.flat, first.layer, first.dim, nd)
        for p in params:
            if len(tracer.params[p].shape or ()) != nd:
                tracer.fail(node, f"concatenates parameter {tracer.params[p].name!r} of another rank than "
                                  "the features (or of a shape the tracer could not follow)")
            tracer.scale_param(node, p, out)
        return out
    if params:
        tracer.fail(node, "concatenates a parameter along the channels (it would add units)")
    if first.flat:
        tracer.fail(node, "concatenates flattened tensors along the features (their spatial sizes may "
                          "differ)")
    parts = []
    for v in vals:
        r = tracer.uf.find(v.group)
        parts.extend(tracer.composite.get(r, (r,)))
    cid = tracer.new_group(f"cat:{node.name}")
    tracer.composite[cid] = tuple(parts)
    return Val(cid, False, None, first.dim, nd)
