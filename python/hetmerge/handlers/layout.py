"""Kinds that move the channel axis or change the spatial dims without touching the units:
permute / transpose (channels-last blocks such as ConvNeXt's x.permute(0, 2, 3, 1) ...
x.permute(0, 3, 1, 2)), unsqueeze, spatial padding and resizing (upsampling)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..trace import register_handler


def _moved(tracer, node, x, new_index: int, nd: int):
    """x with its channels now at `new_index` of an `nd`-dim tensor (dim 1 or the last dim)."""
    if nd == 2 and new_index == 1:
        return dataclasses.replace(x, dim=1, nd=2)
    if x.flat:
        tracer.fail(node, "moves the axes of a flattened tensor")
    if new_index == 1:
        return dataclasses.replace(x, dim=1, nd=nd)
    if new_index == nd - 1:
        return dataclasses.replace(x, dim=-1, nd=nd)
    tracer.fail(node, f"moves the channels to dim {new_index} of {nd} (only dim 1 or the last dim can "
                      "hold them)")


@register_handler("permute", torch.permute)
def permute(tracer, node, target):
    x = tracer.value(node.args[0])
    dims = node.args[1:] if target == "permute" else (tracer.arg(node, 1, "dims"),)
    if target == "permute" and not dims:
        dims = (node.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if x is None or not all(isinstance(d, int) for d in dims):
        tracer.fail(node, f"permute{tuple(dims)} with non-constant dims")
    nd = len(dims)
    dims = [d % nd for d in dims]
    return _moved(tracer, node, x, dims.index(tracer.feature_index(node, x, nd)), nd)


@register_handler("transpose", "swapaxes", torch.transpose, torch.swapaxes)
def transpose(tracer, node, target):
    x = tracer.value(node.args[0])
    a, b = tracer.arg(node, 1, "dim0"), tracer.arg(node, 2, "dim1")
    if x is None or not isinstance(a, int) or not isinstance(b, int):
        tracer.fail(node, f"transpose({a}, {b}) with non-constant dims")
    nd = 2 if x.flat else x.nd
    fa, fb = tracer.is_feature_dim(node, x, a), tracer.is_feature_dim(node, x, b)
    if not (fa or fb):
        return x
    other = b if fa else a
    if nd is None:
        # rank unknown: dim 1 and the last dim are recognizable only by their sign
        if other == -1 or (other >= 0 and other == 1):
            return dataclasses.replace(x, dim=-1 if other == -1 else 1)
        tracer.fail(node, f"transpose({a}, {b}) of a tensor of unknown rank (pass example_input)")
    return _moved(tracer, node, x, other % nd, nd)


@register_handler("unsqueeze", torch.unsqueeze)
def unsqueeze(tracer, node, target):
    x = tracer.value(node.args[0])
    d = tracer.arg(node, 1, "dim")
    nd = 2 if x is not None and x.flat else (x.nd if x is not None else None)
    if x is None or not isinstance(d, int):
        tracer.fail(node, f"unsqueeze({d}) with a non-constant dim")
    if nd is None:
        if d >= 2 and x.dim == 1:
            return dataclasses.replace(x, flat=False)
        tracer.fail(node, f"unsqueeze({d}) of a tensor of unknown rank (pass example_input)")
    d = d % (nd + 1)
    f = tracer.feature_index(node, x, nd)
    if d <= f:
        tracer.fail(node, f"unsqueeze({d}) in front of the channels (dim {f})")
    if x.flat:
        tracer.fail(node, "unsqueeze of a flattened tensor")
    return dataclasses.replace(x, dim=1, nd=nd + 1) if f == 1 else \
        tracer.fail(node, f"unsqueeze({d}) after channels-last features")


_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
                nn.CircularPad2d, nn.CircularPad3d)


def _spatial_pad(tracer, node, x, pad):
    """Padding the last len(pad) // 2 dims keeps the units when none of them is the channel axis."""
    if x is None or not isinstance(pad, (tuple, list)):
        tracer.fail(node, "padding with non-constant sizes")
    k = len(pad) // 2
    nd = 2 if x.flat else x.nd
    if x.dim == -1 or x.flat or (nd is not None and k >= nd - 1):
        tracer.fail(node, f"pads the channel axis (pad={tuple(pad)}), which would add units")
    if nd is None:
        tracer.fail(node, f"pad={tuple(pad)} of a tensor of unknown rank (pass example_input)")
    return x


@register_handler(F.pad)
def pad(tracer, node, fn):
    return _spatial_pad(tracer, node, tracer.value(tracer.arg(node, 0, "input")), tracer.arg(node, 1, "pad"))


@register_handler(*_PAD_MODULES)
def pad_module(tracer, node, module):
    return _spatial_pad(tracer, node, tracer.single_input(node, module), module.padding)


@register_handler(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def upsample_module(tracer, node, module):
    x = tracer.single_input(node, module)
    tracer.require_first(node, x, type(module).__name__)
    return x


@register_handler(F.interpolate, F.upsample)
def interpolate(tracer, node, fn):
    """Resizing the spatial dims of a channels-first tensor keeps every channel."""
    x = tracer.value(tracer.arg(node, 0, "input"))
    if x is None:
        tracer.fail(node, "interpolate whose input is not the feature tensor")
    tracer.require_first(node, x, "interpolate")
    return x
