"""Block matching by function (blocks="cka", our design): pair target blocks with source blocks whose
outputs on the calibration set are most alike, keeping depth order.

A block's output here is its residual update, attention output + MLP output ([N, d_model] on the
paired calibration rows), not the residual stream after it: the stream carries the embedding and
every earlier update, so it changes slowly with depth and all blocks look alike in it.

Similarity: linear CKA (Kornblith et al. 2019), invariant to rotations and isotropic scaling of
either side, and defined across widths:

    CKA(X, Y) = |Ycᵀ Xc|_F² / (|Xcᵀ Xc|_F · |Ycᵀ Yc|_F),  Xc, Yc: columns centered

A block whose update is zero on the data (nothing to compare) has CKA 0 with everything.

Pairing: a dynamic program over the matrix S [L_t, L_s] maximizes Σ_i S[i, j(i)] over maps j that
never go back in depth (j(i) <= j(i + 1)). Source blocks may be skipped (a deeper source) and reused
by consecutive target blocks (a deeper target), as the relative-depth rule does.
"""
from __future__ import annotations

import torch

__all__ = ["linear_cka", "cka_matrix", "monotone_match"]


def _gram_terms(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    xc = (x - x.mean(0)).double()
    return xc, float(torch.linalg.matrix_norm(xc.T @ xc))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of x: [N, p] and y: [N, q] (rows paired); 0 when either is constant."""
    xc, nx = _gram_terms(x)
    yc, ny = _gram_terms(y)
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(yc.T @ xc)) ** 2 / (nx * ny)


def cka_matrix(target: list[torch.Tensor], source: list[torch.Tensor]) -> torch.Tensor:
    """S [L_t, L_s] float64: S[i, j] = linear_cka(target[i], source[j]); each block's [N, d] rows."""
    t = [_gram_terms(x) for x in target]
    s = [_gram_terms(y) for y in source]
    out = torch.zeros(len(t), len(s), dtype=torch.float64)
    for i, (xc, nx) in enumerate(t):
        for j, (yc, ny) in enumerate(s):
            if nx > 0.0 and ny > 0.0:
                out[i, j] = float(torch.linalg.matrix_norm(yc.T @ xc)) ** 2 / (nx * ny)
    return out


def monotone_match(sim: torch.Tensor) -> dict[int, int]:
    """{target block i: source block j(i)} maximizing Σ_i sim[i, j(i)] with j non-decreasing in i.
    sim: [L_t, L_s]. Ties go to the shallower source block, so the answer is deterministic."""
    n_t, n_s = sim.shape
    s = sim.double().tolist()
    # best[i][j]: the best sum over target blocks 0..i with j(i) = j; prefix maxima make it O(L_t·L_s)
    best = [s[0][:]]
    arg: list[list[int]] = []
    for i in range(1, n_t):
        prev, run, run_j, row, back = best[-1], -float("inf"), 0, [], []
        for j in range(n_s):
            if prev[j] > run:
                run, run_j = prev[j], j
            row.append(run + s[i][j])
            back.append(run_j)
        best.append(row)
        arg.append(back)
    j = max(range(n_s), key=lambda k: (best[-1][k], -k))
    out = {n_t - 1: j}
    for i in range(n_t - 1, 0, -1):
        j = arg[i - 1][j]
        out[i - 1] = j
    return dict(sorted(out.items()))
