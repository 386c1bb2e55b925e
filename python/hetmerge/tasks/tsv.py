"""Task Singular Vectors merge, TSV-M (Gargiulo et al. 2025): per matrix, keep each task's top
singular components, decorrelate the stacked task singular vectors (orthogonal Procrustes: the
polar factor), rebuild the update. Non-matrix tensors (biases, norms) take task arithmetic."""
from __future__ import annotations

import torch

from .plumbing import add_scaled, work_dtype
from .registry import TensorContext, register_task_method
from .task_arithmetic import task_arithmetic

__all__ = ["as_matrix", "top_svd", "polar", "tsv_rank"]


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """[shape[0], prod(shape[1:])]: a conv kernel [out, in, *k] is merged as the matrix of its unfolding."""
    return x.reshape(x.shape[0], -1)


def top_svd(tau: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m, k], σ [k], Vh [k, n]) of the k largest singular values of the matrix tau [m, n]."""
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of a = P S Qᵀ: the matrix with orthonormal columns (rows, for a
    wide a) nearest to a in Frobenius norm (orthogonal Procrustes)."""
    P, _, Qh = torch.linalg.svd(a, full_matrices=False)
    return P @ Qh


def tsv_rank(m: int, n: int, T: int, rank) -> int:
    """Components kept per task: `rank` (clipped to min(m, n)), else ⌊min(m, n)/T⌋ — the 1/T share that
    fills the stacked bases exactly — and at least 1, so that a matrix narrower than T still moves."""
    r = min(m, n)
    return max(1, min(r, rank) if rank is not None else r // T)


def check_options(options: dict) -> None:
    r = options["rank"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"rank: expected a positive int (components kept per task) or None, got {r!r}")


@register_task_method("tsv", options={"rank": None}, check=check_options)
def tsv(base: torch.Tensor, experts: list, ctx: TensorContext) -> torch.Tensor:
    """θ_0 + scale · U⊥ diag(σ) V⊥ᵀ per matrix (stacked top-1/T task singular vectors, orthogonalised)."""
    if base.dim() < 2 or base.numel() == 0:
        return task_arithmetic(base, experts, ctx)
    wd = work_dtype(base)
    b = as_matrix(base).to(wd)
    m, n = b.shape
    k = tsv_rank(m, n, len(experts), ctx.options["rank"])
    Us, Ss, Vhs = [], [], []
    for e in experts:
        U, S, Vh = top_svd(as_matrix(e).to(wd) - b, k)
        Us.append(U)
        Ss.append(S)
        Vhs.append(Vh)
    U_perp = polar(torch.cat(Us, 1))        # [m, T·k]
    Vh_perp = polar(torch.cat(Vhs, 0))      # [T·k, n]
    update = (U_perp * torch.cat(Ss)) @ Vh_perp
    return add_scaled(base, [update.reshape(base.shape)], [ctx.scale])
