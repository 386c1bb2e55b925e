"""Kinds that keep every unit where it is: activations, dropout, pooling, and the joins of
residual connections (which merge the groups they add)."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..trace import Val, register_handler

_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU,
    nn.LeakyReLU, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink,
    nn.Softsign, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_FUNCTIONS = (
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.softplus,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.relu, torch.tanh, torch.sigmoid, torch.abs, torch.neg, F.tanh, F.sigmoid, operator.neg,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
)
_METHODS = ("relu", "tanh", "sigmoid", "abs", "neg", "contiguous", "clone", "detach", "float", "to",
            "type_as", "relu_", "sigmoid_", "tanh_", "sqrt", "rsqrt", "exp", "pow", "square")
_POWERS = (torch.sqrt, torch.rsqrt, torch.exp, torch.square, operator.pow, torch.pow)
# entry-by-entry combinations of tensors (and per-channel parameters): their units line up
_JOINS = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
          torch.div, "add", "sub", "mul", "div", "add_", "mul_", "div_", operator.iadd, operator.imul)


@register_handler(*_MODULES)
def unit_wise_module(tracer, node, module):
    return tracer.single_input(node, module)


@register_handler(nn.PReLU)
def prelu(tracer, node, module):
    if module.num_parameters != 1:   # one slope per channel would have to move with the channels
        tracer.fail(node, f"module type {type(module).__name__} with {module.num_parameters} slopes is "
                          "not supported")
    return tracer.single_input(node, module)


@register_handler(*_POOL_MODULES)
def pool_module(tracer, node, module):
    x = tracer.single_input(node, module)
    if x.flat:
        tracer.fail(node, "pooling after flatten")
    return x


@register_handler(*_FUNCTIONS, *_METHODS, *_POWERS)
def unit_wise_call(tracer, node, target):
    first = tracer.value(node.args[0]) if node.args else None
    if first is None or len(tracer.inputs(node)) != 1:
        tracer.fail(node, "elementwise op whose first argument is not the only feature tensor")
    if target in ("to", "type_as"):
        for p in tracer.param_args(node):   # x.type_as(self.weight): only its dtype/device is read
            tracer.take(node, p)
    return first


@register_handler(*_JOINS)
def join(tracer, node, target):
    """x + y (a residual connection), x * gate (squeeze-and-excitation), gamma * x (a per-channel
    parameter): the operands' units must move together."""
    args = tracer.inputs(node)
    g = tracer.join(*(a.group for a in args))
    if any(a.flat != args[0].flat for a in args):
        tracer.fail(node, "adds a flattened tensor to an unflattened one")
    known = [a for a in args if a.nd is not None and a.nd > 2]
    if len({a.dim for a in known}) > 1:
        tracer.fail(node, "combines a channels-first tensor with a channels-last one")
    like = known[0] if known else args[0]
    nds = [a.nd for a in args if a.nd is not None]
    out = Val(g, args[0].flat, args[0].layer, like.dim, max(nds) if nds else None)
    for p in tracer.param_args(node):
        tracer.scale_param(node, p, out)
    return out
