"""Alignment of a target model to a base model: one index map per link (base size, -1 = padding).

Weight matching is coordinate descent over the free links in a seeded random order: each step builds
the link's cost with one ``ops.cost_matrix`` call and solves it with ``ops.linear_assignment``
(maximize, rectangular). Size-incompatible layers (one dimension larger in the base, the other in the
target) need nothing special: their in- and out-links are solved in turn, which is the paper's
alternating P/Q optimization.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from .heads import is_structured, solve_tie
from .methods import WeightMatching, activation_costs, descent, solve_link
from .pairing import Pairing, pair_specs
from .trace import as_spec

__all__ = ["Alignment", "AlignmentError", "AlignResult", "align", "prepare", "solve_link"]


class AlignmentError(ValueError):
    """An alignment does not fit the models it is applied to, or its file is not readable."""


ALIGNMENT_FORMAT = "hetmerge-alignment"
ALIGNMENT_VERSION = 2


@dataclass
class Alignment:
    """What merging needs from an alignment of `target` to `base`, and nothing else.

    pairing: the layer map and links (base group <- target group, sizes) of the two models.
    maps: {link name: LongTensor [n_a]}; src[i] = j puts target unit j in base slot i, -1 = padding.
    fingerprints: {"base": {...}, "target": {...}} identity of the weights it was computed on (see
      hetmerge.checkpoint.fingerprint), so that applying it to other weights can be noticed.
    info: provenance and diagnostics stored with it (method, objective, options, versions); free-form,
      strict-JSON values.
    """
    pairing: Pairing
    maps: dict[str, torch.Tensor]
    fingerprints: dict[str, dict] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    @property
    def layer_map(self) -> dict[str, str]:
        return dict(self.pairing.layer_map)

    @property
    def cases(self) -> dict[str, str]:
        return dict(self.pairing.cases)

    def validate(self, pairing: Pairing | None = None, where: str = "alignment") -> None:
        """Raise AlignmentError unless there is exactly one map per link of `pairing` (default: its
        own) and each map fits its link: n_a entries, distinct target units < n_b, -1 = padding."""
        pairing = self.pairing if pairing is None else pairing
        for name, link in pairing.links.items():
            if name not in self.maps:
                raise AlignmentError(f"{where}: no map for link {name!r}; it was computed for a different "
                                     f"layer map ({self.pairing.layer_map}) — align again")
            m = self.maps[name]
            if not torch.is_tensor(m) or m.dtype != torch.long or m.dim() != 1:
                raise AlignmentError(f"{where}: map {name!r} must be a 1-D int64 tensor, got "
                                     f"{getattr(m, 'dtype', type(m))} {tuple(getattr(m, 'shape', ()))}")
            valid = m[m >= 0]
            if m.numel() != link.n_a or bool((m < -1).any()) or \
                    (valid.numel() and int(valid.max()) >= link.n_b) or valid.unique().numel() != valid.numel():
                raise AlignmentError(f"{where}: map {name!r} (length {m.numel()}, entries "
                                     f"{int(m.min()) if m.numel() else '-'}..{int(m.max()) if m.numel() else '-'})"
                                     f" does not fit these models: they need {link.n_a} distinct entries < "
                                     f"{link.n_b} (-1 = padding); it was computed for other models — align again")
        for tie in pairing.ties.values():
            if not is_structured(tie, self.maps):
                raise AlignmentError(f"{where}: maps {list(tie.links)} move units between attention heads "
                                     f"of {tie.name!r}; a map of a head's units must keep them in one head, "
                                     "the same head for all of them (hetmerge.heads) — align again")
        extra = sorted(set(self.maps) - set(pairing.links))
        if extra:
            raise AlignmentError(f"{where}: maps {extra} match no link of these models; it was computed for "
                                 "different models or a different layer map — align again")

    def check_fingerprints(self, current: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
        """(changed, unchecked): sides ("base"/"target") whose weights differ from those the alignment
        was computed on, and sides that cannot be checked because the alignment holds no fingerprint
        of the same kind (files written by older versions)."""
        changed, unchecked = [], []
        for side, have in current.items():
            want = self.fingerprints.get(side) or {}
            if want.get("kind") != have.get("kind") or "digest" not in want:
                unchecked.append(side)
            elif want["digest"] != have.get("digest"):
                changed.append(side)
        return changed, unchecked

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        links = {n: {"base_group": l.base_group, "target_group": l.target_group, "n_base": l.n_a,
                     "n_target": l.n_b, "solved": l.free} for n, l in self.pairing.links.items()}
        return {"format": ALIGNMENT_FORMAT, "version": ALIGNMENT_VERSION,
                "layer_map": dict(self.pairing.layer_map), "cases": dict(self.pairing.cases),
                "links": links, **{side: dict(fp) for side, fp in self.fingerprints.items()},
                "info": self.info, "maps": {n: m.tolist() for n, m in self.maps.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write strict JSON (no NaN/Infinity), atomically."""
        from .checkpoint import atomic_write
        from .report import to_jsonable
        text = json.dumps(to_jsonable(self.to_dict()), indent=1, allow_nan=False)
        p = Path(path)
        with atomic_write(p, "w") as f:
            f.write(text)
        return p

    @staticmethod
    def read(path: str | os.PathLike) -> dict[str, Any]:
        """The raw document of an alignment file, checked for format and version only."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise AlignmentError(f"alignment {p}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AlignmentError(f"alignment {p}: not a JSON file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != ALIGNMENT_FORMAT:
            raise AlignmentError(f"alignment {p}: not a hetmerge alignment file (written by hetmerge align)")
        if doc.get("version") not in (1, ALIGNMENT_VERSION):
            raise AlignmentError(f"alignment {p}: version {doc.get('version')!r} is newer than this hetmerge "
                                 f"reads ({ALIGNMENT_VERSION}); upgrade hetmerge")
        if not isinstance(doc.get("maps"), dict):
            raise AlignmentError(f"alignment {p}: no 'maps'")
        return doc

    @classmethod
    def load(cls, path: str | os.PathLike, pairing: Pairing | None = None, base: nn.Module | None = None,
             target: nn.Module | None = None) -> "Alignment":
        """Read an alignment file for the models at hand: give their `pairing`, or `base` and
        `target` (paired with the file's layer map). Raises AlignmentError when it does not fit."""
        doc = cls.read(path)
        if pairing is None:
            if base is None or target is None:
                raise TypeError("Alignment.load: give pairing=, or base= and target=")
            pairing = prepare(base, target, doc.get("layer_map") or None)[0]
        maps = {}
        for name, m in doc["maps"].items():
            if not isinstance(m, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in m):
                raise AlignmentError(f"alignment {path}: map {name!r} is not a list of integers")
            maps[name] = torch.tensor(m, dtype=torch.long)
        fps = {side: doc[side] for side in ("base", "target") if isinstance(doc.get(side), dict)}
        try:
            return cls(pairing, maps, fps, doc.get("info") or {})
        except AlignmentError as exc:
            raise AlignmentError(str(exc).replace("alignment:", f"alignment {path}:", 1)) from None

    def __repr__(self) -> str:
        moved = sum(int((m != torch.arange(len(m))).sum()) for m in self.maps.values())
        padded = sum(int((m < 0).sum()) for m in self.maps.values())
        return (f"Alignment({len(self.maps)} maps over {len(self.pairing.layer_map)} paired layers, "
                f"{moved} units moved, {padded} padded)")


@dataclass(repr=False)
class AlignResult:
    """What hm.align found: the `alignment` (pairing + maps) plus diagnostics.

    maps: {link name: LongTensor [n_a], -1 = padding}; link names are the base groups'.
    objective: final objective (weight matching: sum <A, T(B)> for "inner", -sum ||A - T(B)||^2 for
    "l2"; activation matching: sum of the matched units' correlations).
    trace: objective after each sweep, normalized (cosine similarity of the aligned weights for
    "inner", -||A - T(B)||^2 / (||A||^2 + ||B||^2) for "l2"), trace[0] before the first sweep;
    activation matching: [mean correlation of the matched units].
    cases: base layer -> "same size" / "size-compatible" / "size-incompatible".
    """
    alignment: Alignment
    objective: float
    trace: list[float]
    timings: dict[str, float]
    method: str = "weight"
    restart_objectives: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        return self.alignment.maps

    @property
    def pairing(self) -> Pairing:
        return self.alignment.pairing

    @property
    def cases(self) -> dict[str, str]:
        return self.alignment.cases

    @property
    def layer_map(self) -> dict[str, str]:
        return self.alignment.layer_map

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for c in self.cases.values():
            counts[c] = counts.get(c, 0) + 1
        cases = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
        return (f"AlignResult(method={self.method!r}, objective={self.objective:.6g}, "
                f"{len(self.maps)} maps, {self.iterations} sweeps{'' if self.converged else ' (not converged)'}, "
                f"layers: {cases or 'none'}, {self.timings.get('total', 0.0):.2f} s)")


def prepare(base: nn.Module, target: nn.Module, layer_map=None, base_spec=None, target_spec=None,
            example_input=None) -> tuple:
    """(pairing, base spec, target spec) of `base` and `target` (traced specs unless given)."""
    for name, m in (("base", base), ("target", target)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module, got {type(m)}")
    bspec = as_spec(base, base_spec, example_input)
    tspec = as_spec(target, target_spec, example_input)
    return pair_specs(base, target, bspec, tspec, layer_map), bspec, tspec


def align(base: nn.Module, target: nn.Module, method: str = "weight", layer_map=None, data: Any = None,
          restarts: int = 1, max_iter: int = 100, tol: float = 1e-9, seed: int = 0,
          objective: str = "inner", base_spec=None, target_spec=None,
          example_input=None, incremental: bool = True,
          callback: Callable[[int, int, float, float], None] | None = None) -> AlignResult:
    """Find index maps that align `target` to `base` (neither is modified).

    method: "weight" (weight matching) or "activation" (correlation of hidden activations on `data`:
      a tensor X or (X, y); links without activations fall back to weight matching).
    layer_map: None (shallow to shallow; residual nets within stages, block i of stage s with block i
      of stage s), {base layer: target layer}, or [(base, target)] pairs. Keys are layer names, and a
      name that exists is that layer, always: {"2": "2"} pairs the nn.Sequential layers named 2. A
      position is written "#N" (0-based, in spec.layers order): {"#1": "#2"}. An unknown name or an
      out-of-range position raises LayerMapError (a SpecError and KeyError) naming the valid ones;
      no layer pairs at all raises NothingToAlignError.
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
        for n in list(costs):
            tie = pairing.tie_of(n)
            if tie is not None and not all(l in costs for l in tie.links):
                del costs[n]     # a tie is solved whole: without every link's activations, by weights
        solved = set()
        for n in costs:
            if n in solved:
                continue
            tie = pairing.tie_of(n)
            step = tie.links if tie is not None else (n,)
            t0 = time.perf_counter()
            new = solve_tie(tie, {l: costs[l] for l in step}) if tie is not None else {n: solve_link(costs[n])}
            timings["assign"] += time.perf_counter() - t0
            for l, m in new.items():
                init[l] = m
                ok = m >= 0
                C = costs[l]
                act_obj += float(C[torch.arange(C.shape[0], device=C.device)[ok], m[ok]].sum())
            solved.update(step)
        free = [n for n in free if n not in costs]

    # one cost cache for all restarts: an entry is the cost for the map it records, whichever run
    # built it
    wm = WeightMatching(pairing, sa, sb, objective, links=free, incremental=incremental)
    results = []
    for r in range(restarts):
        rng = np.random.default_rng(seed + r)
        on_sweep = None if callback is None else (lambda it, o, g, r=r: callback(r, it, o, g))
        results.append(descent(wm, dict(init), free, rng, max_iter, tol, timings, on_sweep))
    best = max(range(restarts), key=lambda i: results[i][1])
    maps, obj, trace, iters, conv = results[best]
    timings["total"] = time.perf_counter() - t_start
    if method == "activation":
        n_units = sum(int((init[n] >= 0).sum()) for n in pairing.links if n not in free and
                      pairing.links[n].free) or 1
        # links without activations (if any) were weight-matched around the activation maps;
        # the reported objective and trace are the activation correlation alone
        obj, trace = act_obj, [act_obj / n_units]
    alignment = Alignment(pairing, {n: m for n, m in maps.items()},
                          info={"method": method, "objective": obj, "restarts": restarts, "seed": seed})
    return AlignResult(alignment, objective=obj, trace=trace, timings=timings, method=method,
                       restart_objectives=[res[1] for res in results], iterations=iters, converged=conv)
