"""The attention itself on values split into heads (heads.py's ``Heads``): LayerNorm/RMSNorm over
head_dim on q or k, scalar scales and masks the same for every head, softmax over the key tokens,
F.scaled_dot_product_attention and softmax(q @ kᵀ) @ v. The attention joins q's and k's groups into
"<attn>.qk", names v's "<attn>.vo" and ties them by heads (Tracer.add_tie); a norm over head_dim
makes whole heads the qk units (Tracer.coarsen). Repeated k/v heads (grouped-query attention) are
refused."""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..trace import Val, node_path, register_handler
from .heads import GQA, Heads, heads_arg


# -- inside the heads -----------------------------------------------------------------------------
_SIZE_OPS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
             operator.neg, operator.getitem, math.sqrt)


def _is_size(arg) -> bool:
    """A Python number, or a node computing one from tensor sizes (``q.size(-1) ** -0.5``)."""
    if not isinstance(arg, fx.Node):
        return isinstance(arg, numbers.Number) or (isinstance(arg, (tuple, list)) and all(map(_is_size, arg)))
    if arg.op == "call_method" and arg.target in ("size", "dim"):
        return True
    if arg.op == "call_function" and arg.target is getattr:
        return arg.args[1] in ("shape", "ndim")
    return arg.op == "call_function" and arg.target in _SIZE_OPS and all(map(_is_size, arg.args))


def _same_for_every_head(tracer, node, arg, h: Heads, what: str, dims: tuple | None = None) -> None:
    """Fail unless `arg`, combined entry by entry with the per-head tensor h (laid out `dims`, default
    h.dims), is the same for every head and every channel of a head (a scale, a mask over batch and
    tokens): a size, or a tensor that has size 1 at those dims (known from example_input, or a
    parameter's shape). A floating parameter (a learned temperature) is merged with h's layer."""
    dims = h.dims if dims is None else dims
    if arg is None or _is_size(arg):
        return
    v = tracer.value(arg) if isinstance(arg, fx.Node) else None
    if isinstance(v, Heads):
        tracer.fail(node, f"{what} is itself split into heads")
    if isinstance(v, Val) and not tracer.uf.fixed[tracer.uf.find(v.group)]:   # a model input is fine
        tracer.fail(node, f"{what} is a feature tensor (its units would have to move with the heads)")
    shape = getattr(arg.meta.get("tensor_meta"), "shape", None) if isinstance(arg, fx.Node) else None
    if isinstance(arg, fx.Node) and arg in tracer.params:
        p = tracer.take(node, arg)
        shape = p.shape if shape is None else shape
        if p.key is not None and tracer.sd[p.key].is_floating_point():
            path, _, local = p.key.rpartition(".")
            tracer.attach(Val(h.parts[0], layer=h.layer), path or p.key, {local: p.key})
    if shape is None:
        tracer.fail(node, f"the shape of {what} is unknown here (pass example_input), so it cannot be "
                          "checked to be the same for every head")
    if len(shape) > len(dims):
        tracer.fail(node, f"{what} {tuple(shape)} has more dims than the per-head tensor {dims}")
    off = len(dims) - len(shape)
    if any(dims[off + i] in ("head", "hd", "part") and s != 1 for i, s in enumerate(shape)):
        tracer.fail(node, f"{what} {tuple(shape)} differs per head or per channel of a head (dims {dims}; "
                          "relative position biases, ALiBi, per-head scales and the like are not followed)")


@register_handler(operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", value=Heads)
def scale(tracer, node, target):
    """q * scale, scale * q, attn / sqrt(d): a scalar keeps every unit where it is."""
    a, b = node.args[0], node.args[1]
    h, other = (a, b) if isinstance(tracer.value(a), Heads) else (b, a)
    if other is a and target in (operator.truediv, torch.div, "div"):
        tracer.fail(node, "divides by a tensor split into heads")
    _same_for_every_head(tracer, node, other, tracer.value(h), "its other factor")
    return tracer.value(h)


@register_handler(nn.LayerNorm, nn.RMSNorm, value=Heads)
def head_norm(tracer, node, module):
    """LayerNorm/RMSNorm(head_dim) on q or k: one weight per position in a head, the same in every
    head. Heads still move whole (the weight stays), but not the channels inside a head."""
    h = tracer.single_input(node, module)
    if h.scores or h.dims[-1] != "hd" or tuple(module.normalized_shape) != (h.head_dim,):
        tracer.fail(node, f"{type(module).__name__}{tuple(module.normalized_shape)} on a tensor split into "
                          f"heads of {h.head_dim} channels with dims {h.dims} (only a norm over head_dim, "
                          "the last dim, is followed)")
    path = str(node.target)
    params = {local: tracer.key(path, local)
              for local, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()}
    tracer.attach(Val(h.parts[0], layer=h.layer), path, params)
    return dataclasses.replace(h, mixed=True)


@register_handler("softmax", F.softmax, torch.softmax, value=Heads)
def softmax(tracer, node, target):
    h = heads_arg(tracer, node)
    d = tracer.arg(node, 1, "dim")
    if not h.scores or not isinstance(d, int) or h.dims[d % len(h.dims)] != "key":
        tracer.fail(node, f"softmax over dim {d} of {h.dims} (only attention scores over the key tokens "
                          "are followed)")
    return h


# -- attention ----------------------------------------------------------------------------------
def _tie_name(node) -> str:
    path = node_path(node)
    return "attn" if path == "<root>" else path


def _tokens(tracer, node, h: Heads, what: str, hd_last: bool = True) -> None:
    """h is one part laid out [..., heads ..., tokens, head_dim] (hd_last) or [..., head_dim, tokens]."""
    tail = ("x", "hd") if hd_last else ("hd", "x")
    if h.scores or len(h.parts) != 1 or h.dims[-2:] != tail or "head" not in h.dims[:-2]:
        tracer.fail(node, f"its {what} has dims {h.dims} (expected one of q, k, v laid out "
                          f"[..., heads, ..., {', '.join('tokens' if d == 'x' else 'head_dim' for d in tail)}])")


def _qk(tracer, node, q: Heads, k: Heads) -> int:
    """Join q's and k's groups into "<attn>.qk"; whole heads are its units when q or k was normed."""
    if q.heads != k.heads:
        tracer.fail(node, f"q has {q.heads} heads but k {k.heads} ({GQA})")
    if q.head_dim != k.head_dim:
        tracer.fail(node, f"q has {q.head_dim} channels per head but k {k.head_dim}")
    g = tracer.join(q.parts[0], k.parts[0])
    if q.mixed or k.mixed:
        tracer.coarsen(g, q.head_dim)
    tracer.name_group(g, f"{_tie_name(node)}.qk")
    return g


def _queries(tracer, q: Heads) -> tuple:
    """(key, axis, part) of the weight and bias that make q: its projection's rows (a part of them
    when the projection is a fused q | k | v)."""
    if q.layer is None:
        return ()
    params = tracer.layers[q.layer][1]
    return tuple((params[r], 0, q.part) for r in ("weight", "bias") if r in params)


def _attended(tracer, node, qk: int, qk_dim: int, v: Heads, dims: tuple, q: Heads) -> Heads:
    """The attention's output: v's channels per head, tied with q/k's heads."""
    if tracer.uf.find(v.parts[0]) == tracer.uf.find(qk):
        tracer.fail(node, "v's channels are also q's or k's (one projection for both): Q/K and V/O "
                          "would need one permutation inside a head")
    if v.mixed:
        tracer.coarsen(v.parts[0], v.head_dim)
    name = _tie_name(node)
    tracer.name_group(v.parts[0], f"{name}.vo")
    tracer.add_tie(name, [(qk, qk_dim), (v.parts[0], v.head_dim)], _queries(tracer, q))
    return Heads(dims, (v.parts[0],), v.heads, v.head_dim, layer=None)


@register_handler(F.scaled_dot_product_attention, value=Heads)
def scaled_dot_product_attention(tracer, node, fn):
    q, k, v = (heads_arg(tracer, node, i, n) for i, n in enumerate(("query", "key", "value")))
    if tracer.arg(node, 7, "enable_gqa", False):
        tracer.fail(node, GQA)
    for h, what in ((q, "query"), (k, "key"), (v, "value")):
        _tokens(tracer, node, h, what)
    if not q.dims == k.dims == v.dims:
        tracer.fail(node, f"query, key and value have different layouts {q.dims}, {k.dims}, {v.dims}")
    if v.heads != q.heads:
        tracer.fail(node, f"q has {q.heads} heads but v {v.heads} ({GQA})")
    _same_for_every_head(tracer, node, tracer.arg(node, 3, "attn_mask"), q, "its attention mask",
                         q.dims[:-1] + ("key",))
    qk = _qk(tracer, node, q, k)
    return _attended(tracer, node, qk, q.head_dim, v, q.dims, q)


@register_handler(operator.matmul, torch.matmul, "matmul", value=Heads)
def matmul(tracer, node, target):
    """q @ k.transpose(-2, -1): the scores; scores @ v: the attention's output."""
    a, b = tracer.value(node.args[0]), tracer.value(node.args[1])
    if not (isinstance(a, Heads) and isinstance(b, Heads)):
        tracer.fail(node, "a product of a tensor split into heads with another tensor")
    if not a.scores and not b.scores:
        _tokens(tracer, node, a, "left operand (q)")
        _tokens(tracer, node, b, "right operand (k transposed)", hd_last=False)
        if a.dims[:-2] != b.dims[:-2]:
            tracer.fail(node, f"q {a.dims} and k {b.dims} have their heads on different dims")
        qk = _qk(tracer, node, a, b)
        return Heads(a.dims[:-1] + ("key",), (qk,), a.heads, a.head_dim, layer=a.layer, scores=True, part=a.part)
    if a.scores and not b.scores:
        _tokens(tracer, node, b, "right operand (v)")
        if a.dims[-1] != "key" or a.dims[:-2] != b.dims[:-2]:
            tracer.fail(node, f"scores {a.dims} and v {b.dims} do not line up (expected [..., heads, ..., "
                              "queries, keys] @ [..., heads, ..., keys, head_dim])")
        if a.heads != b.heads:
            tracer.fail(node, f"the scores have {a.heads} heads but v {b.heads} ({GQA})")
        return _attended(tracer, node, a.parts[0], a.head_dim, b, b.dims, a)
    tracer.fail(node, "a product of attention scores with scores, or with q or k")


@register_handler(operator.add, torch.add, "add", "masked_fill", value=Heads)
def masked(tracer, node, target):
    """scores + mask, scores.masked_fill(mask, value): a mask the same for every head."""
    h = tracer.value(node.args[0])
    other = node.args[1] if len(node.args) > 1 else None
    if target != "masked_fill" and not isinstance(h, Heads):
        h, other = tracer.value(other), node.args[0]
    if not isinstance(h, Heads) or not h.scores:
        tracer.fail(node, "adds to a tensor split into heads (only a mask added to attention scores is "
                          "followed)")
    _same_for_every_head(tracer, node, other, h, "the mask")
    if target == "masked_fill":
        _same_for_every_head(tracer, node, tracer.arg(node, 2, "value"), h, "the fill value")
    return h


@register_handler("repeat_interleave", torch.repeat_interleave, "expand", "expand_as", "repeat",
                  value=Heads)
def repeated(tracer, node, target):
    tracer.fail(node, GQA)
