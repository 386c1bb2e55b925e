"""Weighted layers (Linear) and per-unit normalizations (BatchNorm, LayerNorm, GroupNorm).
Convolutions, depthwise and grouped ones included, are in conv_families.py."""
from __future__ import annotations

import torch.nn as nn

from ..trace import register_handler


@register_handler(nn.Linear)
def linear(tracer, node, module):
    return tracer.linear(node, module, tracer.single_input(node, module))


@register_handler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(tracer, node, module):
    x = tracer.single_input(node, module)
    tracer.require_first(node, x, type(module).__name__)
    return tracer.norm(node, module, x)


@register_handler(nn.LayerNorm)
def layer_norm(tracer, node, module):
    x = tracer.single_input(node, module)
    if len(module.normalized_shape) != 1:
        tracer.fail(node, f"LayerNorm over {tuple(module.normalized_shape)} (only the last dim can be "
                          "permuted)")
    tracer.require_last(node, x, "LayerNorm")
    return tracer.norm(node, module, x)


@register_handler(nn.GroupNorm)
def group_norm(tracer, node, module):
    """One group (statistics over all channels) or one channel per group (instance norm): the
    statistics do not depend on the channel order, the affine parameters are per channel. Other
    group counts tie channels to their group's statistics: the channels are fixed."""
    x = tracer.single_input(node, module)
    tracer.require_first(node, x, "GroupNorm")
    if module.num_groups not in (1, module.num_channels):
        tracer.join(x.group, tracer.new_group(f"{node.target}.groups", fixed=True))
    return tracer.norm(node, module, x)
