"""Weight matching: the cost of a link is the similarity of the weights of every paired tensor touching
it, the neighbouring links' current maps applied on the inner axis -- one ``ops.cost_matrix`` call.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .. import ops
from ..maps import expand_map, inverse_map, pieces, transform, unit_view, viewed
from ..pairing import Pairing

__all__ = ["WeightMatching"]


class WeightMatching:
    """Weight-matching costs and objective for one pairing.

    objective="inner": maximize sum_p <A_p, T(B_p)> (T = the maps, padding zero).
    objective="l2":    minimize sum_p ||A_p - T(B_p)||^2, i.e. maximize 2<A, T(B)> - ||T(B)||^2; the
                       second term only depends on which target units are kept, so the two differ
                       only where target units are dropped (target wider than base).
    """

    # an incremental term is rebuilt from scratch when more than this fraction of its map changed
    # (the update would cost more than a rebuild) or after this many updates (bounds rounding drift)
    REBUILD_FRACTION = 0.5
    MAX_UPDATES = 8

    def __init__(self, pairing: Pairing, sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor],
                 objective: str = "inner", links: list[str] | None = None, incremental: bool = True,
                 cache_bytes: int = 1 << 31):
        if objective not in ("inner", "l2"):
            raise ValueError(f"objective: expected 'inner' or 'l2', got {objective!r}")
        self.objective_kind = objective
        self.pairing = pairing
        self.a = {pp.base_key: viewed(sa[pp.base_key], pp.base_view).detach() for pp in pairing.params}
        self.b = {pp.target_key: viewed(sb[pp.target_key], pp.target_view).detach() for pp in pairing.params}
        solve = set(links) if links is not None else {n for n, l in pairing.links.items() if l.free}
        # per link: [(A view, B view, B² view, other link or None, block)]
        self.terms: dict[str, list] = {n: [] for n in solve}
        self.neighbours: dict[str, tuple[str, ...]] = {}
        for pp in pairing.params:
            for a, b, links, blocks in pieces(pp, self.a[pp.base_key], self.b[pp.target_key]):
                for d, ln in enumerate(links):
                    if ln not in self.terms:
                        continue
                    av, blk = unit_view(a, d, blocks)
                    bv, _ = unit_view(b, d, blocks)
                    other = links[1 - d] if len(links) == 2 else None
                    b2 = bv.square() if objective == "l2" else None
                    self.terms[ln].append((av, bv, b2, other, blk))
        for ln, terms in self.terms.items():
            self.neighbours[ln] = tuple(sorted({t[3] for t in terms if t[3] is not None}))
        na = sum(float(t.double().square().sum()) for t in self.a.values())
        nb = sum(float(t.double().square().sum()) for t in self.b.values())
        # normalizes the trace: cosine similarity (inner) or relative distance (l2)
        self.scale = math.sqrt(na * nb) if objective == "inner" else (na + nb)
        self.scale = self.scale or 1.0
        self.base_sq = na
        # incremental costs: the link's [n_a, n_b] cost is kept with the neighbour maps it was built
        # from; when only some entries of those maps changed (late sweeps), it is updated in place by
        # cost(changed entries, new maps) - cost(changed entries, old maps), one ops.cost_matrix call
        # (-A carries the minus) whose time is proportional to the changed entries (-1 is skipped)
        need = sum(pairing.links[ln].n_a * pairing.links[ln].n_b * 4 for ln in self.terms)
        self.incremental = incremental and need <= cache_bytes
        self._cache: dict[str, list] = {}     # link -> [C, {term: snapshot map}, updates]
        self._neg: dict[tuple[str, int], torch.Tensor] = {}

    def _full(self, link: str, maps) -> torch.Tensor:
        terms = [(av, bv, maps[o] if o is not None else None, blk)
                 for av, bv, _, o, blk in self.terms[link]]
        return ops.cost_matrix(terms)

    def _incremental(self, link: str, maps) -> torch.Tensor:
        terms = self.terms[link]
        entry = self._cache.get(link)
        if entry is not None:
            C, snaps, updates = entry
            delta, moved, total = [], 0, 0
            for t, (av, bv, _, o, blk) in enumerate(terms):
                if o is None:
                    continue
                cur, old = maps[o], snaps[t]
                changed = cur != old
                n = int(changed.sum())
                moved, total = moved + n, total + cur.numel()
                if n:
                    skip = torch.full_like(cur, -1)
                    if (link, t) not in self._neg:
                        self._neg[(link, t)] = -av
                    delta.append((av, bv, torch.where(changed, cur, skip), blk))
                    delta.append((self._neg[(link, t)], bv, torch.where(changed, old, skip), blk))
            if not delta:
                return C
            if moved <= self.REBUILD_FRACTION * total and updates < self.MAX_UPDATES:
                C += ops.cost_matrix(delta)
                self._cache[link] = [C, {t: maps[o].clone() for t, (*_, o, _b) in enumerate(terms)
                                         if o is not None}, updates + 1]
                return C
        C = self._full(link, maps)
        self._cache[link] = [C, {t: maps[o].clone() for t, (*_, o, _b) in enumerate(terms)
                                 if o is not None}, 0]
        return C

    def cost(self, link: str, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[n_a, n_b] cost of `link` given the other links' maps (maximize). Read-only for callers:
        with incremental costs it is the cached matrix."""
        C = self._incremental(link, maps) if self.incremental else self._full(link, maps)
        if self.objective_kind == "l2":
            # ||T(B)_j||^2 of each target unit j over the mapped inner entries: a 1 × n_b cost
            norms = [(torch.ones(1, av.shape[1], dtype=av.dtype, device=av.device), b2,
                      maps[o] if o is not None else None, blk)
                     for av, _, b2, o, blk in self.terms[link]]
            C = 2 * C - ops.cost_matrix(norms)
        return C

    def objective(self, maps: Mapping[str, torch.Tensor]) -> float:
        """sum_p <A_p, T(B_p)> (inner), or -sum_p ||A_p - T(B_p)||^2 (l2)."""
        total = 0.0
        inv = {}
        for pp in self.pairing.params:
            a, b = self.a[pp.base_key], self.b[pp.target_key]
            if self.objective_kind == "inner" and b.numel() < a.numel() and not pp.segments:
                # <A, T(B)> = <T^-1(A), B>: gather the smaller tensor (the gather is the cost)
                for ln in pp.links:
                    if ln not in inv:
                        inv[ln] = inverse_map(maps[ln], self.pairing.links[ln].n_b)
                rows = expand_map(inv[pp.links[0]], pp.blocks[0])
                cols = expand_map(inv[pp.links[1]], pp.blocks[1]) if len(pp.links) > 1 else None
                total += float(torch.dot(ops.permute_pad(a, rows, cols).reshape(-1), b.reshape(-1)))
                continue
            rows, cols = transform(pp, maps)
            tb = ops.permute_pad(b, rows, cols)
            if self.objective_kind == "inner":
                total += float(torch.dot(a.reshape(-1), tb.reshape(-1)))
            else:
                total -= float((a - tb).square().sum())
        return total
