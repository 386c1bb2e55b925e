"""Attention heads in an alignment: links whose maps move whole heads (spec.Tie).

A tie of two models pairs the base's tied groups with the target's ("qk" with "qk", "vo" with "vo"):
its links share one head map (base head i <- target head π(i), -1 = a padded head) and each link
maps the units inside a head on its own, per head (σ_l^i; the identity for a group whose unit is a
whole head, RoPE's Q/K). The link's index map is then

    src_l[i·u_a + r] = π(i)·u_b + σ_l^i(r)       (u = units per head; -1 where padded)

Given the cost of every link of the tie ([n_a, n_b] each, the other links' maps held fixed),
``solve_tie`` finds the best such maps exactly: for every head pair (i, j) each link's best inner
map is one assignment on the [u_a, u_b] block, and the head map is one assignment on the sum of
those optima over the links. Heads of different sizes map the first min(u_a, u_b) units by
assignment and pad (or drop) the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import ops
from .spec import PermSpec, SpecError

__all__ = ["TieLink", "pair_ties", "fold_softmax_scales", "solve_tie", "tie_position_maps", "is_structured", "random_perms"]


@dataclass(frozen=True)
class TieLink:
    """The links of one paired tie: one head map for all, a map inside each head per link."""
    name: str
    links: tuple            # link names
    heads_a: int
    heads_b: int
    units_a: tuple          # units per head of each link's base group
    units_b: tuple          # ... and of its target group


def pair_ties(base_spec: PermSpec, target_spec: PermSpec, links: dict) -> dict[str, TieLink]:
    """{tie name: TieLink} for the free links whose base group is in a tie of the base. The target
    group must be in a tie of the target, at the same place (base qk with target qk), and every
    link of one base tie must meet one target tie. Raises SpecError otherwise."""
    found: dict[str, dict[int, tuple]] = {}
    for name, link in links.items():
        if not link.free:
            continue
        ta = base_spec.tie_of(link.base_group)
        tb = target_spec.tie_of(link.target_group)
        if ta is None and tb is None:
            continue
        if ta is None or tb is None or ta[1] != tb[1]:
            what = lambda t, g: f"place {t[1]} of tie {t[0]!r}" if t else f"group {g!r} in no tie"
            raise SpecError(f"pair_specs: link {name!r} pairs base {what(ta, link.base_group)} with target "
                            f"{what(tb, link.target_group)}: attention heads pair only with heads of the same "
                            "role (Q/K with Q/K, V/O with V/O)")
        slot = found.setdefault(ta[0], {})
        if ta[1] in slot:
            raise SpecError(f"pair_specs: base tie {ta[0]!r} group {link.base_group!r} is paired twice")
        slot[ta[1]] = (name, tb[0], link)
    out = {}
    for tname, slots in found.items():
        tie_a = base_spec.ties[tname]
        targets = {tb for _, tb, _ in slots.values()}
        if len(targets) != 1:
            raise SpecError(f"pair_specs: the heads of base tie {tname!r} pair with several target ties "
                            f"{sorted(targets)}; one attention block pairs with one")
        tie_b = target_spec.ties[targets.pop()]
        order = sorted(slots)
        names = tuple(slots[k][0] for k in order)
        ua = tuple(tie_a.head_units[k] for k in order)
        ub = tuple(tie_b.head_units[k] for k in order)
        for k, a, b in zip(order, ua, ub):
            if (a == 1) != (b == 1):
                raise SpecError(f"pair_specs: tie {tname!r}: group {tie_a.groups[k]!r} moves "
                                f"{'whole heads' if a == 1 else 'units inside a head'} but the target's "
                                f"{tie_b.groups[k]!r} {'whole heads' if b == 1 else 'units inside a head'} "
                                "(one model uses rotary position embeddings or a per-head norm, the other not)")
        out[tname] = TieLink(tname, names, tie_a.heads(base_spec.sizes), tie_b.heads(target_spec.sizes), ua, ub)
    return out


def fold_softmax_scales(params: list, ties: dict[str, TieLink], target_spec: PermSpec) -> list:
    """The paired tensors (PairedParam) with the target's Q given the factor sqrt(d_base / d_target)
    where paired heads differ in size: zero-padded into the base's heads, the target's logits are
    divided by sqrt(d_base) instead of sqrt(d_target); the factor keeps them as they were (and is
    the same approximation when heads are cropped). A whole Q tensor takes it as its `scale`, the Q
    part of a fused q|k|v as a `part_scales` entry."""
    factor = {}     # qk link -> factor
    for tie in ties.values():
        for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b):
            if ua != ub:
                factor[ln] = math.sqrt(ua / ub)
    if not factor:
        return params
    queries = {(k, ax, part) for t in target_spec.ties.values() for k, ax, part in t.queries}
    out = []
    for pp in params:
        scale, scales = pp.scale, []
        for ax in range(len(pp.links)):
            if not (pp.segments and pp.segments[ax]):
                if (pp.target_key, ax, 0) in queries and pp.links[ax] in factor:
                    scale *= factor[pp.links[ax]]      # the whole tensor is Q
                continue
            start = 0
            for part, (ln, _n_a, n_b, blk) in enumerate(pp.segments[ax]):
                if (pp.target_key, ax, part) in queries and ln in factor:
                    scales.append((ax, start, n_b * blk, factor[ln]))
                start += n_b * blk
        out.append(replace(pp, scale=scale, part_scales=tuple(scales)))
    return out


def _assign(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r, c = ops.linear_assignment(C, maximize=True)
    return torch.as_tensor(r, dtype=torch.long), torch.as_tensor(c, dtype=torch.long)


def solve_tie(tie: TieLink, costs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The best structured maps of the tie's links for their costs (maximize): {link: src [n_a]}."""
    Ha, Hb = tie.heads_a, tie.heads_b
    dev = next(iter(costs.values())).device
    score = torch.zeros(Ha, Hb, dtype=torch.float64)
    inner: dict[str, torch.Tensor] = {}      # link -> [Ha, Hb, u_a] target unit inside head j, -1 pad
    for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b):
        C = costs[ln].detach().cpu()
        C = (C if C.dtype in (torch.float32, torch.float64) else C.double()).reshape(Ha, ua, Hb, ub).permute(0, 2, 1, 3)
        if ua == 1 and ub == 1:
            score += C[:, :, 0, 0].double()
            continue
        # one assignment per (base head, target head) block, all in one native call
        blocks = C.reshape(Ha * Hb, ua, ub)
        r, c = ops.linear_assignment_batched(blocks, maximize=True)
        batch = torch.arange(Ha * Hb)[:, None]
        score += blocks[batch, r, c].double().sum(1).reshape(Ha, Hb)
        sub = torch.full((Ha * Hb, ua), -1, dtype=torch.long)
        sub[batch, r] = c
        inner[ln] = sub.reshape(Ha, Hb, ua)
    hr, hc = _assign(score)
    head = torch.full((Ha,), -1, dtype=torch.long)
    head[hr] = hc
    return {ln: _expand(head, inner.get(ln), ua, ub).to(dev)
            for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b)}


def _expand(head: torch.Tensor, sub: torch.Tensor | None, ua: int, ub: int) -> torch.Tensor:
    """src over base units from the head map and, per (base head, its target head), the inner map."""
    Ha = head.numel()
    if sub is None:     # identity inside a head (u_a = u_b = 1 here, or the position map)
        r = torch.arange(ua)
        inner = torch.where(r < ub, r, torch.full_like(r, -1)).expand(Ha, ua)
    else:
        inner = sub[torch.arange(Ha), head.clamp(min=0)]
    src = head[:, None] * ub + inner
    ok = (head[:, None] >= 0) & (inner >= 0)
    return torch.where(ok, src, torch.full_like(src, -1)).reshape(-1)


def tie_position_maps(tie: TieLink) -> dict[str, torch.Tensor]:
    """Head i <- head i and unit r <- unit r inside it (padding past the smaller model's heads or
    head size): the start of weight matching and the identity alignment."""
    head = torch.arange(tie.heads_a)
    head[tie.heads_b:] = -1
    return {ln: _expand(head, None, ua, ub) for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b)}


def is_structured(tie: TieLink, maps: dict[str, torch.Tensor]) -> bool:
    """Whether the tie's maps move whole heads: inside a base head every mapped unit comes from one
    target head, the same one in every link, and no target head is used twice."""
    heads = torch.full((tie.heads_a,), -1, dtype=torch.long)
    for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b):
        m = maps[ln].reshape(tie.heads_a, ua).cpu()
        h = torch.where(m >= 0, m // ub, torch.full_like(m, -1))
        top = h.max(1).values
        if bool(((h >= 0) & (h != top[:, None])).any()):
            return False
        if bool(((top >= 0) & (heads >= 0) & (top != heads)).any()):
            return False
        heads = torch.where(top >= 0, top, heads)
    used = heads[heads >= 0]
    return used.unique().numel() == used.numel()


def random_perms(spec: PermSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random permutation of every free group that respects the spec's ties: whole heads move by
    one head permutation per tie, and units inside each head by their own (a test's planted
    permutation; ``maps.permute_state`` applies it)."""
    out = {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}
    for tie in spec.ties.values():
        H = tie.heads(spec.sizes)
        head = torch.randperm(H, generator=generator)
        for g, u in zip(tie.groups, tie.head_units):
            inner = torch.stack([torch.randperm(u, generator=generator) for _ in range(H)])
            out[g] = (head[:, None] * u + inner[head]).reshape(-1)
    return out
