"""The native primitives of hetmerge (DESIGN.md, "Native primitives").

Every function takes torch tensors (CPU or CUDA) or numpy arrays, in any strides, and returns the
caller's type on the caller's device. Outputs are new contiguous arrays unless ``out=`` is given
(sweeps reuse buffers that way: writing into fresh memory is page-fault bound). Index maps follow
DESIGN.md: ``src[i] = j`` puts target unit j in base slot i, ``-1`` is zero padding.
Arguments are validated in C++; every violated precondition raises ValueError or TypeError naming
the argument. None of these functions is differentiable.
"""
from __future__ import annotations

from typing import Any, Sequence

from . import _backend as B

__all__ = ["permute_pad", "interpolate", "weighted_sum", "cost_matrix", "linear_assignment",
           "linear_assignment_batched"]


def permute_pad(w: Any, rows: Any, cols: Any = None, *, out: Any = None):
    """Gather and zero-pad the first two axes of ``w``.

    w: [n0, n1, *trailing] (or [n0]); rows: [m0] int64, -1 = padding; cols: [m1] int64 or None.
    Returns out: [m0, m1 (or n1), *trailing] with ``out[i, j, ...] = w[rows[i], cols[j], ...]``, 0
    where rows[i] or cols[j] is -1. ``rows=None`` keeps axis 0 as is.
    """
    fn = "permute_pad"
    w = B.as_array(w, fn, "w")
    if w.ndim == 0:
        raise ValueError(f"{fn}: w must have at least 1 dimension, got a 0-D {type(w).__name__}")
    rows = B.index_map(rows, fn, "rows", w)
    cols = B.index_map(cols, fn, "cols", w)
    shape = list(B.shape_of(w))
    if rows is not None and rows.ndim >= 1:
        shape[0] = int(rows.shape[0])
    if cols is not None and cols.ndim >= 1 and w.ndim >= 2:
        shape[1] = int(cols.shape[0])
    out = B.empty_like_framework(shape, w) if out is None else B.check_out(out, fn, w)
    mod, extra = B.backend(w, fn)
    mod.permute_pad(w, rows, cols, out, **extra)
    return out


def interpolate(a: Any, b: Any, lambdas: Any, rows: Any = None, cols: Any = None, fill: str = "zero", *,
                out: Any = None):
    """Merge ``b`` into ``a`` at K merging factors in one pass.

    a: [n0, n1, *trailing] (base); b: [m0, m1, *trailing] (target); lambdas: [K];
    rows: [n0] / cols: [n1] int64 maps from base slots to target units (-1 = padding, None = same).
    Returns out: [K, *a.shape] with ``out[k] = (1 - lambdas[k]) * a + lambdas[k] * b~`` where
    ``b~ = permute_pad(b, rows, cols)``. ``fill="base"``: where b~ is padding it takes a's value,
    so base units with no partner are left untouched instead of shrinking toward zero.
    """
    fn = "interpolate"
    a = B.as_array(a, fn, "a")
    b = B.as_array(b, fn, "b")
    if fill not in ("zero", "base"):
        raise ValueError(f"{fn}: fill must be 'zero' or 'base', got {fill!r}")
    lam = B.float_list(lambdas, fn, "lambdas")
    rows = B.index_map(rows, fn, "rows", a)
    cols = B.index_map(cols, fn, "cols", a)
    if B.is_torch(a) != B.is_torch(b):
        raise TypeError(f"{fn}: a and b must both be torch tensors or both numpy arrays, got {type(a).__name__} and {type(b).__name__}")
    shape = (len(lam), *B.shape_of(a))
    out = B.empty_like_framework(shape, a) if out is None else B.check_out(out, fn, a)
    mod, extra = B.backend(a, fn)
    mod.interpolate(a, b, lam, rows, cols, fill == "base", out, **extra)
    return out


def weighted_sum(tensors: Sequence[Any], coeffs: Any, *, out: Any = None):
    """``out[k] = sum_t coeffs[k, t] * tensors[t]`` for K coefficient rows in one pass.

    tensors: T arrays of one shape; coeffs: [K, T] (or [T] for a single combination, giving K = 1).
    Returns out: [K, *shape]. Model soups, task arithmetic and learned mixing coefficients.
    """
    fn = "weighted_sum"
    if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__len__"):
        raise TypeError(f"{fn}: tensors must be a sequence of arrays")
    arrays = [B.as_array(t, fn, f"tensors[{i}]") for i, t in enumerate(tensors)]
    if not arrays:
        raise ValueError(f"{fn}: tensors must not be empty")
    import numpy as np
    import torch

    c = coeffs.detach().cpu().numpy() if isinstance(coeffs, torch.Tensor) else np.asarray(coeffs, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != len(arrays):
        raise ValueError(f"{fn}: coeffs must have shape (K, {len(arrays)}), got {tuple(c.shape)}")
    if not np.isfinite(c).all():
        raise ValueError(f"{fn}: coeffs contains a non-finite value")
    ref = arrays[0]
    for i, t in enumerate(arrays[1:], 1):
        if B.is_torch(t) != B.is_torch(ref):
            raise TypeError(f"{fn}: tensors[{i}] is a {type(t).__name__} but tensors[0] is a {type(ref).__name__}")
    K = int(c.shape[0])
    shape = (K, *B.shape_of(ref))
    out = B.empty_like_framework(shape, ref) if out is None else B.check_out(out, fn, ref)
    mod, extra = B.backend(ref, fn)
    mod.weighted_sum(arrays, c.reshape(-1).tolist(), K, out, **extra)
    return out


COST_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def cost_matrix(terms: Sequence[Any], *, out: Any = None, precision: str = "fp32"):
    """Weight- or activation-matching cost of one permutation group, padding never materialized.

    terms: sequence of (A, B, map, block) (map and block optional: None and 1), with
    A: [n_a, k·block], B: [n_b, k'·block], map: [k] int64 into B's k' inner groups (-1 = skip) or None.
    A and B: float32, float64, float16 or bfloat16 (one dtype per call).
    Returns C: [n_a, n_b], float32 (float64 for float64 inputs; float16/bfloat16 accumulate in float32):
    ``C[i, j] = sum_terms sum_{q: map[q] >= 0} sum_{r < block} A[i, q·block + r] · B[j, map[q]·block + r]``.
    precision: "fp32" computes in the input dtype; on CUDA, float32 inputs may use tensor cores
    with "tf32", "bf16" or "fp16" operands and float32 accumulation (accuracy in docs/cuda.md).
    """
    fn = "cost_matrix"
    if precision not in COST_PRECISIONS:
        raise ValueError(f"{fn}: precision must be one of {COST_PRECISIONS}, got {precision!r}")
    if isinstance(terms, (str, bytes)) or not hasattr(terms, "__len__"):
        raise TypeError(f"{fn}: terms must be a sequence of (A, B, map, block) tuples")
    if len(terms) == 0:
        raise ValueError(f"{fn}: terms must not be empty")
    norm = []
    for t, term in enumerate(terms):
        if not isinstance(term, (tuple, list)) or not 2 <= len(term) <= 4:
            raise ValueError(f"{fn}: terms[{t}] must be a tuple (A, B[, map[, block]])")
        A = B.as_array(term[0], fn, f"terms[{t}].A")
        Bm = B.as_array(term[1], fn, f"terms[{t}].B")
        m = B.index_map(term[2] if len(term) > 2 else None, fn, f"terms[{t}].map", A)
        block = term[3] if len(term) > 3 else 1
        if isinstance(block, bool) or not isinstance(block, int) and not hasattr(block, "__index__"):
            raise TypeError(f"{fn}: terms[{t}].block must be an int, got {type(block).__name__}")
        norm.append((A, Bm, m, int(block)))
    A0, B0 = norm[0][0], norm[0][1]
    n_a = int(A0.shape[0]) if A0.ndim >= 1 else 0
    n_b = int(B0.shape[0]) if B0.ndim >= 1 else 0
    out = B.empty_like_framework((n_a, n_b), A0, _cost_out_dtype(A0)) if out is None else B.check_out(out, fn, A0)
    mod, extra = B.backend(A0, fn)
    if B.is_cuda(A0):
        extra["precision"] = precision
    elif precision != "fp32":
        raise ValueError(f"{fn}: precision={precision!r} uses CUDA tensor cores; CPU inputs support only 'fp32'")
    mod.cost_matrix(norm, out, **extra)
    return out


def _cost_out_dtype(a: Any):
    """C's dtype for inputs like ``a``: float64 stays float64, everything else gives float32."""
    import numpy as np
    import torch

    if B.is_torch(a):
        return torch.float64 if a.dtype == torch.float64 else torch.float32
    return np.float64 if a.dtype == np.float64 else np.float32


def linear_assignment(cost: Any, maximize: bool = False):
    """Exact linear assignment with scipy.optimize.linear_sum_assignment's contract.

    cost: [n_rows, n_cols], rectangular allowed; +inf (-inf when maximizing) marks a forbidden pair.
    float32/float64 are solved as they are; like scipy, integer, boolean and float16 arrays, lists
    and object arrays of numbers are converted (to float64; float16/bfloat16 exactly to float32).
    Returns (row_ind, col_ind), int64 of length min(n_rows, n_cols), rows sorted, with the optimal
    total. Raises ValueError for NaN, a wrong shape or when no finite assignment exists, TypeError
    for values that are not real numbers.
    """
    fn = "linear_assignment"
    import numpy as np
    import torch

    cost = _assignment_input(cost, fn)
    if cost.ndim != 2:
        raise ValueError(f"{fn}: cost must be 2-D (expected a matrix), got shape {B.shape_of(cost)}")
    n = min(int(cost.shape[0]), int(cost.shape[1]))
    index_dtype = torch.int64 if isinstance(cost, torch.Tensor) else np.int64
    row_ind = B.empty_like_framework((n,), cost, index_dtype)
    col_ind = B.empty_like_framework((n,), cost, index_dtype)
    mod, extra = B.backend(cost, fn)
    mod.linear_assignment(cost, bool(maximize), row_ind, col_ind, **extra)
    return row_ind, col_ind


def linear_assignment_batched(cost: Any, maximize: bool = False):
    """``linear_assignment`` of every matrix of a batch, the matrices spread over hetmerge's threads.

    cost: [B, n_rows, n_cols] (any strides; converted like linear_assignment's cost). Returns
    (row_ind, col_ind), int64 [B, min(n_rows, n_cols)]: row b is linear_assignment(cost[b])'s
    answer. Many small problems (the per-head blocks of attention alignment) cost one call instead
    of B. CUDA tensors are solved one matrix at a time on the device.
    """
    fn = "linear_assignment_batched"
    import numpy as np
    import torch

    cost = _assignment_input(cost, fn)
    if cost.ndim != 3:
        raise ValueError(f"{fn}: cost must be 3-D [batch, n_rows, n_cols], got shape {B.shape_of(cost)}")
    k = min(int(cost.shape[1]), int(cost.shape[2]))
    if B.is_cuda(cost):
        pairs = [linear_assignment(c, maximize) for c in cost]
        empty = torch.empty((0, k), dtype=torch.int64, device=cost.device)
        return (torch.stack([p[0] for p in pairs]) if pairs else empty,
                torch.stack([p[1] for p in pairs]) if pairs else empty)
    index_dtype = torch.int64 if isinstance(cost, torch.Tensor) else np.int64
    row_ind = B.empty_like_framework((int(cost.shape[0]), k), cost, index_dtype)
    col_ind = B.empty_like_framework((int(cost.shape[0]), k), cost, index_dtype)
    if cost.shape[0] and k:
        B._C.linear_assignment_batched(cost, bool(maximize), row_ind, col_ind)
    return row_ind, col_ind


def _assignment_input(cost: Any, fn: str):
    """cost as a float32/float64 array, converted the way scipy's linear_sum_assignment converts it.

    scipy takes any array-like and casts it to float64 under numpy's "safe" rule, so integers and
    booleans pass while strings, complex, datetimes and long double raise TypeError; sequences
    are converted element by element (float() on each: ValueError for "abc", TypeError for None).
    Object arrays are converted element by element too, like the sequences they usually come from.
    """
    import numpy as np
    import torch

    if not isinstance(cost, np.ndarray) and (isinstance(cost, torch.Tensor) or hasattr(cost, "__dlpack__")):
        t = B.as_array(cost, fn, "cost")
        if t.dtype in (torch.float32, torch.float64):
            return t
        if t.dtype in (torch.float16, torch.bfloat16):
            return t.to(torch.float32)  # exact
        if t.dtype == torch.bool or not (t.dtype.is_floating_point or t.dtype.is_complex):
            return t.to(torch.float64)
        raise TypeError(f"{fn}: cost must hold real numbers; cannot cast {t.dtype} to float64")
    if isinstance(cost, np.ndarray) or hasattr(cost, "__array__") or hasattr(cost, "__array_interface__"):
        arr = np.asarray(cost)  # matrix and masked-array subclasses drop to plain arrays, as in scipy
        if arr.dtype == object:
            return _convert_elements(arr, fn)
        if not np.can_cast(arr.dtype, np.float64, "safe"):
            raise TypeError(f"{fn}: cost must hold real numbers: Cannot cast array data from {arr.dtype!r} "
                            "to dtype('float64') according to the rule 'safe'")
        if arr.dtype in (np.float32, np.float64):
            return arr
        return arr.astype(np.float32 if arr.dtype == np.float16 else np.float64)
    return _convert_elements(cost, fn)


def _convert_elements(values: Any, fn: str):
    import numpy as np

    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # same exception type as scipy, naming the argument
        raise type(exc)(f"{fn}: cost: {exc}") from exc
