"""C2M3: cycle-consistent weight matching of N models by Frank–Wolfe over the Birkhoff polytope.

Each model i and group g has a matrix P_i^g [n_i slots, n_i units] (a permutation, relaxed to
doubly stochastic). A paired tensor W_i seen in the universe is  Ŵ_i = P_i^out · W_i · P_i^inᵀ
(zero-padded to the universe width; fixed axes by position), and the objective is the sum of the
pairwise weight-matching objectives

    F = Σ_{i<j} <Ŵ_i, Ŵ_j> = ½ (||S||² − Σ_i ||Ŵ_i||²),   S = Σ_i Ŵ_i   (per paired tensor),

so one sum over models replaces the N² pairwise products: ∂F/∂Ŵ_i = S − Ŵ_i. Frank–Wolfe takes the
gradient for every (i, g), solves one ops.linear_assignment per block as the linear oracle, and
steps toward it with an exact line search (Ŵ_i is quadratic in the step, F quartic). The relaxed
solution is rounded by one more assignment per block, then refined by block coordinate ascent
(F is linear in one block when the others are fixed: the exact best response is an assignment).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..heads import TieLink, solve_tie
from .universe import Universe

__all__ = ["Problem", "frank_wolfe", "round_perms", "refine", "perm_matrix"]


def _unit4(t: torch.Tensor, n_axes: int, blocks: tuple) -> torch.Tensor:
    """[n0·b0, n1·b1, *trail] -> [n0, b0, n1, b1·trail]; 1-D (or one permuted axis) -> [n0, b0, 1, rest]."""
    t = t.detach().to(torch.float64)
    b0 = blocks[0]
    if n_axes == 1:
        return t.reshape(t.shape[0] // b0, b0, 1, -1)
    b1 = blocks[1]
    return t.reshape(t.shape[0] // b0, b0, t.shape[1] // b1, -1)


def perm_matrix(perm: torch.Tensor, device=None) -> torch.Tensor:
    """Permutation matrix [slots, units]: P[s, perm[s]] = 1."""
    n = len(perm)
    P = torch.zeros(n, n, dtype=torch.float64, device=device)
    P[torch.arange(n, device=device), perm.to(device)] = 1.0
    return P


def _assign(G: torch.Tensor) -> torch.Tensor:
    """Permutation maximizing <G, P>: slot s -> unit."""
    row, col = ops.linear_assignment(G, maximize=True)
    perm = torch.empty(G.shape[0], dtype=torch.long)      # index maps live on the CPU
    perm[torch.as_tensor(row).long().cpu()] = torch.as_tensor(col).long().cpu()
    return perm


def oracle(u: Universe, G: dict) -> dict:
    """{group: [permutation per model]} maximizing Σ <G, P>: one assignment per (group, model), and
    for attention heads one structured solve per (tie, model) (whole heads move, one head map for
    the tie's groups, any order inside a head)."""
    tied = {g for groups, _ in u.ties.values() for g in groups}
    out = {g: [_assign(Gi) for Gi in Gs] for g, Gs in G.items() if g not in tied}
    for name, (groups, units) in u.ties.items():
        if groups[0] not in G:
            continue
        out.update({g: [] for g in groups})
        for i in range(len(G[groups[0]])):
            heads = G[groups[0]][i].shape[0] // units[0]
            tie = TieLink(name, groups, heads, heads, units, units)
            perms = solve_tie(tie, {g: G[g][i] for g in groups})
            for g in groups:
                out[g].append(perms[g].cpu())
    return out


def blocks_of(u: Universe, groups) -> list[tuple]:
    """Coordinate blocks of the refinement: a group, or the groups of a tie together."""
    tied = {g: gs for gs, _ in u.ties.values() for g in gs}
    out, seen = [], set()
    for g in groups:
        b = tied.get(g, (g,))
        if b not in seen:
            seen.add(b)
            out.append(b)
    return out


class Problem:
    """The paired tensors of N models in float64 unit form, and the universe shapes."""

    def __init__(self, u: Universe):
        self.u = u
        self.n = len(u.models)
        sds = [m.state_dict() for m in u.models]
        self.device = sds[0][u.terms[0].keys[0]].device if u.terms else torch.device("cpu")
        self.W = [[_unit4(t.tensor(i, sds[i]), len(t.groups), t.blocks).to(self.device) for i in range(self.n)]
                  for t in u.terms]
        size = u.size
        self.shape = []          # universe shape [U0, b0, U1, c] per term
        for t, ws in zip(u.terms, self.W):
            dims = [size[g] if g is not None else max(w.shape[2 * d] for w in ws)
                    for d, g in enumerate(t.groups)] + [1] * (2 - len(t.groups))
            self.shape.append((dims[0], ws[0].shape[1], dims[1], ws[0].shape[3]))
            for i, w in enumerate(ws):
                if (w.shape[1], w.shape[3]) != self.shape[-1][1::2]:
                    raise ValueError(f"align_many: {t.keys[i]!r} of models[{i}] has shape "
                                     f"{tuple(t.tensor(i, sds[i]).shape)}, which does not pair with "
                                     f"{t.keys[0]!r} {tuple(t.tensor(0, sds[0]).shape)} of model 0")
        self.by_group: dict[str, list[tuple[int, int]]] = {g: [] for g in u.widths}   # (term, axis)
        for k, t in enumerate(u.terms):
            for d, g in enumerate(t.groups):
                if g is not None:
                    self.by_group[g].append((k, d))
        norms = [sum(float(ws[i].square().sum()) for ws in self.W) ** 0.5 for i in range(self.n)]
        self.scale = sum(norms[i] * norms[j] for i in range(self.n) for j in range(i + 1, self.n)) or 1.0

    def _mats(self, k: int, i: int, P: dict) -> tuple:
        t = self.u.terms[k]
        return tuple(P[g][i] if g is not None else None for g in t.groups) + (None,) * (2 - len(t.groups))

    def hat(self, k: int, i: int, P: dict) -> torch.Tensor:
        """Ŵ_i of term k: [n0, b0, n1, c] in universe slot order (not yet padded)."""
        P0, P1 = self._mats(k, i, P)
        X = self.W[k][i]
        if P0 is not None:
            X = torch.tensordot(P0, X, dims=([1], [0]))
        if P1 is not None:
            X = torch.einsum("tv,sbvc->sbtc", P1, X)
        return X

    def forward(self, P: dict) -> tuple[list, list]:
        """(hats[k][i], S[k]) for all terms at P."""
        hats, S = [], []
        for k in range(len(self.W)):
            hs = [self.hat(k, i, P) for i in range(self.n)]
            s = torch.zeros(self.shape[k], dtype=torch.float64, device=self.device)
            for h in hs:
                s[:h.shape[0], :, :h.shape[2]] += h
            hats.append(hs)
            S.append(s)
        return hats, S

    def objective(self, hats, S) -> float:
        """Σ_{i<j} <Ŵ_i, Ŵ_j> = ½(||S||² − Σ||Ŵ_i||²)."""
        return 0.5 * sum(float(s.square().sum()) - sum(float(h.square().sum()) for h in hs)
                         for hs, s in zip(hats, S))

    def grad(self, g: str, i: int, P: dict, hats, S) -> torch.Tensor:
        """∂F/∂P_i^g [n_i slots, n_i units]."""
        n = self.u.widths[g][i]
        G = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for k, d in self.by_group[g]:
            h = hats[k][i]
            R = S[k][:h.shape[0], :, :h.shape[2]] - h
            P0, P1 = self._mats(k, i, P)
            W = self.W[k][i]
            if d == 0:
                WP = W if P1 is None else torch.einsum("tv,ubvc->ubtc", P1, W)
                G += torch.einsum("sbtc,ubtc->su", R, WP)
            else:
                PW = W if P0 is None else torch.tensordot(P0, W, dims=([1], [0]))
                G += torch.einsum("sbtc,sbvc->tv", R, PW)
        return G


def _quartic(hats0, S0, hats_h, S_h, hats_1, S_1) -> np.ndarray:
    """Coefficients (ascending) of F(η) along P + η(D − P), from Ŵ at η = 0, ½, 1 (Ŵ is
    quadratic in η: a + bη + cη²)."""
    def coeffs(x0, xh, x1):
        return x0, 4 * xh - 3 * x0 - x1, 2 * x1 - 4 * xh + 2 * x0

    def sq(x0, xh, x1):
        a, b, c = coeffs(x0, xh, x1)
        dot = lambda p, q: float((p * q).sum())   # noqa: E731
        return np.array([dot(a, a), 2 * dot(a, b), dot(b, b) + 2 * dot(a, c), 2 * dot(b, c), dot(c, c)])

    poly = np.zeros(5)
    for k in range(len(S0)):
        poly += 0.5 * sq(S0[k], S_h[k], S_1[k])
        for i in range(len(hats0[k])):
            poly -= 0.5 * sq(hats0[k][i], hats_h[k][i], hats_1[k][i])
    return poly


def _best_step(poly: np.ndarray) -> float:
    """argmax of the quartic on [0, 1] (endpoints and the real roots of its derivative)."""
    cands = [0.0, 1.0]
    deriv = np.array([4 * poly[4], 3 * poly[3], 2 * poly[2], poly[1]])
    if np.any(deriv != 0):
        for r in np.roots(np.trim_zeros(deriv, "f")):
            if abs(r.imag) < 1e-9 and 0.0 < r.real < 1.0:
                cands.append(float(r.real))
    vals = [np.polyval(poly[::-1], c) for c in cands]
    best = int(np.argmax(vals))
    return cands[best] if vals[best] > vals[0] else 0.0


def frank_wolfe(prob: Problem, perms: dict, max_iter: int, tol: float
                ) -> tuple[dict, list[float], list[float], bool, float]:
    """Frank–Wolfe from the permutations `perms`; returns (relaxed P, trace, step sizes η, converged,
    last gap).
    Stops when the Frank–Wolfe gap <G, D − P> (the first-order gain toward the best vertex; zero at
    a stationary point) is below tol·|F|, or when the line search finds no gain."""
    P = {g: [perm_matrix(p, prob.device) for p in ps] for g, ps in perms.items()}
    hats, S = prob.forward(P)
    trace = [prob.objective(hats, S) / prob.scale]
    gap, etas = 0.0, []
    for _ in range(max_iter):
        G = {g: [prob.grad(g, i, P, hats, S) for i in range(prob.n)] for g in P}
        D = {g: [perm_matrix(p, prob.device) for p in ps] for g, ps in oracle(prob.u, G).items()}
        gap = sum(float((Gi * (Di - Pi)).sum()) for g in P for Gi, Di, Pi in zip(G[g], D[g], P[g]))
        if gap <= tol * max(abs(trace[-1]) * prob.scale, 1e-300):
            return P, trace, etas, True, gap
        half = {g: [(Pi + Di) / 2 for Pi, Di in zip(P[g], D[g])] for g in P}
        hats_h, S_h = prob.forward(half)
        hats_1, S_1 = prob.forward(D)
        eta = _best_step(_quartic(hats, S, hats_h, S_h, hats_1, S_1))
        if eta <= 0.0:
            return P, trace, etas, True, gap
        etas.append(eta)
        P = {g: [Pi + eta * (Di - Pi) for Pi, Di in zip(P[g], D[g])] for g in P}
        hats, S = prob.forward(P)
        trace.append(prob.objective(hats, S) / prob.scale)
    return P, trace, etas, False, gap


def round_perms(P: dict, u: Universe | None = None) -> dict:
    """Nearest permutation of each relaxed block: argmax <P, Q> over permutations Q (structured
    ones for attention heads, given the universe)."""
    if u is not None:
        return oracle(u, P)
    return {g: [_assign(Pi) for Pi in Ps] for g, Ps in P.items()}


def refine(prob: Problem, perms: dict, rng: np.random.Generator, max_sweeps: int) -> tuple[dict, float, int]:
    """Block coordinate ascent on permutations: each (model, group) block (a tie's groups together)
    in turn takes the assignment of its gradient (the exact best response: F is linear in Ŵ_i,
    ∂F/∂Ŵ_i = S − Ŵ_i) and keeps it only on a strict gain, so F never decreases. Returns (perms,
    objective, sweeps)."""
    perms = {g: [p.clone() for p in ps] for g, ps in perms.items()}
    P = {g: [perm_matrix(p, prob.device) for p in ps] for g, ps in perms.items()}
    hats, S = prob.forward(P)
    blocks = [(gs, i) for gs in blocks_of(prob.u, perms) for i in range(prob.n)]
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for b in rng.permutation(len(blocks)):
            gs, i = blocks[b]
            best = oracle(prob.u, {g: [prob.grad(g, i, P, hats, S)] for g in gs})
            new = {g: best[g][0] for g in gs}
            if all(torch.equal(new[g], perms[g][i]) for g in gs):
                continue
            trial = dict(P)
            for g in gs:
                trial[g] = P[g][:i] + [perm_matrix(new[g], prob.device)] + P[g][i + 1:]
            touched = sorted({k for g in gs for k, _ in prob.by_group[g]})
            new_hats = {k: prob.hat(k, i, trial) for k in touched}
            # exact change of F when only Ŵ_i moves: Σ_k <S_k − Ŵ_i, Ŵ_i' − Ŵ_i>
            gain = sum(float(((S[k][:h.shape[0], :, :h.shape[2]] - hats[k][i]) * (new_hats[k] - hats[k][i])).sum())
                       for k, h in new_hats.items())
            if gain <= 1e-12 * prob.scale:   # ties: keep the current permutation
                continue
            for g in gs:
                perms[g][i] = new[g]
            P, changed = trial, True
            for k, h in new_hats.items():
                S[k][:h.shape[0], :, :h.shape[2]] += h - hats[k][i]
                hats[k][i] = h
        if not changed:
            break
    hats, S = prob.forward(P)   # recomputed from scratch: no drift from the running updates
    return perms, prob.objective(hats, S), sweeps
