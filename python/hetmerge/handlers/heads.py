"""Attention written out by hand, as timm's ViT and most research code write it::

    qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                         # or qkv[0], qkv[1], qkv[2]
    q, k = self.q_norm(q), self.k_norm(k)           # nn.Identity, or LayerNorm(D) / RMSNorm(D)
    x = F.scaled_dot_product_attention(q, k, v)     # or (q * scale) @ k.transpose(-2, -1),
                                                    #    .softmax(-1), (dropout), @ v
    x = self.proj(x.transpose(1, 2).reshape(B, N, C))

and the same with separate projections (``self.q(x).view(B, N, H, D).transpose(1, 2)``).

This file: a view/reshape (or unflatten) that splits a channels-last tensor's channels into (heads,
head_dim), or (parts, heads, head_dim) for a fused projection, gives a ``Heads`` value: which dim
holds what, and the group of each part. A fused projection's output group becomes the concatenation
of one new group per part (Tracer.split). Heads values are moved (permute, transpose), taken apart
(unbind, indexing the parts) and merged back ([..., heads, head_dim] -> channels) here; ops on them
are looked up in Heads' own handler tables (register_handler(value=Heads)), so no Val handler
ever sees one. attend.py holds the attention itself: the attention op joins q's and k's groups into "<attn>.qk", names v's
"<attn>.vo" (it reaches the output projection's input columns) and ties them (Tracer.add_tie): heads
move as whole blocks, one head map for both; inside a head Q/K share one permutation of the head's
channels and V/O another. A LayerNorm/RMSNorm over head_dim on q or k (timm's qk_norm) weighs a
head's channels by position, the same in every head, so Q/K cannot move inside a head: the qk
group's unit is then a whole head (Tracer.coarsen); its parameters are fixed (shared by all heads).

Refused with SpecError naming the node: repeated or expanded k/v heads (grouped-query attention:
a k/v head with its query heads would be the unit), a mask or other tensor that may differ per head,
different numbers of q/k/v heads, any other op on a per-head tensor (rotary embeddings, slicing).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..trace import Val, register_handler


@dataclass(frozen=True)
class Heads:
    """A tensor whose channels are split into attention heads.

    dims: per dim "x" (batch, tokens: no units), "part" (q | k | v of a fused projection), "head",
          "hd" (the channels of a head) or "key" (the key tokens of attention scores)
    parts: group of each part (one group unless dims holds "part"); for scores the qk group
    head_dim: channels per head (for scores: q/k's)
    mixed: an op mixed the channels of a head (LayerNorm(head_dim)): its units are whole heads
    layer: the projection's layer, where q/k norms attach
    part: which part of a fused q | k | v projection's output this is (0 when not fused): with the
          layer, where Q's weights are (the softmax-scale fold of padded heads, spec.Tie.queries)
    """
    what: ClassVar[str] = "a tensor split into attention heads"
    dims: tuple
    parts: tuple
    heads: int
    head_dim: int
    mixed: bool = False
    layer: int | None = None
    scores: bool = False
    part: int = 0


GQA = ("grouped-query attention (k/v heads repeated or expanded to the query heads) is not followed: "
        "a k/v head together with its query heads would be the unit")


def _rank(src: fx.Node, x: Val) -> int | None:
    meta = src.meta.get("tensor_meta")
    return len(meta.shape) if getattr(meta, "shape", None) is not None else x.nd


def _width(tracer, src: fx.Node, x: Val) -> int | None:
    """Channels of x: from example_input's shapes, or the weight rows of the layer that made x."""
    meta = src.meta.get("tensor_meta")
    if getattr(meta, "shape", None) is not None:
        return int(meta.shape[-1])
    if x.layer is not None:
        w = tracer.layers[x.layer][1].get("weight")
        seen = tracer.axis_entry.get((w, 0)) if w is not None else None
        if seen is not None and tracer.uf.find(seen) == tracer.uf.find(x.group):
            return int(tracer.sd[w].shape[0])
    return None


def split_heads(tracer, node: fx.Node, x: Val, shape) -> Heads | None:
    """The Heads value of view/reshape(*batch_dims, [parts,] heads, head_dim) of a channels-last x;
    None when `shape` does not split x's channels that way."""
    if x.flat or x.dim != -1 or not isinstance(node.args[0], fx.Node):
        return None
    src, shape = node.args[0], list(shape)
    nd = _rank(src, x)
    if nd is None:   # B, N = x.shape[:2] are nodes; the constants after them split the channels
        nd = 1 + next((i for i, s in enumerate(shape) if not isinstance(s, fx.Node)), len(shape))
        if -1 in shape[nd - 1:-1]:   # view(B, -1, H, D): is -1 the tokens or the heads?
            tracer.fail(node, f"{node.target}{tuple(shape)} of a tensor of unknown rank: which dims split "
                              "the channels is unknown here (pass example_input)")
    trail = shape[nd - 1:]
    out = getattr(node.meta.get("tensor_meta"), "shape", None)
    if out is not None and len(out) == len(shape):
        trail = [int(s) for s in out[nd - 1:]]
    return _heads_of(tracer, node, x, nd - 1, trail)


def _heads_of(tracer, node: fx.Node, x: Val, lead: int, trail: list) -> Heads | None:
    if len(trail) not in (2, 3) or not all(isinstance(s, int) and (s > 0 or s == -1) for s in trail):
        return None
    if trail.count(-1) > 1:
        return None
    width = _width(tracer, node.args[0], x)
    if -1 in trail:
        rest = math.prod(s for s in trail if s != -1)
        if width is None or width % rest:
            tracer.fail(node, "splits the channels into heads with a -1 whose size is unknown here "
                              "(pass example_input)")
        trail = [width // rest if s == -1 else s for s in trail]
    if width is not None and math.prod(trail) != width:
        return None
    *n_parts, heads, head_dim = trail
    if n_parts and n_parts[0] < 2:
        return None
    if not n_parts:
        return Heads(("x",) * lead + ("head", "hd"), (x.group,), heads, head_dim, layer=x.layer)
    src = node.args[0]
    if len(src.users) != 1:
        tracer.fail(node, f"splits a fused projection into {n_parts[0]} parts whose output is also read "
                          "by other nodes")
    if tracer.uf.fixed[tracer.uf.find(x.group)]:
        parts = (x.group,) * n_parts[0]    # the model's own input: nothing moves
    else:
        name = tracer.uf.names[tracer.uf.find(x.group)]
        parts = tuple(tracer.new_group(f"{name}:{i}") for i in range(n_parts[0]))
        tracer.split(x.group, list(parts))
    return Heads(("x",) * lead + ("part", "head", "hd"), parts, heads, head_dim, layer=x.layer)


@register_handler("unflatten", torch.unflatten)
def unflatten(tracer, node, target):
    """x.unflatten(-1, ([parts,] heads, head_dim)): the channels split into heads."""
    x = tracer.value(node.args[0])
    dim, sizes = tracer.arg(node, 1, "dim"), tracer.arg(node, 2, "sizes")
    if x is None or not isinstance(dim, int) or not isinstance(sizes, (tuple, list)):
        tracer.fail(node, f"unflatten({dim}, {sizes}) (only the channels can be split, into heads)")
    nd = _rank(node.args[0], x)
    if nd is None:
        tracer.fail(node, f"unflatten({dim}) of a tensor of unknown rank (pass example_input)")
    heads = None
    if x.dim == -1 and dim % nd == nd - 1:
        heads = _heads_of(tracer, node, x, nd - 1, list(sizes))
    if heads is None:
        tracer.fail(node, f"unflatten({dim}, {tuple(sizes)}) (only the channels-last dim split into "
                          "([parts,] heads, head_dim) is followed)")
    return heads


# -- moving dims --------------------------------------------------------------------------------
def heads_arg(tracer, node, i: int = 0, name: str = "input") -> Heads:
    h = tracer.value(tracer.arg(node, i, name))
    if not isinstance(h, Heads):
        tracer.fail(node, f"its argument {name!r} is not the tensor split into heads")
    return h


@register_handler("permute", torch.permute, value=Heads)
def permute(tracer, node, target):
    h = heads_arg(tracer, node)
    dims = node.args[1:] if target == "permute" else (tracer.arg(node, 1, "dims"),)
    if target == "permute" and not dims:
        dims = (node.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if len(dims) != len(h.dims) or not all(isinstance(d, int) for d in dims):
        tracer.fail(node, f"permute{tuple(dims)} of a {len(h.dims)}-d tensor split into heads")
    return dataclasses.replace(h, dims=tuple(h.dims[d % len(h.dims)] for d in dims))


@register_handler("transpose", "swapaxes", torch.transpose, torch.swapaxes, value=Heads)
def transpose(tracer, node, target):
    h = heads_arg(tracer, node)
    a, b = tracer.arg(node, 1, "dim0"), tracer.arg(node, 2, "dim1")
    if not isinstance(a, int) or not isinstance(b, int):
        tracer.fail(node, f"transpose({a}, {b}) with non-constant dims")
    dims = list(h.dims)
    a, b = a % len(dims), b % len(dims)
    dims[a], dims[b] = dims[b], dims[a]
    return dataclasses.replace(h, dims=tuple(dims))


@register_handler("contiguous", "clone", "detach", "float", "half", "bfloat16", "to", "type_as",
                  F.dropout, value=Heads)
def same(tracer, node, target):
    h = heads_arg(tracer, node)
    if len(tracer.inputs(node)) != 1:
        tracer.fail(node, f"{target} with another tensor")
    for p in tracer.param_args(node):   # type_as(self.weight): only its dtype is read
        tracer.take(node, p)
    return h


@register_handler(nn.Identity, nn.Dropout, value=Heads)
def same_module(tracer, node, module):
    return tracer.single_input(node, module)


# -- taking a fused projection apart ------------------------------------------------------------
def _part(h: Heads, d: int, i: int) -> Heads:
    return dataclasses.replace(h, dims=h.dims[:d] + h.dims[d + 1:], parts=(h.parts[i],), part=i % len(h.parts))


@register_handler("unbind", torch.unbind, value=Heads)
def unbind(tracer, node, target):
    h = heads_arg(tracer, node)
    d = tracer.arg(node, 1, "dim", 0)
    if not isinstance(d, int) or h.dims[d % len(h.dims)] != "part":
        tracer.fail(node, f"unbind({d}) of a dim that is not the q | k | v parts ({h.dims})")
    d %= len(h.dims)
    return tuple(_part(h, d, i) for i in range(len(h.parts)))


@register_handler(operator.getitem, value=Heads)
def getitem(tracer, node, target):
    """Element i of unbind's tuple, or qkv[i] / qkv[:, :, i] on the parts dim."""
    src, idx = tracer.value(node.args[0]), node.args[1]
    if isinstance(src, tuple) and isinstance(idx, int):
        return src[idx]
    if not isinstance(src, Heads):
        tracer.fail(node, "indexing with a tensor split into heads")
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is None for i in idx):
        tracer.fail(node, "indexing that adds a dim to a tensor split into heads (repeat_kv: " + GQA + ")")
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (slice(None),) * (len(src.dims) - len(idx) + 1) + idx[at + 1:]
    picks = [d for d, i in enumerate(idx) if i != slice(None)]
    if len(picks) != 1 or not isinstance(idx[picks[0]], int) or src.dims[picks[0]] != "part":
        tracer.fail(node, f"indexing {node.args[1]} of a tensor split into heads (only one part of a fused "
                          "q | k | v can be taken; slicing heads or their channels, as rotary embeddings do, "
                          "is not followed)")
    return _part(src, picks[0], idx[picks[0]])


# -- merging the heads back ---------------------------------------------------------------------
def _merged(tracer, node, h: Heads, nd: int) -> Val:
    if h.scores or len(h.parts) != 1 or h.dims[-2:] != ("head", "hd") or set(h.dims[:-2]) != {"x"}:
        tracer.fail(node, f"merges the dims of a tensor split into heads laid out {h.dims} (only "
                          "[..., heads, head_dim] -> [..., heads · head_dim] is followed: transpose the "
                          "heads next to head_dim first)")
    if h.mixed:
        tracer.coarsen(h.parts[0], h.head_dim)
    return Val(h.parts[0], False, None, -1, nd)


@register_handler("view", "reshape", torch.reshape, value=Heads)
def view(tracer, node, target):
    """x.transpose(1, 2).reshape(B, N, C): the heads merged back into channels."""
    h = heads_arg(tracer, node)
    shape = node.args[1:] if target is not torch.reshape else node.args[1]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    last = shape[-1] if shape else None
    if len(shape) != len(h.dims) - 1 or not (isinstance(last, fx.Node) or last in (-1, h.heads * h.head_dim)):
        tracer.fail(node, f"{target}{tuple(shape)} of a tensor split into heads with dims {h.dims} (only "
                          "merging the last two dims, heads and head_dim, is followed)")
    return _merged(tracer, node, h, len(shape))


@register_handler("flatten", torch.flatten, value=Heads)
def flatten(tracer, node, target):
    h = heads_arg(tracer, node)
    start, end = tracer.arg(node, 1, "start_dim", 0), tracer.arg(node, 2, "end_dim", -1)
    nd = len(h.dims)
    if not isinstance(start, int) or start % nd != nd - 2 or end % nd != nd - 1:
        tracer.fail(node, f"flatten({start}, {end}) of a tensor split into heads with dims {h.dims} (only "
                          "merging the last two dims, heads and head_dim, is followed)")
    return _merged(tracer, node, h, nd - 1)
