"""hm.align_many: N models into one universe ("c2m3": Frank–Wolfe on the sum of pairwise objectives;
"reference": every model aligned to model 0 with hm.align, the pairwise baseline; "identity": units by
position, the unaligned baseline)."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..alignment import align
from .c2m3 import Problem, frank_wolfe, perm_matrix, refine, round_perms
from .universe import ManyAlignment, Universe, build_universe, check_perms

__all__ = ["align_many", "nested_perms"]

METHODS = ("c2m3", "reference", "identity")


def nested_perms(u: Universe, maps0: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Universe permutations from the alignments of models 1..N-1 to model 0 (maps0[j - 1]).

    Model 0's units are ordered so that those used by many narrower models come first (a model of
    width n fills slots 0..n-1); each other model takes, slot by slot, the unit its alignment put
    on that unit of model 0, and fills the remaining slots with its remaining units in order. With
    equal widths this is model 0 as identity and model j as its alignment to model 0, exactly.
    """
    perms: dict[str, list[torch.Tensor]] = {}
    for g, ns in u.widths.items():
        n0 = ns[0]
        count = torch.zeros(n0, dtype=torch.long)
        for j, m in enumerate(maps0, start=1):
            if ns[j] < n0:
                count += (m[g] >= 0).long()
        order = torch.sort(-count, stable=True).indices          # slot -> unit of model 0
        ps = [order]
        for j, m in enumerate(maps0, start=1):
            want = m[g][order]                      # slot s -> unit of j aligned to model 0's unit there
            head = want[:ns[j]].clone()
            used = torch.zeros(ns[j], dtype=torch.bool)
            used[head[head >= 0]] = True
            # j's unplaced units: those aligned to later slots of model 0 first, then the rest
            later = [int(x) for x in want[ns[j]:] if x >= 0]
            seen = set(later)
            rest = later + [x for x in range(ns[j]) if not used[x] and x not in seen]
            holes = head < 0
            k = int(holes.sum())
            head[holes] = torch.tensor(rest[:k], dtype=torch.long)
            p = torch.cat([head, torch.tensor(rest[k:], dtype=torch.long)])
            ps.append(p)
        perms[g] = ps
    check_perms(perms, u.widths)
    return perms


def align_many(models, method: str = "c2m3", layer_maps=None, max_iter: int = 100, tol: float = 1e-6,
               seed: int = 0, refine_sweeps: int = 100, pairwise_max_iter: int = 100,
               example_input=None, specs=None) -> ManyAlignment:
    """Align N models into one universe, so that every pairwise alignment is cycle-consistent.

    models: two or more torch.nn.Module with the same layer structure (widths may differ: the
      universe of a group is as wide as its widest model, narrower models are zero-padded into it).
    method: "c2m3" (Frank–Wolfe on the sum over all pairs of weight-matching objectives, started from
      "reference", rounded and refined) or "reference" (each model aligned to model 0 with hm.align;
      every other pair composed through model 0), or "identity" (units by position: no alignment,
      the baseline that hm.merge(..., res=None) is for two models).
    layer_maps: None (hm.align's default pairing of each model with model 0), or a list of N layer
      maps, entry j pairing model 0's layers with model j's (entry 0 None). Every model must pair
      onto the same layers of model 0.
    max_iter, tol: Frank–Wolfe steps at most; stop when the Frank–Wolfe gap falls below tol·|F|.
    seed: seeds the pairwise alignments and the refinement's block order (deterministic).
    refine_sweeps: block coordinate ascent sweeps after rounding (0: round only).
    specs: None (trace every model) or one spec per model (a PermSpec such as transformer_spec's of
      an AlignView, hand-written groups, or None to trace that one). Attention heads (spec ties)
      stay whole in the universe: every model needs heads of one size (their counts may differ).
    Returns a ManyAlignment: res.pair(i, j) is an hm.Alignment of models[j] to models[i] for
    hm.merge; res.universe_maps(i) places model i in the universe; hm.merge_many averages them.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    for name, v in (("max_iter", max_iter), ("refine_sweeps", refine_sweeps),
                    ("pairwise_max_iter", pairwise_max_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: must be an int >= 0, got {v!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < float("inf"):
        raise ValueError(f"tol: must be a finite number >= 0, got {tol!r}")
    t_start = time.perf_counter()
    u = build_universe(models, layer_maps, example_input, specs)
    timings = {"structure": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    info: dict = {"seed": seed}
    if method == "identity":
        perms = {g: [torch.arange(n) for n in ns] for g, ns in u.widths.items()}
    else:
        given = layer_maps or [None] * len(u.models)
        pairwise = [align(u.models[0], u.models[j], layer_map=given[j], seed=seed, max_iter=pairwise_max_iter,
                          base_spec=u.specs[0], target_spec=u.specs[j]) for j in range(1, len(u.models))]
        perms = nested_perms(u, [{g: m.cpu() for g, m in r.maps.items()} for r in pairwise])
        info["pairwise_objectives"] = [r.objective for r in pairwise]
    timings["pairwise"] = time.perf_counter() - t0
    prob = Problem(u)
    hats, S = prob.forward({g: [perm_matrix(p, prob.device) for p in ps] for g, ps in perms.items()})
    f_init = prob.objective(hats, S)
    info["objective_init"] = f_init
    if method != "c2m3":
        timings["total"] = time.perf_counter() - t_start
        return ManyAlignment(u, perms, f_init, [f_init / prob.scale], method, 0, True, timings, info)

    t0 = time.perf_counter()
    P, trace, etas, converged, gap = frank_wolfe(prob, perms, max_iter, tol)
    steps = len(etas)
    timings["frank_wolfe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rounded = round_perms(P, u)
    check_perms(rounded, u.widths)
    rng = np.random.default_rng(seed)
    hats, S = prob.forward({g: [perm_matrix(p, prob.device) for p in ps] for g, ps in rounded.items()})
    info.update(objective_relaxed=trace[-1] * prob.scale, objective_rounded=prob.objective(hats, S),
                fw_gap=gap, fw_step_sizes=etas)
    final, f_final, sweeps = refine(prob, rounded, rng, refine_sweeps)
    info.update(objective_refined=f_final, refine_sweeps=sweeps)
    if f_init > f_final:
        # the relaxation can round to something worse than its start: keep the start, refined
        final, f_final, sweeps2 = refine(prob, perms, rng, refine_sweeps)
        info.update(kept="reference", refine_sweeps=sweeps + sweeps2)
    timings["refine"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    trace = trace + [info["objective_rounded"] / prob.scale, f_final / prob.scale]
    return ManyAlignment(u, final, f_final, trace, "c2m3", steps, converged, timings, info)
