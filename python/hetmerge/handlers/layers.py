"""Weighted layers (Linear, Conv) and per-unit normalizations (BatchNorm, LayerNorm)."""
from __future__ import annotations

import torch.nn as nn

from ..trace import register_handler


@register_handler(nn.Linear)
def linear(tracer, node, module):
    return tracer.linear(node, module, tracer.single_input(node, module))


@register_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(tracer, node, module):
    x = tracer.single_input(node, module)
    if module.groups != 1:
        tracer.fail(node, "grouped convolution")
    if x.flat:
        tracer.fail(node, "convolution after flatten")
    return tracer.linear(node, module, x, kind="conv")


@register_handler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(tracer, node, module):
    x = tracer.single_input(node, module)
    if x.flat and isinstance(module, nn.BatchNorm1d):
        tracer.fail(node, "BatchNorm after flatten")
    return tracer.norm(node, module, x)


@register_handler(nn.LayerNorm)
def layer_norm(tracer, node, module):
    x = tracer.single_input(node, module)
    if len(module.normalized_shape) != 1:
        tracer.fail(node, f"LayerNorm over {tuple(module.normalized_shape)} (only the last dim can be "
                          "permuted)")
    return tracer.norm(node, module, x)
