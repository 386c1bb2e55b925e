"""Adaptive search of λ* and the loss barrier: a few small batches of merging factors instead of a
full grid (`hm.sweep(..., search="adaptive")`).

What it finds, from an evaluator `evaluate(lams [k] float64) -> {"loss": [k], "acc": [k], ...}`:

- λ*: the largest point of `grid` whose base-domain accuracy, and that of every smaller grid point,
  stays within `tol` of the accuracy at λ = 0 — what a sweep over `grid` reports — found by
  bracketing on the grid. Accuracy along λ need not be monotone (it dips and recovers when base and
  target agree at the ends), so the search never trusts an unevaluated point: its λ* is always an
  evaluated grid point, every evaluated λ below it is within tol, and the next grid point above it
  (or a non-grid λ between them) was evaluated and is out of tol. Grid points below λ* that were
  not evaluated are assumed within tol; a first coarse scan (`coarse` interior points) bounds what
  that can miss to dips narrower than its spacing, which then cost at most the λ* of such a dip.
- the barrier max_λ [L(λ) - ((1-λ)·L(0) + λ·L(1))] over the continuous interval [0, 1]: the coarse
  scan picks the bump, a cubic through it (g(0) = g(1) = 0) and then successive parabolas through the
  best point and its evaluated neighbours propose the maximum, until a parabola predicts less than
  `ftol` of further gain. When no evaluated point is above the line, the cubic through the two
  interior points nearest each end is asked whether a bump hides next to that end. The reported barrier is the largest value actually evaluated, never an
  extrapolation. A second, lower bump narrower than the coarse spacing can be missed.

Each round evaluates the barrier's proposal and the λ* bracket's points together in one batch (at
most `batch` λ's), so a batched evaluator (hm.sweep's) keeps most of its per-call benefit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

__all__ = ["SearchResult", "adaptive_search", "adaptive_sweep"]

_SNAP = 1e6            # λ's are rounded to 1e-6 as hm.sweep rounds them, so both sides agree on the keys
_MIN_GAP = 2e-3        # barrier proposals closer than this to an evaluated λ stop the search: the
                       # quadratic's value there differs by < curvature·2e-6, far below any tolerance


@dataclass
class SearchResult:
    """lambdas: [n] every λ evaluated, sorted; values: {"loss", "acc", ...}: [n] at those λ.
    lam_star, barrier: as above; n_evals: λ's evaluated (n); rounds: evaluator calls, with
    batches: [rounds] λ's per call."""
    lambdas: torch.Tensor
    values: dict[str, torch.Tensor]
    lam_star: float
    barrier: float
    n_evals: int
    rounds: int
    batches: list[int] = field(default_factory=list)


def _snap(x: float) -> float:
    return round(x * _SNAP) / _SNAP


class _State:
    """Everything evaluated so far, by λ."""

    def __init__(self):
        self.pts: dict[float, dict[str, float]] = {}

    def add(self, lams: list[float], out: Mapping[str, torch.Tensor]) -> None:
        for i, lam in enumerate(lams):
            self.pts[lam] = {k: float(v[i]) for k, v in out.items() if v is not None}

    def sorted(self) -> list[float]:
        return sorted(self.pts)

    def g(self, lam: float) -> float:
        """Loss above the straight line between the endpoints."""
        l0, l1 = self.pts[0.0]["loss"], self.pts[1.0]["loss"]
        return self.pts[lam]["loss"] - ((1 - lam) * l0 + lam * l1)


def _lam_star_bracket(st: _State, grid: list[float], thresh: float, verify: int):
    """(λ* so far, unresolved grid points, first failing λ): λ* = the largest evaluated grid point
    below the first failing evaluated λ; unresolved = unevaluated grid points between the two, and
    the `verify` grid points right below λ* when unevaluated (accuracy is noisy near the threshold,
    where a dip one step below the bracket is likeliest)."""
    lams = st.sorted()
    fail = next((x for x in lams if st.pts[x]["acc"] < thresh), math.inf)
    lo = max((x for x in grid if x < fail and x in st.pts), default=None)
    low = lo if lo is not None else -math.inf
    todo = [x for x in grid if low < x < fail and x not in st.pts]
    if lo is not None and verify:
        i = grid.index(lo)
        todo = [x for x in grid[max(0, i - verify):i] if x not in st.pts] + todo
    return lo, todo, fail


def _lam_star_proposals(st: _State, todo: list[float], lo, fail: float, thresh: float, k: int,
                        bisect: bool) -> list[float]:
    """k grid points from `todo`: around where the accuracy, interpolated linearly between the
    bracket's ends, crosses the threshold (regula falsi), or splitting `todo` evenly (bisect=True,
    used when interpolation failed to close the bracket in the round before)."""
    if len(todo) <= k:
        return list(todo)
    if not bisect and lo is not None and math.isfinite(fail):
        a0, a1 = st.pts[lo]["acc"], st.pts[fail]["acc"]
        c = lo + (fail - lo) * (a0 - thresh) / (a0 - a1) if a0 > a1 else (lo + fail) / 2
        # the k todo points nearest the crossing, taken from both of its sides
        below = [x for x in todo if x <= c]
        above = [x for x in todo if x > c]
        pick = below[-((k + 1) // 2):] + above[:k // 2]
        for x in below[::-1] + above:   # one side too short: fill from the other
            if len(pick) >= k:
                break
            if x not in pick:
                pick.append(x)
        return sorted(pick)
    n = len(todo)
    return [todo[min(n - 1, round((j + 1) * n / (k + 1)) - 1)] for j in range(k)]


def _parabola_vertex(x, y):
    """Vertex (x, value) of the parabola through three points (x sorted, y[1] >= y[0], y[2])."""
    (x0, x1, x2), (y0, y1, y2) = x, y
    d = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if d == 0:
        return x1, y1
    v = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / d
    # the parabola's value at v, from its Lagrange form
    def p(t):
        return (y0 * (t - x1) * (t - x2) / ((x0 - x1) * (x0 - x2)) + y1 * (t - x0) * (t - x2) /
                ((x1 - x0) * (x1 - x2)) + y2 * (t - x0) * (t - x1) / ((x2 - x0) * (x2 - x1)))
    return v, p(v)


def _barrier_proposal(st: _State, ftol: float, first: bool) -> list[float]:
    """The next λ to evaluate for the barrier, as a list ([] when converged). (A second point per
    round, placed to pull in the far end of a lopsided bracket, was tried: it cost more
    evaluations than the rounds it saved on trained models' curves.)"""
    lams = st.sorted()
    g = [st.g(x) for x in lams]
    i = max(range(len(lams)), key=lambda j: g[j])
    if i in (0, len(lams) - 1):
        return _end_bump(lams, g, ftol)
    if first and len(lams) >= 4:
        # g vanishes at both ends; with two interior values g = λ(1-λ)(p + qλ) fits exactly and
        # its maximum is a better first guess than a parabola, which would be centred at 0.5
        v = _cubic_guess(lams, g, i)
        pred = None
    else:
        v, pred = _parabola_vertex(lams[i - 1:i + 2], g[i - 1:i + 2])
        if pred - g[i] < ftol:
            return []
    v = _snap(min(max(v, lams[i - 1]), lams[i + 1]))
    if min(abs(v - x) for x in lams) < _MIN_GAP:
        return []
    return [v]


def _cubic(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(argmax, max) over [0, 1] of λ(1-λ)(p + qλ) through (x1, y1), (x2, y2): the shape of g with
    both its zeros at the ends (the loss curve's cubic through four points)."""
    h1, h2 = y1 / (x1 * (1 - x1)), y2 / (x2 * (1 - x2))   # y / (x(1-x)) = p + q x at both points
    q = (h2 - h1) / (x2 - x1)
    p = h1 - q * x1
    ts = torch.linspace(0, 1, 2001, dtype=torch.float64)   # a dense scan of a known cubic is exact enough
    vals = ts * (1 - ts) * (p + q * ts)
    k = int(torch.argmax(vals))
    return float(ts[k]), float(vals[k])


def _cubic_guess(lams, g, i):
    """The cubic's argmax through the best interior point and its larger interior neighbour."""
    j = max((k for k in (i - 1, i + 1) if 0 < k < len(lams) - 1), key=lambda k: g[k], default=None)
    if j is None:
        return lams[i]
    return _cubic(lams[i], g[i], lams[j], g[j])[0]


def _end_bump(lams, g, ftol: float) -> list[float]:
    """No evaluated point above the line: a bump may still hide between an end and its nearest
    interior points (a loss that first rises a little, then falls below the line). The cubic
    through the two interior points nearest each end says whether one is there and where."""
    inner = list(range(1, len(lams) - 1))
    if len(inner) < 2:
        return []
    best = None
    for a, b in ((inner[0], inner[1]), (inner[-2], inner[-1])):
        x, v = _cubic(lams[a], g[a], lams[b], g[b])
        if v > ftol and (best is None or v > best[1]):
            best = (x, v)
    if best is None:
        return []
    x = _snap(best[0])
    return [x] if min(abs(x - t) for t in lams) >= _MIN_GAP else []


def adaptive_search(evaluate: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], grid, tol: float = 0.01,
                    batch: int = 3, coarse: int = 2, ftol: float = 1e-4, verify: int = 1,
                    max_evals: int | None = None) -> SearchResult:
    """λ* on `grid` and the barrier on [0, 1] from few evaluations (see the module docstring).

    evaluate: lams [k] float64 -> {"loss": [k], "acc": [k], optional other keys [k]} (mean loss and
      accuracy on base-domain data of the merge at each λ; other keys are carried along).
    grid: λ* candidates (sorted or not, within [0, 1]); λ = 0 and 1 are always evaluated.
    tol: accuracy tolerance of λ* (fraction). batch: λ's per evaluator call after the first.
    coarse: interior grid points of the first call (besides 0 and 1).
    ftol: stop refining the barrier when a parabola predicts less gain than this.
    verify: grid points right below λ* that must be evaluated (and within tol) before it is final.
    max_evals: hard cap on λ's evaluated (default: the grid's size + 8).
    """
    grid_t = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if grid_t.numel() == 0:
        raise ValueError("grid: must not be empty")
    if not bool(((grid_t >= 0) & (grid_t <= 1)).all()):
        raise ValueError(f"grid: the adaptive search needs λ's in [0, 1], got {grid_t.tolist()}")
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    if coarse < 0:
        raise ValueError(f"coarse: must be >= 0, got {coarse}")
    gl = sorted({_snap(x) for x in grid_t.tolist()})
    cap = max_evals if max_evals is not None else len(gl) + 8
    st = _State()
    batches: list[int] = []

    def run(lams: list[float]) -> None:
        lams = sorted({_snap(x) for x in lams} - set(st.pts))
        if not lams:
            return
        out = evaluate(torch.tensor(lams, dtype=torch.float64))
        st.add(lams, out)
        batches.append(len(lams))

    # round 1: the endpoints and `coarse` evenly spread grid points (the dips and bumps it can see)
    n = len(gl)
    interior = [gl[round(j * (n - 1) / (coarse + 1))] for j in range(1, coarse + 1)] if n > 2 else []
    run([0.0, 1.0] + interior)
    thresh = st.pts[0.0]["acc"] - tol - 1e-12   # hm.evaluate.lam_star's comparison
    first, prev_todo = True, None
    while len(st.pts) < cap:
        lo, todo, fail = _lam_star_bracket(st, gl, thresh, verify)
        room = min(batch, cap - len(st.pts))
        props = _barrier_proposal(st, ftol, first)
        first = False
        if not todo and not props:
            break
        k = room - len(props) if todo else 0
        if todo and k == 0 and len(batches) % 2 == 0:   # batch = 1: the two searches take turns
            props, k = [], 1
        # bisect when the last round's interpolation did not at least halve the bracket
        stalled = prev_todo is not None and len(todo) > len(prev_todo) / 2
        props += _lam_star_proposals(st, todo, lo, fail, thresh, k, stalled) if k else []
        prev_todo = todo
        before = len(st.pts)
        run(props)
        if len(st.pts) == before:
            break
    lo, _, _ = _lam_star_bracket(st, gl, thresh, verify)
    lams = st.sorted()
    keys = list(st.pts[lams[0]])
    values = {k: torch.tensor([st.pts[x][k] for x in lams], dtype=torch.float64) for k in keys}
    return SearchResult(lambdas=torch.tensor(lams, dtype=torch.float64), values=values,
                        lam_star=lo if lo is not None else 0.0, barrier=max(st.g(x) for x in lams),
                        n_evals=len(lams), rounds=len(batches), batches=batches)


def adaptive_sweep(evaluate: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], grid, tol: float,
                   search: str = "adaptive", extrapolate: bool = False, bn_reset: bool = False, **search_kw):
    """hm.sweep(search="adaptive"): the SweepResult of `adaptive_search` over `evaluate` (hm.sweep's
    batched evaluation of exactly the λ's asked for)."""
    import time

    from .evaluate import SweepResult, barrier

    if search != "adaptive":
        raise ValueError(f"search: expected 'grid' or 'adaptive', got {search!r}")
    if extrapolate:
        raise ValueError("search='adaptive' searches λ in [0, 1]; extrapolate=True needs search='grid'")
    def evaluate32(lams):
        # the grid path judges λ* on accuracies stored as float32; judge the same values, so that
        # an accuracy exactly at the threshold (k/300 samples, tol 0.01) falls on the same side
        return {k: v.float().double() if k.endswith("acc") else v for k, v in evaluate(lams).items()}

    t0 = time.perf_counter()
    r = adaptive_search(evaluate32, grid, tol, **search_kw)
    v, lam = r.values, r.lambdas
    i0, i1 = 0, lam.numel() - 1   # λ = 0 and 1 are always evaluated, so they are the ends
    out = SweepResult(lambdas=lam, loss=v["loss"].float(), acc=v["acc"].float(), barrier=r.barrier,
                      lam_star=r.lam_star, bn_reset=bn_reset, tol=tol, search="adaptive", n_evals=r.n_evals,
                      timings={"total": time.perf_counter() - t0, "rounds": r.rounds, "batches": r.batches})
    if "target_loss" in v:
        tl = v["target_loss"]
        out.target_loss, out.target_acc = tl.float(), v["target_acc"].float()
        # not searched: the largest value among the λ's evaluated for the base domain
        out.target_barrier = barrier(lam, tl, float(tl[i0]), float(tl[i1]))
    return out
