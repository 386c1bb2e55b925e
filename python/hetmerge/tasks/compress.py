"""TSV-C (Gargiulo et al. 2025): store each task as the base plus the top-k singular components of
its per-matrix task vectors; reconstruct each expert on demand."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .plumbing import check_finite as _check_finite
from .plumbing import check_inputs, new_module, work_dtype
from .tsv import as_matrix, top_svd, tsv_rank

__all__ = ["CompressedTasks", "compress_tasks"]


@dataclass
class CompressedTasks:
    """T experts as low-rank task vectors on one base.

    factors[t][name] = (Uσ: [m, k], Vh: [k, n]) for the matrices (conv kernels unfolded to
    [out, in·kh·kw]); dense[t][name] = θ_t, the expert's own tensor (exact), for the other float
    tensors and for matrices whose rank-k factors would not be smaller. ranks[name]: k used for
    that matrix. bytes_dense: the T task vectors
    stored in full (what T expert checkpoints cost on top of the base); bytes_compressed: what is
    stored here (factors + dense parts), both in the base's dtype.
    """
    base: nn.Module | dict
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    dense: list[dict[str, torch.Tensor]]
    ranks: dict[str, int]
    bytes_dense: int
    bytes_compressed: int
    keys: list[str] = field(default_factory=list)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_dense - self.bytes_compressed

    @property
    def ratio(self) -> float:
        """bytes_dense / bytes_compressed (> 1: smaller)."""
        return self.bytes_dense / max(1, self.bytes_compressed)

    def __len__(self) -> int:
        return len(self.factors)

    def expert_state(self, t: int) -> dict[str, torch.Tensor]:
        """Expert t's reconstructed state dict: θ_0 + U_k σ_k V_kᵀ per factored matrix, θ_t elsewhere."""
        if isinstance(t, bool) or not isinstance(t, int) or not -len(self) <= t < len(self):
            raise IndexError(f"t: expert index must be an int in [0, {len(self)}), got {t!r}")
        sb = self.base.state_dict() if isinstance(self.base, nn.Module) else self.base
        out = {}
        for k, a in sb.items():
            a = a.detach()
            if k in self.factors[t]:
                us, vh = self.factors[t][k]
                wd = work_dtype(a)
                out[k] = (a.to(wd) + (us.to(wd) @ vh.to(wd)).reshape(a.shape)).to(a.dtype)
            elif k in self.dense[t]:
                out[k] = self.dense[t][k].clone()
            else:
                out[k] = a.clone()
        return out

    def expert(self, t: int) -> nn.Module:
        """Expert t as a new module of the base's architecture (needs a module base)."""
        if not isinstance(self.base, nn.Module):
            raise TypeError("expert: the base was given as a state dict; use expert_state(t)")
        return new_module(self.base, self.expert_state(t))


def compress_tasks(base: Any, experts: Any, k: int | None = None, *, check_finite: bool = True,
                   non_float: str = "error") -> CompressedTasks:
    """Compress T experts of one base: each matrix task vector τ_t is kept as its top-k singular
    components (k per matrix clipped to min(m, n); default ⌊min(m, n)/T⌋, at least 1: the TSV paper's
    1/T share); other float tensors are kept dense. base and experts are left untouched.

    base: nn.Module (or state dict); experts: list of modules / state dicts of the base's architecture.
    check_finite, non_float: as in merge_tasks.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive int (singular components kept per task and matrix) or None, "
                         f"got {k!r}")
    sb, states = check_inputs(base, experts, non_float)
    T = len(states)
    factors = [dict() for _ in range(T)]
    dense = [dict() for _ in range(T)]
    ranks: dict[str, int] = {}
    bytes_dense = bytes_comp = 0
    with torch.no_grad():
        for key, a in sb.items():
            if not a.is_floating_point():
                continue
            ex = [s[key] for s in states]
            if check_finite:
                _check_finite(key, a, ex)
            es = a.element_size()
            bytes_dense += T * a.numel() * es
            wd = work_dtype(a)
            if a.dim() >= 2 and a.numel():
                m, n = as_matrix(a).shape
                r = tsv_rank(m, n, T, k)
                if r * (m + n) < m * n:
                    ranks[key] = r
                    for t, e in enumerate(ex):
                        U, S, Vh = top_svd(as_matrix(e).to(wd) - as_matrix(a).to(wd), r)
                        factors[t][key] = ((U * S).to(a.dtype), Vh.to(a.dtype))
                    bytes_comp += T * r * (m + n) * es
                    continue
            for t, e in enumerate(ex):   # the expert's own tensor: exact, and as large as τ_t
                dense[t][key] = e.to(a.dtype, copy=True)
            bytes_comp += T * a.numel() * es
    return CompressedTasks(base, factors, dense, ranks, bytes_dense, bytes_comp, list(sb))
