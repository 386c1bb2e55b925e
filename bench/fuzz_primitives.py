"""Fuzz the five native primitives: random shapes (0 included), strides, dtypes, index maps, special
values and aliasing out=, numpy and torch. Every call must either raise a clean Python exception for
an input the contract rejects, or return what an independent numpy/scipy reference computes.

Batches run in worker subprocesses, so a segfault or abort is caught and counted with the seed
that reproduces it (``--replay SEED`` reruns that batch in-process, printing each call first).

    python bench/fuzz_primitives.py --calls 100000 --seed 0 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict

import numpy as np

PRIMITIVES = ["permute_pad", "interpolate", "weighted_sum", "cost_matrix", "linear_assignment"]
FLOATS = ["float32", "float64", "bfloat16", "float16"]
WRONG = ["int32", "int64", "bool", "complex64"]
CLEAN = (ValueError, TypeError, BufferError, IndexError)  # what a rejected input may raise
EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
# Spacing of the subnormals: the absolute rounding error of a result near zero.
TINY = {"float64": 2.0 ** -1074, "float32": 2.0 ** -149, "bfloat16": 2.0 ** -133, "float16": 2.0 ** -24}
SIZES = [0, 1, 2, 3, 5, 8, 17]


class Expect:
    """What the contract says about one call: 'ok' (match the reference), 'reject', or 'either'."""

    def __init__(self, kind: str, check=None):
        self.kind, self.check = kind, check


# ---- random arrays ------------------------------------------------------------------------------

def _torch():
    import torch
    return torch


def tdtype(name: str):
    return getattr(_torch(), name)


def f64(x) -> np.ndarray:
    """The values of x as float64 (what the reference computes on)."""
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy() if not x.dtype.is_complex else x.real.double().numpy()
    return np.asarray(x).astype(np.float64)


def size(x) -> int:
    return int(x.size) if isinstance(x, np.ndarray) else int(x.numel())


def values(rng, shape, special: bool) -> np.ndarray:
    v = np.asarray(rng.standard_normal(shape) * rng.choice([1.0, 100.0]))
    if special and v.size:
        flat = v.reshape(-1)
        for _ in range(int(rng.integers(1, 3))):
            flat[rng.integers(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return v


def array(rng, shape, dtype: str, fw: str, special=False, layout=None):
    """A random array of `shape` in a random memory layout (contiguous, column-major, sliced with
    steps, expanded with stride 0, or reversed with negative strides for numpy)."""
    torch = _torch()
    shape = tuple(int(s) for s in shape)
    if fw == "numpy" and dtype == "bfloat16":
        fw = "torch"  # numpy has no bfloat16
    layout = layout or rng.choice(["c", "c", "t", "slice", "expand", "flip"])
    v = values(rng, shape, special)
    if layout == "expand" and len(shape) and shape[0] > 1:
        v = np.broadcast_to(v[:1], shape)

    def cast(a):
        if fw == "torch":
            t = torch.from_numpy(np.ascontiguousarray(a))
            if dtype == "bool":
                return t > 0
            return t.to(tdtype(dtype))
        return (a > 0) if dtype == "bool" else a.astype(dtype)

    if layout == "t" and len(shape) >= 2:
        x = cast(np.ascontiguousarray(np.swapaxes(v, 0, 1)))
        return x.transpose(0, 1) if fw == "torch" else np.swapaxes(x, 0, 1)
    if layout == "slice" and len(shape):
        big_shape = tuple(2 * s + 1 for s in shape)
        big = cast(np.zeros(big_shape))
        idx = tuple(slice(1, 1 + 2 * s, 2) for s in shape)
        big[idx] = cast(v)
        return big[idx]
    if layout == "expand" and len(shape) and shape[0] > 1:
        one = cast(np.ascontiguousarray(v[:1]))
        return one.expand(*shape) if fw == "torch" else np.broadcast_to(one, shape)
    if layout == "flip" and fw == "numpy" and len(shape):
        return cast(np.ascontiguousarray(v[::-1]))[::-1]
    return cast(v)


def index_map(rng, n_src: int, length: int, fw: str):
    """(map as passed, valid, int64 values or None). Valid: entries in [-1, n_src), non-negative
    ones distinct. Some maps are corrupted: out of range, below -1, duplicated, float, bool."""
    torch = _torch()
    n_real = min(length, n_src)
    n_real = int(rng.integers(0, n_real + 1)) if rng.random() < 0.5 else n_real
    m = np.full(length, -1, dtype=np.int64)
    pos = rng.choice(length, n_real, replace=False) if length else np.zeros(0, np.int64)
    m[pos] = rng.choice(n_src, n_real, replace=False) if n_real else []
    valid, dtype = True, np.int64
    r = rng.random()
    if length and r < 0.04:
        m[rng.integers(length)] = n_src + int(rng.integers(0, 3))
        valid = False
    elif length and r < 0.07:
        m[rng.integers(length)] = -2 - int(rng.integers(0, 1000))
        valid = False
    elif length >= 2 and (m >= 0).sum() >= 1 and r < 0.10:
        j = int(rng.choice(np.flatnonzero(m >= 0)))
        k = int(rng.choice([i for i in range(length) if i != j]))
        m[k] = m[j]
        valid = False
    elif r < 0.12:
        dtype, valid = np.float64, length == 0  # np.asarray([]) is float64: allowed, unless a float tensor
    elif r < 0.13 and length:
        dtype, valid = np.bool_, False
    elif r < 0.16:
        dtype = np.int32
    out_vals = m.copy()
    kind = rng.choice(["numpy", "torch", "list", "strided"]) if fw == "torch" else rng.choice(["numpy", "list", "torch"])
    arr = m.astype(dtype)
    if kind == "list":
        obj = arr.tolist()
    elif kind == "torch" or kind == "strided":
        t = torch.from_numpy(arr)
        if kind == "strided" and length:
            big = torch.zeros(2 * length, dtype=t.dtype)
            big[::2] = t
            t = big[::2]
        obj = t
        if dtype == np.float64:
            valid = False  # float tensors are never index maps
    else:
        obj = arr
    return obj, valid, out_vals if valid else None


def gather(x: np.ndarray, idx, axis: int) -> np.ndarray:
    """x.take(idx, axis) with zeros where idx == -1 (the reference for padding)."""
    if idx is None:
        return x
    out_shape = list(x.shape)
    out_shape[axis] = len(idx)
    out = np.zeros(out_shape)
    keep = idx >= 0
    if keep.any():
        sl = [slice(None)] * x.ndim
        sl[axis] = np.flatnonzero(keep)
        out[tuple(sl)] = np.take(x, idx[keep], axis=axis)
    return out


def present(shape, idx, axis: int) -> np.ndarray:
    ones = np.ones(shape)
    return gather(ones, idx, axis)


def rand_dtype(rng) -> str:
    return str(rng.choice(FLOATS)) if rng.random() < 0.93 else str(rng.choice(WRONG))


def fw_of(rng) -> str:
    return str(rng.choice(["numpy", "torch"]))


def close(got, ref: np.ndarray, bound: np.ndarray) -> bool:
    """Where the reference is finite, |got - ref| <= bound; elsewhere (inf/NaN inputs meeting in a
    formula that may be evaluated differently) no claim."""
    g = f64(got)
    if g.shape != ref.shape:
        return False
    fin = np.isfinite(ref)
    return bool(np.all(np.abs(g[fin] - ref[fin]) <= bound[fin]))


def alias_out(rng, src, out_shape, fw):
    """An out= that overlaps src's memory (src contiguous, same dtype), or None if impossible."""
    torch = _torch()
    n_out = int(np.prod(out_shape)) if len(out_shape) else 1
    if n_out == 0:
        return None
    if fw == "torch":
        buf = torch.zeros(src.numel() + n_out, dtype=src.dtype)
        buf[: src.numel()] = src.reshape(-1)
        off = int(rng.integers(0, max(1, src.numel())))
        return buf[: src.numel()].view(src.shape), buf[off: off + n_out].view(out_shape)
    buf = np.zeros(src.size + n_out, dtype=src.dtype)
    buf[: src.size] = src.reshape(-1)
    off = int(rng.integers(0, max(1, src.size)))
    return buf[: src.size].reshape(src.shape), buf[off: off + n_out].reshape(out_shape)


def alias_map_out(vals: np.ndarray, out_shape, dtype: str, fw: str):
    """(map, out): an int64 map holding `vals` and an out= of `dtype` over the same bytes (the map
    is read while out is written), or None when either is empty."""
    torch = _torch()
    n = int(np.prod(out_shape)) if len(out_shape) else 1
    if n == 0 or len(vals) == 0:
        return None
    if fw == "numpy" and dtype == "bfloat16":
        return None
    size = len(vals) + n + 1  # int64 elements: enough for n elements of any float dtype
    if fw == "torch":
        buf = torch.zeros(size, dtype=torch.int64)
        buf[: len(vals)] = torch.from_numpy(vals)
        return buf[: len(vals)], buf.view(tdtype(dtype))[:n].view(tuple(out_shape))
    buf = np.zeros(size, dtype=np.int64)
    buf[: len(vals)] = vals
    return buf[: len(vals)], buf.view(dtype)[:n].reshape(out_shape)


# ---- the primitives' call generators: (call, Expect) -----------------------------------------------

def gen_permute_pad(rng, ops):
    fw, dtype = fw_of(rng), rand_dtype(rng)
    ndim = int(rng.choice([1, 2, 2, 3]))
    shape = [int(rng.choice(SIZES)) for _ in range(ndim)]
    w = array(rng, shape, dtype, fw, special=rng.random() < 0.2)
    fw = "torch" if not isinstance(w, np.ndarray) else "numpy"
    ok = dtype in FLOATS
    rows = cols = rv = cv = None
    if rng.random() < 0.8:
        rows, valid, rv = index_map(rng, shape[0], int(rng.choice(SIZES)), fw)
        ok &= valid
    if rng.random() < (0.8 if ndim >= 2 else 0.05):
        cols, valid, cv = index_map(rng, shape[1] if ndim >= 2 else 1, int(rng.choice(SIZES)), fw)
        ok &= valid and ndim >= 2
    kw, aliased = {}, False
    out_shape = list(shape)
    if rv is not None:
        out_shape[0] = len(rv)
    if cv is not None and ndim >= 2:
        out_shape[1] = len(cv)
    r = rng.random()
    if r < 0.1 and ok and dtype in FLOATS:
        w_c = w.contiguous() if fw == "torch" else np.ascontiguousarray(w)
        pair = alias_out(rng, w_c, out_shape, fw)
        if pair is not None and size(w_c):
            w, kw["out"], aliased = pair[0], pair[1], True
    elif r < 0.14 and ok and (rv is not None or cv is not None):
        use_rows = cv is None or (rv is not None and rng.random() < 0.5)
        pair = alias_map_out(rv if use_rows else cv, out_shape, dtype, fw)
        if pair is not None:
            aliased = True
            if use_rows:
                rows, kw["out"] = pair
            else:
                cols, kw["out"] = pair
    elif r < 0.2:
        kw["out"] = array(rng, out_shape, dtype if rng.random() < 0.8 else "float64", fw, layout="c")
        if rng.random() < 0.2:
            ok = False
            kw["out"] = array(rng, [s + 1 for s in out_shape], dtype, fw, layout="c")
        elif kw["out"].dtype != w.dtype:
            ok = False
    if aliased:
        return (lambda: ops.permute_pad(w, rows, cols, **kw)), Expect("reject")
    if not ok:
        return (lambda: ops.permute_pad(w, rows, cols, **kw)), Expect("reject")
    w64 = f64(w)
    ref = gather(gather(w64, rv, 0), cv, 1) if ndim >= 2 else gather(w64, rv, 0)

    def check(got):
        g = f64(got)
        return g.shape == ref.shape and bool(np.array_equal(g, ref, equal_nan=True)) and str(got.dtype).split(".")[-1] == dtype
    return (lambda: ops.permute_pad(w, rows, cols, **kw)), Expect("ok", check)


def gen_interpolate(rng, ops):
    fw, dtype = fw_of(rng), rand_dtype(rng)
    ndim = int(rng.choice([1, 2, 2, 3]))
    a_shape = [int(rng.choice(SIZES)) for _ in range(ndim)]
    b_shape = list(a_shape)
    ok = dtype in FLOATS
    rows = cols = rv = cv = None
    if rng.random() < 0.7:
        b_shape[0] = int(rng.choice(SIZES))
        rows, valid, rv = index_map(rng, b_shape[0], a_shape[0] if rng.random() < 0.95 else a_shape[0] + 1, fw)
        ok &= valid and (rv is None or len(rv) == a_shape[0])
    if ndim >= 2 and rng.random() < 0.7:
        b_shape[1] = int(rng.choice(SIZES))
        cols, valid, cv = index_map(rng, b_shape[1], a_shape[1], fw)
        ok &= valid
    if rng.random() < 0.05 and ndim >= 3:
        b_shape[2] += 1
        ok = False
    if (rows is None and b_shape[0] != a_shape[0]) or (ndim >= 2 and cols is None and b_shape[1] != a_shape[1]):
        ok = False
    a = array(rng, a_shape, dtype, fw, special=rng.random() < 0.2)
    b_dtype = dtype if rng.random() < 0.95 else str(rng.choice(FLOATS))
    b_fw = fw if rng.random() < 0.97 else ("numpy" if fw == "torch" else "torch")
    b = array(rng, b_shape, b_dtype, b_fw, special=rng.random() < 0.2)
    fw = "torch" if not isinstance(a, np.ndarray) else "numpy"
    if (not isinstance(b, np.ndarray)) != (fw == "torch") or str(b.dtype) != str(a.dtype):
        ok = False
    K = int(rng.choice([0, 1, 2, 3]))
    lam = rng.uniform(-0.5, 1.5, K)
    if K and rng.random() < 0.05:
        lam[rng.integers(K)] = rng.choice([np.nan, np.inf])
        ok = False
    lam_arg = lam if rng.random() < 0.5 else lam.tolist()
    fill = str(rng.choice(["zero", "base"])) if rng.random() < 0.98 else "nearest"
    ok &= fill in ("zero", "base")
    kw = {}
    if ok and (rv is not None or cv is not None) and rng.random() < 0.04:
        use_rows = cv is None or (rv is not None and rng.random() < 0.5)
        pair = alias_map_out(rv if use_rows else cv, [K, *a_shape], dtype, fw)
        if pair is not None:
            if use_rows:
                rows, kw["out"] = pair
            else:
                cols, kw["out"] = pair
            return (lambda: ops.interpolate(a, b, lam_arg, rows, cols, fill, **kw)), Expect("reject")
    if rng.random() < 0.08 and ok and size(a):
        a_c = a.contiguous() if fw == "torch" else np.ascontiguousarray(a)
        pair = alias_out(rng, a_c, [K, *a_shape], fw)
        if pair is not None:
            a, kw["out"] = pair
            return (lambda: ops.interpolate(a, b, lam_arg, rows, cols, fill, **kw)), Expect("reject")
    if not ok:
        return (lambda: ops.interpolate(a, b, lam_arg, rows, cols, fill, **kw)), Expect("reject")
    a64, b64 = f64(a), f64(b)
    bt = gather(b64, rv, 0)
    have = present(b64.shape, rv, 0)
    if ndim >= 2:
        bt, have = gather(bt, cv, 1), gather(have, cv, 1)
    if fill == "base":
        bt = np.where(have > 0, bt, a64)
    lam_b = lam.reshape(-1, *([1] * ndim))
    ref = (1 - lam_b) * a64 + lam_b * bt
    # λ is rounded to the accumulation type, which moves both terms: |λ||a| bounds that too.
    mag = (np.abs(1 - lam_b) + np.abs(lam_b)) * np.abs(a64) + np.abs(lam_b) * np.abs(bt)
    acc = "float64" if dtype == "float64" else "float32"
    bound = 2 * EPS[dtype] * np.abs(ref) + 4 * EPS[acc] * mag + TINY[dtype]

    def check(got):
        return close(got, ref, bound) and str(got.dtype).split(".")[-1] == dtype
    return (lambda: ops.interpolate(a, b, lam_arg, rows, cols, fill)), Expect("ok", check)


def gen_weighted_sum(rng, ops):
    fw, dtype = fw_of(rng), rand_dtype(rng)
    ndim = int(rng.choice([0, 1, 2, 3]))
    shape = [int(rng.choice(SIZES)) for _ in range(ndim)]
    T = int(rng.choice([0, 1, 2, 3, 4]))
    ok = dtype in FLOATS and T > 0
    tensors = []
    for t in range(T):
        s, d = list(shape), dtype
        if t and rng.random() < 0.03 and ndim:  # tensors[0] defines the shape and dtype
            s[0] += 1
            ok = False
        if t and rng.random() < 0.03:
            d = str(rng.choice(FLOATS))
            ok &= d == dtype
        tensors.append(array(rng, s, d, fw, special=rng.random() < 0.1))
    if tensors and any(isinstance(x, np.ndarray) != isinstance(tensors[0], np.ndarray) for x in tensors):
        ok = False
    if tensors and any(str(x.dtype) != str(tensors[0].dtype) for x in tensors):
        ok = False
    K = int(rng.choice([0, 1, 2, 3]))
    coeffs = rng.uniform(-2, 2, (K, T))
    one_row = K == 1 and rng.random() < 0.5
    if rng.random() < 0.03 and coeffs.size:
        coeffs[0, 0] = np.nan
        ok = False
    c_arg = coeffs[0] if one_row else coeffs
    if rng.random() < 0.03:
        c_arg = rng.uniform(-2, 2, (K, T + 1))
        ok = False
    if rng.random() < 0.3:
        c_arg = _torch().from_numpy(np.asarray(c_arg))
    kw = {}
    if ok and rng.random() < 0.08:
        t0 = tensors[0]
        t0c = np.ascontiguousarray(t0) if isinstance(t0, np.ndarray) else t0.contiguous()
        if size(t0c) and K:
            pair = alias_out(rng, t0c, [K, *shape], "numpy" if isinstance(t0c, np.ndarray) else "torch")
            if pair is not None:
                tensors[0], kw["out"] = pair
                return (lambda: ops.weighted_sum(tensors, c_arg, **kw)), Expect("reject")
    if not ok:
        return (lambda: ops.weighted_sum(tensors, c_arg, **kw)), Expect("reject")
    stack = np.stack([f64(x) for x in tensors])
    cm = coeffs if coeffs.ndim == 2 else coeffs[None]
    with np.errstate(invalid="ignore", over="ignore"):
        ref = np.tensordot(cm, stack, axes=(1, 0))
        mag = np.tensordot(np.abs(cm), np.abs(stack), axes=(1, 0))
    acc = "float64" if dtype == "float64" else "float32"
    bound = 2 * EPS[dtype] * np.abs(ref) + (T + 2) * EPS[acc] * mag + TINY[dtype]

    def check(got):
        return close(got, ref, bound) and str(got.dtype).split(".")[-1] == dtype
    return (lambda: ops.weighted_sum(tensors, c_arg)), Expect("ok", check)


def gen_cost_matrix(rng, ops):
    fw = fw_of(rng)
    dtype = str(rng.choice(["float32", "float64", "float32", "float64", "bfloat16", "float16"])) \
        if rng.random() < 0.95 else str(rng.choice(WRONG))
    n_a, n_b = int(rng.choice(SIZES)), int(rng.choice(SIZES))
    ok = dtype in FLOATS   # float16/bfloat16 inputs accumulate in float32 (cost_matrix takes all four)
    terms, refs = [], []
    for t in range(int(rng.choice([1, 1, 2, 3]))):
        block = int(rng.choice([1, 1, 2, 3]))
        k = int(rng.choice([0, 1, 2, 4, 7]))
        use_map = rng.random() < 0.6
        k2 = int(rng.choice([0, 1, 2, 4, 7])) if use_map else k
        rows_b = n_b if t == 0 or rng.random() < 0.97 else n_b + 1  # terms[0] defines n_b
        ok &= rows_b == n_b
        A = array(rng, [n_a, k * block + (1 if rng.random() < 0.02 else 0)], dtype, fw, special=rng.random() < 0.1)
        B = array(rng, [rows_b, k2 * block], dtype, fw, special=rng.random() < 0.1)
        if isinstance(A, np.ndarray) != isinstance(B, np.ndarray):
            ok = False
        term = [A, B]
        mv = None
        if use_map:
            m, valid, mv = index_map(rng, k2, k if rng.random() < 0.97 else k + 1, "numpy" if isinstance(A, np.ndarray) else "torch")
            ok &= valid
            term.append(m)
        # Valid when A's inner axis holds whole blocks, one per map entry (or B's groups, no map);
        # judged on the final shapes, since two corruptions (A one column wider, the map one
        # entry longer) can cancel out.
        groups, rem = divmod(A.shape[1], block)
        ok &= rem == 0 and (groups == len(mv) if mv is not None else not use_map and A.shape[1] == B.shape[1])
        k = groups
        with_block = block != 1 or rng.random() < 0.2
        if not use_map and (with_block or rng.random() < 0.3):
            term.append(None)
        if with_block:
            if rng.random() < 0.02:
                block = 0
                ok = False
            term.append(block)
        terms.append(tuple(term))
        if ok:
            A64, B64 = f64(A), f64(B)
            Bg = B64.reshape(B64.shape[0], k2, block)
            Bg = gather(Bg, mv, 1).reshape(B64.shape[0], k * block) if mv is not None else B64
            refs.append((A64, Bg))
    kinds = {type(x) for term in terms for x in term[:2]}
    dtypes = {str(x.dtype) for term in terms for x in term[:2]}
    if len(kinds) > 1 or len(dtypes) > 1:
        ok = False
    if not ok:
        return (lambda: ops.cost_matrix(terms)), Expect("reject")
    mapped = [t for t, term in enumerate(terms) if len(term) > 2 and term[2] is not None and len(term[2])]
    if mapped and rng.random() < 0.05:
        t = int(rng.choice(mapped))
        vals = f64(terms[t][2]).astype(np.int64) if not isinstance(terms[t][2], list) else np.array(terms[t][2], np.int64)
        out_dtype = "float64" if dtype == "float64" else "float32"
        pair = alias_map_out(vals, [n_a, n_b], out_dtype, "numpy" if isinstance(terms[0][0], np.ndarray) else "torch")
        if pair is not None:
            term = list(terms[t])
            term[2], out = pair
            terms[t] = tuple(term)
            return (lambda: ops.cost_matrix(terms, out=out)), Expect("reject")
    with np.errstate(invalid="ignore", over="ignore"):
        ref = sum(a @ b.T for a, b in refs)
        mag = sum(np.abs(a) @ np.abs(b).T for a, b in refs)
    kk = sum(a.shape[1] for a, _ in refs)
    acc = "float64" if dtype == "float64" else "float32"
    bound = (kk + 2) * EPS[acc] * mag + EPS[acc] * np.abs(ref)

    def check(got):
        return close(got, np.asarray(ref, dtype=np.float64).reshape(n_a, n_b), np.asarray(bound).reshape(n_a, n_b))
    return (lambda: ops.cost_matrix(terms)), Expect("ok", check)


def gen_linear_assignment(rng, ops):
    from scipy.optimize import linear_sum_assignment
    fw = fw_of(rng)
    dtype = str(rng.choice(["float32", "float64", "float64", "float16", "bfloat16", "int64", "bool", "complex64"]))
    n, m = int(rng.integers(0, 13)), int(rng.integers(0, 13))
    maximize = bool(rng.random() < 0.5)
    v = rng.integers(-5, 6, (n, m)).astype(np.float64) if rng.random() < 0.5 else rng.standard_normal((n, m)) * 10
    if v.size and rng.random() < 0.3:
        mask = rng.random((n, m)) < rng.uniform(0, 0.6)
        v[mask] = -np.inf if maximize else np.inf
    if v.size and rng.random() < 0.05:
        v.reshape(-1)[rng.integers(v.size)] = rng.choice([np.nan, np.inf, -np.inf])
    if dtype in ("int64", "bool", "complex64"):
        v = np.where(np.isfinite(v), v, 0)
    x = array(rng, (n, m), dtype, fw, layout=str(rng.choice(["c", "t", "slice", "expand", "flip"])))
    if rng.random() < 0.05 and dtype != "complex64":
        x = f64(x).tolist()  # plain nested lists, as scipy accepts
    call = lambda: ops.linear_assignment(x, maximize=maximize)  # noqa: E731
    if dtype == "complex64":
        return call, Expect("reject")
    c64 = f64(x) if not isinstance(x, list) else np.asarray(x, dtype=np.float64)
    if c64.ndim != 2:  # a (0, m) matrix as a list is [], a 1-D array: scipy rejects it too
        return call, Expect("reject")
    try:
        rr, cc = linear_sum_assignment(c64, maximize=maximize)
    except ValueError:
        return call, Expect("reject")
    want = c64[rr, cc].sum()

    def check(got):
        r, c = (f64(g).astype(np.int64) for g in got)
        k = min(n, m)
        if r.shape != (k,) or c.shape != (k,) or (k and (np.any(np.diff(r) <= 0) or len(set(c.tolist())) != k)):
            return False
        if k and (r.min() < 0 or r.max() >= n or c.min() < 0 or c.max() >= m):
            return False
        have = c64[r, c].sum()
        return bool(np.isclose(have, want, rtol=1e-9, atol=1e-9) or (not np.isfinite(want) and have == want))
    return call, Expect("ok", check)


GENERATORS = {"permute_pad": gen_permute_pad, "interpolate": gen_interpolate, "weighted_sum": gen_weighted_sum,
              "cost_matrix": gen_cost_matrix, "linear_assignment": gen_linear_assignment}


# ---- one batch (in a worker process) --------------------------------------------------------------

def run_call(seed: int, i: int, ops, log=None) -> tuple[str, str]:
    """Runs call i of batch `seed`: (primitive, outcome), outcome 'ok', 'rejected:<Exc>', or 'wrong:<why>'."""
    rng = np.random.default_rng([seed, i])
    prim = PRIMITIVES[int(rng.integers(len(PRIMITIVES)))]
    if log:
        print(f"call {seed}:{i} {prim}", file=log, flush=True)
    try:
        call, expect = GENERATORS[prim](rng, ops)
    except Exception:  # a generator bug is reported as such, never as a primitive's fault
        return prim, "wrong:generator " + traceback.format_exc(limit=2).replace("\n", " | ")
    try:
        with np.errstate(all="ignore"):
            got = call()
    except CLEAN as exc:
        if expect.kind == "ok":
            return prim, f"wrong:raised {type(exc).__name__} on a valid input: {exc}"
        return prim, f"rejected:{type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - anything else is not a clean rejection
        return prim, f"wrong:unclean {type(exc).__name__}: {exc}"
    if expect.kind == "reject":
        return prim, "wrong:accepted an invalid input"
    with np.errstate(all="ignore"):
        good = expect.check(got)
    return prim, "ok" if good else "wrong:result differs from the reference"


def run_batch(seed: int, calls: int, ops, log=None) -> dict:
    per = defaultdict(Counter)
    wrong = []
    for i in range(calls):
        prim, outcome = run_call(seed, i, ops, log)
        per[prim]["calls"] += 1
        kind = outcome.split(":")[0]
        per[prim][kind] += 1
        if kind == "rejected":
            per[prim][outcome] += 1
        if kind == "wrong" and len(wrong) < 20:
            wrong.append(f"{seed}:{i} {prim}: {outcome[6:]}"[:300])
    return {"seed": seed, "per": {k: dict(v) for k, v in per.items()}, "wrong": wrong}


def worker() -> None:
    """Reads 'seed calls' lines from stdin and answers each with one JSON line."""
    from hetmerge import ops
    for line in sys.stdin:
        seed, calls = map(int, line.split())
        print(json.dumps(run_batch(seed, calls, ops)), flush=True)


# ---- driver ----------------------------------------------------------------------------------

def fuzz(calls: int, seed: int = 0, jobs: int = 1, batch: int = 500, env: dict | None = None) -> dict:
    """Runs `calls` calls in batches over `jobs` worker processes; a worker that dies (segfault,
    abort) is counted as a crash of its batch and replaced."""
    seeds = [(seed * 1_000_003 + b, min(batch, calls - b * batch)) for b in range((calls + batch - 1) // batch)]
    lock = threading.Lock()
    results, crashes = [], []
    todo = list(reversed(seeds))
    env = dict(os.environ if env is None else env)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")

    def start():
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def drive():
        proc = start()
        while True:
            with lock:
                if not todo:
                    break
                s, n = todo.pop()
            proc.stdin.write(f"{s} {n}\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if line:
                with lock:
                    results.append(json.loads(line))
                continue
            proc.wait()
            err = proc.stderr.read()[-500:]
            with lock:
                crashes.append({"seed": s, "calls": n, "returncode": proc.returncode, "stderr": err})
            proc = start()
        proc.stdin.close()
        proc.wait()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=drive) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    per = defaultdict(Counter)
    wrong = []
    for r in results:
        for prim, counts in r["per"].items():
            per[prim].update(counts)
        wrong += r["wrong"]
    done = sum(c["calls"] for c in per.values())
    return {"calls": done, "per": {k: dict(v) for k, v in per.items()}, "crashes": crashes, "wrong": wrong,
            "wrong_count": sum(c.get("wrong", 0) for c in per.values()), "seconds": elapsed}


def summary(res: dict) -> str:
    lines = [f"{'primitive':<18}{'calls':>8}{'ok':>8}{'rejected':>10}{'wrong':>7}   exceptions"]
    for prim in PRIMITIVES:
        c = res["per"].get(prim, {})
        exc = ", ".join(f"{k.split(':')[1]} {v}" for k, v in sorted(c.items()) if k.startswith("rejected:"))
        lines.append(f"{prim:<18}{c.get('calls', 0):>8}{c.get('ok', 0):>8}{c.get('rejected', 0):>10}"
                     f"{c.get('wrong', 0):>7}   {exc}")
    lines.append(f"total: {res['calls']} calls, {len(res['crashes'])} crashed batches, {res['wrong_count']} wrong, "
                 f"{res['calls'] / max(res['seconds'], 1e-9):.0f} calls/s ({res['seconds']:.1f} s)")
    for c in res["crashes"]:
        lines.append(f"CRASH: batch seed {c['seed']} ({c['calls']} calls), returncode {c['returncode']}; "
                     f"replay: --replay {c['seed']} --calls {c['calls']}")
    for w in res["wrong"][:20]:
        lines.append(f"WRONG {w}   (repro: --repro SEED:CALL)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--batch", type=int, default=500, help="calls per worker batch (the unit a crash is pinned to)")
    p.add_argument("--replay", type=int, help="run one batch seed in this process, printing each call first")
    p.add_argument("--repro", help="SEED:CALL: run one call in this process and print its outcome")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.repro:
        from hetmerge import ops
        s, i = map(int, args.repro.split(":"))
        print(run_call(s, i, ops, log=sys.stdout))
        return 0
    if args.replay is not None:
        from hetmerge import ops
        print(json.dumps(run_batch(args.replay, min(args.calls, args.batch), ops, log=sys.stdout), indent=1))
        return 0
    res = fuzz(args.calls, args.seed, args.jobs, args.batch)
    print(summary(res))
    return 1 if res["crashes"] or res["wrong_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
