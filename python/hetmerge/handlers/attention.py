"""torch's own attention modules: ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``,
traced as leaves with their permutation structure written out.

MultiheadAttention: the packed ``in_proj_weight`` [3E, E] holds q | k | v on axis 0: three parts, of
two groups tied by heads (spec.Tie): "<path>.qk" (the q and k channels, E units) and "<path>.vo"
(the v channels, which are also ``out_proj``'s input columns). Heads move as whole blocks, one head
map for both; inside a head Q and K share one permutation and V/O another (no RoPE here). Its
input columns are the query's feature group (key and value, read through the same packed weight,
must share it). ``out_proj``'s output is a new group; the module returns (output, weights), and only
element 0 carries features. Attention written out by hand is followed in heads.py.

TransformerEncoderLayer (post- or pre-norm): the block's residual stream is one group: the input,
the attention's output projection (added back), norm1/norm2, linear1's input and linear2's output;
linear1's output (the MLP units) is its own group.
"""
from __future__ import annotations

import operator

import torch.nn as nn

from ..trace import Val, register_handler
from .shape import index_features


def _check_mha(tracer, node, mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim:
        tracer.fail(node, "MultiheadAttention with kdim/vdim different from embed_dim (separate q/k/v weights)")
    if mha.bias_k is not None or mha.add_zero_attn:
        tracer.fail(node, "MultiheadAttention with add_bias_kv or add_zero_attn")


def _mha(tracer, path: str, mha: nn.MultiheadAttention, x: Val, out_group: int | None) -> int:
    """Record one MultiheadAttention at `path` reading x; returns the group of its output."""
    key = tracer.key
    hd = mha.head_dim
    qk, vo = tracer.new_group(f"{path}.qk"), tracer.new_group(f"{path}.vo")
    w_in, b_in = key(path, "in_proj_weight"), key(path, "in_proj_bias")
    w_out, b_out = key(path, "out_proj.weight"), key(path, "out_proj.bias")
    tracer.add_axis(w_out, 1, vo)                   # tells vo its size; qk's is what in_proj has left
    tracer.add_parts(w_in, 0, [(qk, 1), (qk, 1), (vo, 1)])
    tracer.add_axis(w_in, 1, x.group)
    queries = ((w_in, 0, 0), (b_in, 0, 0)) if mha.in_proj_bias is not None else ((w_in, 0, 0),)
    tracer.add_tie(path, [(qk, hd), (vo, hd)], queries)
    params = {"weight": w_in}
    if mha.in_proj_bias is not None:
        tracer.add_parts(b_in, 0, [(qk, 1), (qk, 1), (vo, 1)])
        params["bias"] = b_in
    tracer.add_layer(f"{path}.in_proj", params)
    out = out_group if out_group is not None else tracer.new_group(f"{path}.out_proj")
    tracer.add_axis(w_out, 0, out)
    out_params = {"weight": w_out}
    if mha.out_proj.bias is not None:
        tracer.add_axis(b_out, 0, out)
        out_params["bias"] = b_out
    tracer.add_layer(f"{path}.out_proj", out_params)
    return out


@register_handler(nn.MultiheadAttention)
def multihead_attention(tracer, node, module):
    _check_mha(tracer, node, module)
    xs = tracer.inputs(node)
    if not xs:
        tracer.fail(node, "MultiheadAttention without tensor inputs")
    for x in xs:
        tracer.require_last(node, x, "MultiheadAttention")
    # query, key and value all meet the packed weight's columns
    tracer.join(*[x.group for x in xs[:3]])
    out = _mha(tracer, str(node.target), module, xs[0], None)
    return (Val(out, False, len(tracer.layers) - 1, -1, xs[0].nd), None)


@register_handler(operator.getitem)
def getitem(tracer, node, target):
    """Element i of a module's (output, ...) tuple, or a feature tensor indexed along other dims
    (timm's cls pooling x[:, 0], see shape.index_features)."""
    src = tracer.value(node.args[0])
    if isinstance(src, tuple) and isinstance(node.args[1], int):
        return src[node.args[1]]
    if isinstance(src, Val):
        return index_features(tracer, node, src, node.args[1])
    tracer.fail(node, "indexing of feature tensors is not supported")


@register_handler(nn.TransformerEncoderLayer)
def transformer_encoder_layer(tracer, node, module):
    _check_mha(tracer, node, module.self_attn)
    x = tracer.single_input(node, module) if len(tracer.inputs(node)) == 1 else tracer.fail(
        node, "TransformerEncoderLayer with a mask tensor input")
    tracer.require_last(node, x, "TransformerEncoderLayer")
    path = str(node.target)
    key = tracer.key
    _mha(tracer, key(path, "self_attn"), module.self_attn, x, x.group)
    for norm in ("norm1", "norm2"):
        for local in ("weight", "bias"):
            if getattr(getattr(module, norm), local, None) is not None:
                tracer.add_axis(key(path, f"{norm}.{local}"), 0, x.group)
    tracer.attach(Val(x.group, False, len(tracer.layers) - 1), key(path, "norm1"),
                  {k: key(path, f"norm1.{k}") for k in ("weight", "bias") if getattr(module.norm1, k) is not None})
    mlp = tracer.weighted(key(path, "linear1"), x, key(path, "linear1.weight"),
                          key(path, "linear1.bias") if module.linear1.bias is not None else None, probe=False)
    tracer.add_axis(key(path, "linear2.weight"), 0, x.group)
    tracer.add_axis(key(path, "linear2.weight"), 1, mlp.group)
    params = {"weight": key(path, "linear2.weight")}
    if module.linear2.bias is not None:
        tracer.add_axis(key(path, "linear2.bias"), 0, x.group)
        params["bias"] = key(path, "linear2.bias")
    index = tracer.add_layer(key(path, "linear2"), params)
    tracer.attach(Val(x.group, False, index), key(path, "norm2"),
                  {k: key(path, f"norm2.{k}") for k in ("weight", "bias") if getattr(module.norm2, k) is not None})
    return Val(x.group, False, index, -1, x.nd)
