"""Weight matching of a depth-4 MLP (784 -> w -> w -> w -> 10, random weights, target half as wide):
hm.align vs a plain torch + scipy coordinate descent (the same algorithm, padding materialized,
scipy.optimize.linear_sum_assignment), same seed and visiting order, so the same maps and objective.
Threads: hm.align's native parts run on hetmerge's threads (ours_thr), the reference's matmuls on
torch's (torch_thr) and its assignment solver on one (scipy has no threads).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from .common import threads

# The reference: plain torch + scipy, written from the definition (tests/test_align.py checks hm.align
# against it, and the benchmark times both).


def _pad_rows(W: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    out = W[src.clamp(min=0)]
    return out * (src >= 0).to(W.dtype).view(-1, *([1] * (W.dim() - 1)))


def _pad_cols(W: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return _pad_rows(W.T, src).T


def _position(n_a: int, n_b: int) -> torch.Tensor:
    m = torch.arange(n_a)
    m[n_b:] = -1
    return m


def _layers(model: nn.Module):
    return [(m.weight.detach(), m.bias.detach()) for m in model.modules() if isinstance(m, nn.Linear)]


def _objective(la, lb, maps) -> float:
    total, L = 0.0, len(la)
    for i, ((Wa, ba), (Wb, bb)) in enumerate(zip(la, lb)):
        rows = maps[i] if i < L - 1 else _position(Wa.shape[0], Wb.shape[0])
        cols = maps[i - 1] if i > 0 else _position(Wa.shape[1], Wb.shape[1])
        total += float((Wa * _pad_cols(_pad_rows(Wb, rows), cols)).sum())
        total += float((ba * _pad_rows(bb, rows)).sum())
    return total


def ref_weight_matching(base: nn.Module, target: nn.Module, max_iter: int = 100, tol: float = 1e-9,
                        seed: int = 0):
    """(maps per hidden layer, objective, seconds): hidden layers solved in the order
    np.random.default_rng(seed).permutation(L - 1) each sweep, as hm.align does."""
    import scipy.optimize

    t0 = time.perf_counter()
    la, lb = _layers(base), _layers(target)
    L = len(la)
    maps = [_position(la[i][0].shape[0], lb[i][0].shape[0]) for i in range(L - 1)]
    rng = np.random.default_rng(seed)
    obj = _objective(la, lb, maps)
    for _ in range(max_iter):
        for i in rng.permutation(L - 1):
            (Wa, ba), (Wb, bb) = la[i], lb[i]
            (Wn_a, _), (Wn_b, _) = la[i + 1], lb[i + 1]
            prev = maps[i - 1] if i > 0 else _position(Wa.shape[1], Wb.shape[1])
            nxt = maps[i + 1] if i + 1 < L - 1 else _position(Wn_a.shape[0], Wn_b.shape[0])
            C = Wa @ _pad_cols(Wb, prev).T + ba[:, None] * bb[None, :] + Wn_a.T @ _pad_rows(Wn_b, nxt)
            r, c = scipy.optimize.linear_sum_assignment(C.numpy(), maximize=True)
            new = torch.full((Wa.shape[0],), -1, dtype=torch.long)
            new[torch.from_numpy(r)] = torch.from_numpy(c).long()
            maps[i] = new
        new_obj = _objective(la, lb, maps)
        gain, obj = new_obj - obj, new_obj
        if gain <= tol * abs(obj):
            break
    return maps, obj, time.perf_counter() - t0


def bench_weight_matching(wa: int, wb: int, seed: int = 0, repeats: int = 1, max_iter: int = 100) -> dict:
    import hetmerge as hm
    from hetmerge import models as hmm

    torch.manual_seed(seed)
    base = hmm.mlp(784, [wa] * 3, 10).eval()
    target = hmm.mlp(784, [wb] * 3, 10).eval()
    hm.align(hmm.mlp(784, [64] * 3, 10), hmm.mlp(784, [32] * 3, 10))   # warm up (tracing, imports)
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = hm.align(base, target, seed=seed, max_iter=max_iter)
        t_ours.append(time.perf_counter() - t0)
        ref_maps, ref_obj, t = ref_weight_matching(base, target, seed=seed, max_iter=max_iter)
        t_ref.append(t)
    ours_thr, torch_thr = threads()
    return {"case": f"weight matching depth-4 MLP {wa} vs {wb}", "ours_s": min(t_ours),
            "ref_s": min(t_ref), "speedup": min(t_ref) / min(t_ours), "ours_thr": ours_thr,
            "torch_thr": torch_thr, "ours_objective": res.objective, "ref_objective": ref_obj,
            "sweeps": res.iterations, "max_iter": max_iter,
            "same_maps": all(torch.equal(res.maps[f"fc{i}"], ref_maps[i]) for i in range(3)),
            "ours_timings": {k: round(v, 3) for k, v in res.timings.items()}}


def run(widths, repeat: int = 1, max_iter: int = 100) -> list[dict]:
    """One timed run per width (an alignment runs long enough that one is a stable measurement)."""
    rows = []
    for w in widths:
        r = bench_weight_matching(w, max(1, w // 2), repeats=1, max_iter=max_iter)
        r = {k: v for k, v in r.items() if k != "case"}
        rows.append({"primitive": "align (weight matching)", "case": "depth-4 MLP, target half as wide",
                     "width": w, **r})
    return rows
