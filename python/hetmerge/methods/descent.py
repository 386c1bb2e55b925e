"""Coordinate descent of weight matching: each step solves one link (or all links of an attention
tie together) for the other links' current maps -- one cost per link, one assignment (or one
structured head solve) per step; a step whose neighbours' maps did not change since it was last
solved is skipped."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .. import ops
from ..heads import solve_tie
from ..pairing import Pairing
from .weight import WeightMatching

__all__ = ["descent", "solve_link"]


def solve_link(C: torch.Tensor) -> torch.Tensor:
    """Index map [n_a] from a cost [n_a, n_b] (maximize): src[row] = col, -1 where unassigned."""
    row, col = ops.linear_assignment(C, maximize=True)
    src = torch.full((C.shape[0],), -1, dtype=torch.long, device=C.device)
    src[torch.as_tensor(row, device=C.device)] = torch.as_tensor(col, dtype=torch.long, device=C.device)
    return src


def _steps(pairing: Pairing, links: list[str]) -> list[tuple[str, ...]]:
    """Coordinate-descent steps: one link, or all links of a tie (attention heads), solved together."""
    steps, seen = [], set()
    for ln in links:
        tie = pairing.tie_of(ln)
        if tie is None:
            steps.append((ln,))
        elif tie.name not in seen:
            seen.add(tie.name)
            missing = [l for l in tie.links if l not in links]
            if missing:
                raise ValueError(f"align: links {missing} of attention tie {tie.name!r} are not solved "
                                 "with the rest of the tie")
            steps.append(tie.links)
    return steps


def _solve_step(wm: WeightMatching, pairing: Pairing, step: tuple[str, ...], maps: dict,
                timings: dict) -> dict[str, torch.Tensor]:
    t0 = time.perf_counter()
    costs = {ln: wm.cost(ln, maps) for ln in step}
    t1 = time.perf_counter()
    tie = pairing.tie_of(step[0])
    new = solve_tie(tie, costs) if tie is not None else {step[0]: solve_link(costs[step[0]])}
    timings["cost"] += t1 - t0
    timings["assign"] += time.perf_counter() - t1
    return new


def descent(wm: WeightMatching, maps: dict, order_links: list[str], rng: np.random.Generator,
             max_iter: int, tol: float, timings: dict,
             on_sweep: Callable[[int, float, float], None] | None = None) -> tuple[dict, float, list[float], int, bool]:
    """Coordinate descent from `maps`; returns the best maps seen, their objective, the trace."""
    t0 = time.perf_counter()
    obj = wm.objective(maps)
    timings["objective"] += time.perf_counter() - t0
    trace = [obj / wm.scale]
    best_maps, best = dict(maps), obj
    version = {n: 0 for n in maps}
    solved_at: dict[tuple, tuple] = {}
    steps = _steps(wm.pairing, order_links)
    it, converged = 0, not steps
    while it < max_iter and steps:
        it += 1
        for i in rng.permutation(len(steps)):
            step = steps[i]
            # a link's cost depends only on its neighbours' maps: if none changed since it was last
            # solved, the solution is the same and the solve is skipped
            key = tuple(version[o] for ln in step for o in wm.neighbours[ln])
            if solved_at.get(step) == key:
                continue
            solved_at[step] = key
            for ln, new in _solve_step(wm, wm.pairing, step, maps, timings).items():
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
