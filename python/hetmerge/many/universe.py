"""The universe of N models: one shared space per permutation group, and the pairwise alignments it
implies.

Every group g of the models (the free links of their pairing with model 0) gets a universe as wide
as the widest model in g. Model i occupies the first n_i slots of it: slot s holds model i's unit
``perms[g][i][s]`` (a permutation of n_i). Narrower models thus sit inside wider ones, which is how
hetmerge pads pairwise (every unit of the narrower model finds a slot of the wider one, the wider
model's extra units meet padding), and two models of equal width always meet unit for unit.

The alignment of model j to model i is read off the universe: model i's unit a sits in slot
inv_i[a], where model j holds perms[g][j][inv_i[a]] (-1 past n_j). Any two such alignments compose:
pair(0, 2) == pair(1, 2)[pair(0, 1)] whenever the widths agree (cycle consistency by construction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..alignment import Alignment, AlignmentError
from ..maps import position_map
from ..pairing import Pairing, pair_specs
from ..spec import SpecError
from ..trace import as_spec

__all__ = ["Term", "Universe", "ManyAlignment", "build_universe", "pair_map"]


@dataclass(frozen=True)
class Term:
    """One paired tensor, present in every model: keys[i] is its name in model i; groups[d] the
    universe group of axis d (None: a fixed axis, input or output, matched by position)."""
    keys: tuple
    groups: tuple
    blocks: tuple
    views: tuple = ()    # per model: the 2-D view its spec reads the tensor as (() = as stored)

    def tensor(self, i: int, state) -> "torch.Tensor":
        """Model i's tensor of this term in `state`, as its spec sees it."""
        t = state[self.keys[i]]
        v = self.views[i] if self.views else ()
        return t.reshape(v) if v else t


@dataclass
class Universe:
    """The shared structure of N models (no solution yet).

    widths: {group: [n_i per model]}; size: {group: max width}; terms: paired tensors;
    group_of[i]: {model i's group name: universe group}; layer_maps[j]: model 0 layer -> model j layer.
    """
    models: list
    specs: list
    layer_maps: list
    widths: dict[str, list[int]]
    terms: list[Term]
    group_of: list[dict[str, str]]
    pairings: dict = field(default_factory=dict, repr=False)   # (i, j) -> Pairing, built on demand
    # attention heads: tie name -> (universe groups, units per head of each); every model has heads
    # of the same size, so universe slot s is head s // u, unit s % u in every model
    ties: dict = field(default_factory=dict)

    @property
    def size(self) -> dict[str, int]:
        return {g: max(ns) for g, ns in self.widths.items()}

    def pairing(self, i: int, j: int) -> Pairing:
        """Pairing of model j (target) with model i (base), the layer map composed through model 0."""
        if (i, j) not in self.pairings:
            lm_i, lm_j = self.layer_maps[i], self.layer_maps[j]
            lm = {lm_i[l0]: lm_j[l0] for l0 in lm_i}
            self.pairings[(i, j)] = pair_specs(self.models[i], self.models[j], self.specs[i],
                                               self.specs[j], lm)
        return self.pairings[(i, j)]


def _check_models(models) -> list:
    if isinstance(models, nn.ModuleList):
        models = list(models)
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError(f"models: expected a list of torch.nn.Module, got {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"models: align_many needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}]: expected a torch.nn.Module, got {type(m).__name__}")
    return models


def build_universe(models, layer_maps=None, example_input=None, specs=None) -> Universe:
    """Trace every model, pair each with model 0 and check that they all pair alike: the same
    layers of model 0, the same free groups, one group of model j per group of model 0. Raises
    ValueError (naming the models and layers) for models that cannot share one universe."""
    models = _check_models(models)
    n = len(models)
    if layer_maps is None:
        layer_maps = [None] * n
    elif isinstance(layer_maps, (str, bytes)) or not isinstance(layer_maps, Sequence) or len(layer_maps) != n:
        raise ValueError(f"layer_maps: expected None or a list of {n} layer maps (entry j pairs model 0's "
                         f"layers with model j's; entry 0 is None), got {layer_maps!r}")
    elif layer_maps[0] is not None:
        raise ValueError("layer_maps[0]: must be None (model 0 is paired with itself)")
    if specs is None:
        specs = [None] * n
    elif isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence) or len(specs) != n:
        raise ValueError(f"specs: expected None or a list of {n} specs (PermSpec, hand-written groups or "
                         f"None to trace), one per model, got {type(specs).__name__}")
    specs = [as_spec(m, s, example_input) for m, s in zip(models, specs)]
    p0 = [pair_specs(models[0], models[j], specs[0], specs[j], layer_maps[j]) for j in range(1, n)]
    ref = p0[0]
    ref_keys = [pp.base_key for pp in ref.params]
    for j, p in enumerate(p0[1:], start=2):
        if list(p.layer_map) != list(ref.layer_map) or [pp.base_key for pp in p.params] != ref_keys:
            raise ValueError(
                f"align_many: models[{j}] pairs with model 0 on layers {list(p.layer_map.items())} but "
                f"models[1] on {list(ref.layer_map.items())}; one universe needs every model paired onto "
                "the same layers of model 0 (models of different depths: pass layer_maps that pair "
                "each model onto a common structure)")
    free = [name for name, l in ref.links.items() if l.free]
    widths = {g: [ref.links[g].n_a] for g in free}
    group_of: list[dict[str, str]] = [{ref.links[g].base_group: g for g in free}]
    for j, p in enumerate(p0, start=1):
        mine: dict[str, str] = {}
        for g in free:
            link = p.links.get(g)
            if link is None or not link.free or "<-" in g:
                raise ValueError(f"align_many: group {g!r} of model 0 pairs with no single free group of "
                                 f"models[{j}] (links: {sorted(p.links)}); one universe needs one group per "
                                 "group of model 0")
            if mine.get(link.target_group, g) != g:
                raise ValueError(f"align_many: group {link.target_group!r} of models[{j}] pairs with both "
                                 f"{mine[link.target_group]!r} and {g!r} of model 0")
            mine[link.target_group] = g
            widths[g].append(link.n_b)
        extra = sorted(name for name, l in p.links.items() if l.free and name not in widths)
        if extra:
            raise ValueError(f"align_many: models[{j}] pairs groups {extra} of model 0 that models[1] does "
                             "not; pair every model onto the same structure (layer_maps)")
        group_of.append(mine)
    ties = {}
    for name, tie in ref.ties.items():
        for j, p in enumerate(p0, start=1):
            tj = p.ties.get(name)
            if tj is None or tj.links != tie.links or tj.units_a != tj.units_b or tj.units_b != tie.units_a:
                raise ValueError(f"align_many: the attention heads {name!r} of models[{j}] have "
                                 f"{tj.units_b if tj else '?'} units per head, model 0's {tie.units_a}; one "
                                 "universe needs heads of one size in every model (head counts may differ)")
        ties[name] = (tie.links, tie.units_a)
    terms = []
    for k, pp in enumerate(ref.params):
        if pp.segments:
            raise ValueError(f"align_many: {pp.base_key!r} has an axis holding a concatenation (a fused "
                             "q|k|v projection or torch.cat along the channels), which the universe does not "
                             "model yet; align such models pairwise with hm.align")
        keys = (pp.base_key,) + tuple(p.params[k].target_key for p in p0)
        groups = tuple(g if ref.links[g].free else None for g in pp.links)
        views = (pp.base_view,) + tuple(p.params[k].target_view for p in p0)
        terms.append(Term(keys, groups, pp.blocks, views if any(views) else ()))
    lms = [{l0: l0 for l0 in ref.layer_map}] + [dict(p.layer_map) for p in p0]
    return Universe(models, specs, lms, widths, terms, group_of,
                    pairings={(0, j): p for j, p in enumerate(p0, start=1)}, ties=ties)


def pair_map(perm_i: torch.Tensor, perm_j: torch.Tensor) -> torch.Tensor:
    """Index map [n_i] of model j's units into model i's slots, both placed in one universe:
    perm_x[s] = model x's unit in universe slot s (slots 0..n_x-1). -1 = padding (n_j < n_i)."""
    inv_i = torch.empty_like(perm_i)
    inv_i[perm_i] = torch.arange(len(perm_i), dtype=perm_i.dtype)
    n_i, n_j = len(perm_i), len(perm_j)
    padded = torch.cat([perm_j, torch.full((max(0, n_i - n_j),), -1, dtype=perm_j.dtype)])
    return padded[inv_i]


@dataclass(repr=False)
class ManyAlignment:
    """N models aligned into one universe (hm.align_many).

    perms: {group: [LongTensor [n_i] per model]}: universe slot s of group g holds model i's unit
      perms[g][i][s]; model i fills slots 0..n_i-1.
    objective: sum over pairs i < j of the weight-matching objective of pair(i, j) (sum of <A, T(B)>
      over paired tensors, as hm.align's "inner").
    trace: normalized objective (divided by sum_{i<j} ||W_i|| ||W_j||) at the start and after each
      Frank–Wolfe step (relaxed, doubly stochastic), then after rounding and refinement.
    """
    universe: Universe
    perms: dict[str, list[torch.Tensor]]
    objective: float
    trace: list[float]
    method: str = "c2m3"
    iterations: int = 0
    converged: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.universe.models)

    @property
    def widths(self) -> dict[str, list[int]]:
        return {g: list(ns) for g, ns in self.universe.widths.items()}

    @property
    def size(self) -> dict[str, int]:
        return self.universe.size

    def universe_maps(self, i: int) -> dict[str, torch.Tensor]:
        """{group: index map [universe size]} of model i into the universe (hetmerge convention:
        src[slot] = unit of model i, -1 = padding)."""
        i = self._index(i, "i")
        out = {}
        for g, ps in self.perms.items():
            pad = torch.full((self.size[g] - len(ps[i]),), -1, dtype=torch.long)
            out[g] = torch.cat([ps[i], pad])
        return out

    def pair(self, i: int, j: int) -> Alignment:
        """hm.Alignment of models[j] (target) to models[i] (base), for hm.merge(models[i], models[j], ...)."""
        i, j = self._index(i, "i"), self._index(j, "j")
        u = self.universe
        pairing = u.pairing(i, j)
        maps = {}
        for name, link in pairing.links.items():
            if not link.free:
                maps[name] = position_map(link.n_a, link.n_b)
                continue
            g = u.group_of[i].get(link.base_group)
            if g is None or u.group_of[j].get(link.target_group) != g:
                raise AlignmentError(f"ManyAlignment.pair({i}, {j}): link {name!r} pairs group "
                                     f"{link.base_group!r} of model {i} with {link.target_group!r} of model "
                                     f"{j}, which are not one universe group")
            maps[name] = pair_map(self.perms[g][i], self.perms[g][j])
        return Alignment(pairing, maps, info={"method": self.method, "models": [i, j],
                                              "cycle_consistent": True})

    def _index(self, i, name: str) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not -self.n_models <= i < self.n_models:
            raise IndexError(f"ManyAlignment.pair: {name} = {i!r} is not a model index (0..{self.n_models - 1})")
        return i % self.n_models

    def __repr__(self) -> str:
        ws = ", ".join(f"{g}: {self.size[g]}" for g in self.perms)
        return (f"ManyAlignment(method={self.method!r}, {self.n_models} models, objective={self.objective:.6g}, "
                f"{self.iterations} steps{'' if self.converged else ' (not converged)'}, universe widths {{{ws}}})")


def check_perms(perms: dict[str, list[torch.Tensor]], widths: dict[str, list[int]]) -> None:
    """Each perms[g][i] must be a permutation of n_i (internal invariant of every solver)."""
    for g, ps in perms.items():
        for i, p in enumerate(ps):
            if p.dtype != torch.long or not torch.equal(torch.sort(p).values, torch.arange(widths[g][i])):
                raise SpecError(f"universe: perms[{g!r}][{i}] is not a permutation of {widths[g][i]}")
