"""Alignment of a target model to a base model: one index map per link (base size, -1 = padding).

Weight matching is coordinate descent over the free links in a seeded random order: each step builds
the link's cost with one ``ops.cost_matrix`` call and solves it with ``ops.linear_assignment``
(maximize, rectangular). Size-incompatible layers (one dimension larger in the base, the other in the
target) need nothing special: their in- and out-links are solved in turn, which is the paper's
alternating P/Q optimization.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .methods import WeightMatching, activation_costs
from .spec import Pairing, pair_specs
from .trace import as_spec

__all__ = ["AlignResult", "align", "prepare", "solve_link"]


@dataclass
class AlignResult:
    """maps: {link name: LongTensor [n_a], -1 = padding}; link names are the base groups'.
    objective: final objective (weight matching: sum <A, T(B)> for "inner", -sum ||A - T(B)||^2 for
    "l2"; activation matching: sum of the matched units' correlations).
    trace: objective after each sweep, normalized (cosine similarity of the aligned weights for
    "inner", -||A - T(B)||^2 / (||A||^2 + ||B||^2) for "l2"), trace[0] before the first sweep;
    activation matching: [mean correlation of the matched units].
    cases: base layer -> "same size" / "size-compatible" / "size-incompatible".
    """
    maps: dict[str, torch.Tensor]
    objective: float
    trace: list[float]
    cases: dict[str, str]
    timings: dict[str, float]
    method: str = "weight"
    restart_objectives: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True
    pairing: Pairing | None = field(default=None, repr=False)

    @property
    def layer_map(self) -> dict[str, str]:
        return dict(self.pairing.layer_map) if self.pairing is not None else {}


def prepare(base: nn.Module, target: nn.Module, layer_map=None, base_spec=None, target_spec=None,
            example_input=None) -> tuple:
    """(pairing, base spec, target spec) of `base` and `target` (traced specs unless given)."""
    for name, m in (("base", base), ("target", target)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module, got {type(m)}")
    bspec = as_spec(base, base_spec, example_input)
    tspec = as_spec(target, target_spec, example_input)
    return pair_specs(base, target, bspec, tspec, layer_map), bspec, tspec


def solve_link(C: torch.Tensor) -> torch.Tensor:
    """Index map [n_a] from a cost [n_a, n_b] (maximize): src[row] = col, -1 where unassigned."""
    row, col = ops.linear_assignment(C, maximize=True)
    src = torch.full((C.shape[0],), -1, dtype=torch.long, device=C.device)
    src[torch.as_tensor(row, device=C.device)] = torch.as_tensor(col, dtype=torch.long, device=C.device)
    return src


def _descent(wm: WeightMatching, maps: dict, order_links: list[str], rng: np.random.Generator,
             max_iter: int, tol: float, timings: dict,
             on_sweep: Callable[[int, float, float], None] | None = None) -> tuple[dict, float, list[float], int, bool]:
    """Coordinate descent from `maps`; returns the best maps seen, their objective, the trace."""
    t0 = time.perf_counter()
    obj = wm.objective(maps)
    timings["objective"] += time.perf_counter() - t0
    trace = [obj / wm.scale]
    best_maps, best = dict(maps), obj
    version = {n: 0 for n in maps}
    solved_at: dict[str, tuple] = {}
    it, converged = 0, not order_links
    while it < max_iter and order_links:
        it += 1
        for i in rng.permutation(len(order_links)):
            ln = order_links[i]
            # a link's cost depends only on its neighbours' maps: if none changed since it was last
            # solved, the solution is the same and the solve is skipped
            key = tuple(version[o] for o in wm.neighbours[ln])
            if solved_at.get(ln) == key:
                continue
            solved_at[ln] = key
            t0 = time.perf_counter()
            C = wm.cost(ln, maps)
            t1 = time.perf_counter()
            new = solve_link(C)
            timings["cost"] += t1 - t0
            timings["assign"] += time.perf_counter() - t1
            if not torch.equal(new, maps[ln]):
                maps[ln] = new
                version[ln] += 1
        t0 = time.perf_counter()
        new_obj = wm.objective(maps)
        timings["objective"] += time.perf_counter() - t0
        trace.append(new_obj / wm.scale)
        gain = new_obj - obj
        obj = new_obj
        if on_sweep is not None:
            on_sweep(it, new_obj / wm.scale, gain / wm.scale)
        if obj > best:
            best_maps, best = dict(maps), obj
        if gain <= tol * abs(obj):
            converged = True
            break
    return best_maps, best, trace, it, converged


def align(base: nn.Module, target: nn.Module, method: str = "weight", layer_map=None, data: Any = None,
          restarts: int = 1, max_iter: int = 100, tol: float = 1e-9, seed: int = 0,
          objective: str = "inner", base_spec=None, target_spec=None,
          example_input=None, incremental: bool = True,
          callback: Callable[[int, int, float, float], None] | None = None) -> AlignResult:
    """Find index maps that align `target` to `base` (neither is modified).

    method: "weight" (weight matching) or "activation" (correlation of hidden activations on `data`:
      a tensor X or (X, y); links without activations fall back to weight matching).
    layer_map: None (shallow to shallow), {base layer: target layer} by name or index, or pairs.
    restarts: number of seeded random orders (seed, seed+1, ...); the best objective wins.
    max_iter, tol: stop after max_iter sweeps or when a sweep gains less than tol (relative).
    objective: "inner" (default) or "l2" (they differ where target units are dropped).
    base_spec, target_spec: PermSpec or hand-written {group: [(key, axis)]}; traced when None.
    incremental: keep each cost term and update it from the neighbour-map entries that changed
      (same costs up to rounding; much cheaper once few units move per sweep). Needs
      4·n_a·n_b bytes per term; turned off above 2 GiB in all.
    callback: called after every sweep as callback(restart, sweep, objective, gain), objective and
      gain normalized like `trace` (progress bars show the gain per sweep this way).
    """
    if method not in ("weight", "activation"):
        raise ValueError(f"method: expected 'weight' or 'activation', got {method!r}")
    if restarts < 1:
        raise ValueError(f"restarts: must be >= 1, got {restarts}")
    if max_iter < 0:
        raise ValueError(f"max_iter: must be >= 0, got {max_iter}")
    t_start = time.perf_counter()
    pairing, bspec, tspec = prepare(base, target, layer_map, base_spec, target_spec, example_input)
    sa = dict(base.state_dict(keep_vars=True))
    sb = dict(target.state_dict(keep_vars=True))
    device = next(iter(sa.values())).device if sa else torch.device("cpu")
    init = {n: m.to(device) for n, m in pairing.position_maps().items()}
    timings = {"cost": 0.0, "assign": 0.0, "objective": 0.0}
    free = [n for n, l in pairing.links.items() if l.free]

    act_obj = None
    if method == "activation":
        if data is None:
            raise ValueError("align: method='activation' needs data= (a tensor X or (X, y))")
        X = data[0] if isinstance(data, (tuple, list)) else data
        t0 = time.perf_counter()
        costs = activation_costs(pairing, base, target, bspec, tspec, X)
        timings["cost"] += time.perf_counter() - t0
        act_obj = 0.0
        for n, C in costs.items():
            t0 = time.perf_counter()
            init[n] = solve_link(C)
            timings["assign"] += time.perf_counter() - t0
            ok = init[n] >= 0
            act_obj += float(C[torch.arange(C.shape[0], device=C.device)[ok], init[n][ok]].sum())
        free = [n for n in free if n not in costs]

    # one cost cache for all restarts: an entry is the cost for the map it records, whichever run
    # built it
    wm = WeightMatching(pairing, sa, sb, objective, links=free, incremental=incremental)
    results = []
    for r in range(restarts):
        rng = np.random.default_rng(seed + r)
        on_sweep = None if callback is None else (lambda it, o, g, r=r: callback(r, it, o, g))
        results.append(_descent(wm, dict(init), free, rng, max_iter, tol, timings, on_sweep))
    best = max(range(restarts), key=lambda i: results[i][1])
    maps, obj, trace, iters, conv = results[best]
    timings["total"] = time.perf_counter() - t_start
    if method == "activation":
        n_units = sum(int((init[n] >= 0).sum()) for n in pairing.links if n not in free and
                      pairing.links[n].free) or 1
        # links without activations (if any) were weight-matched around the activation maps;
        # the reported objective and trace are the activation correlation alone
        obj, trace = act_obj, [act_obj / n_units]
    return AlignResult(maps={n: m for n, m in maps.items()}, objective=obj, trace=trace,
                       cases=dict(pairing.cases), timings=timings, method=method,
                       restart_objectives=[res[1] for res in results], iterations=iters,
                       converged=conv, pairing=pairing)
