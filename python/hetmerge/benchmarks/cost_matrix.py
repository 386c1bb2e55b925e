"""cost_matrix benchmark: ours vs one torch.mm on pre-gathered operands vs the naive torch reference.

The workload is the weight-matching cost of one MLP hidden group of width w (2 terms):
  term 1: (W_l_base [n_a, n_in], W_l_target [n_b, n_in'], map of the input group)
  term 2: (W_{l+1}_base.T [n_a, n_out], W_{l+1}_target.T [n_b, n_out'], map of the output group)  -- transposed views
Cases: "perm" (base and target both width w, maps random permutations) and "hetero" (base 2x target:
n_b = w/2 and half the map entries are -1).

  mm_pregathered: torch.mm(A_cat, B_cat.T) on operands gathered and concatenated beforehand (not timed):
                  the same flops as ours, no gather -- a BLAS roofline for this call.
  naive:          F.pad + index_select to materialize each padded, gathered B, one matmul per term, sum.

All timings in one process, interleaved, best of `repeat`; ratio_vs_mm = ours / mm (lower is better),
speedup_vs_naive = naive / ours (higher is better), gflops = 2 n_a n_b K_eff / ours. ours and mm write
into the same preallocated output (out=). ours_thr / torch_thr: the threads each side ran with.

    python bench/primitives/cost_matrix.py --widths 1024 2048 4096 8192
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .. import ops
from .common import best_times, set_threads, threads


def _map(k: int, k_target: int, n_pad: int, gen: torch.Generator) -> torch.Tensor:
    """[k] int64: n_pad random slots are -1, the others a random injection into range(k_target)."""
    m = torch.full((k,), -1, dtype=torch.int64)
    slots = torch.randperm(k, generator=gen)[: k - n_pad]
    m[slots] = torch.randperm(k_target, generator=gen)[: k - n_pad]
    return m


def make_case(case: str, w: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if case == "perm":
        wb, n_pad = w, 0
    elif case == "hetero":
        wb, n_pad = w // 2, w // 2
    else:
        raise ValueError(f"unknown case {case!r}")
    w1_a = torch.randn(w, w, generator=gen, dtype=dtype)    # [n_a, n_in]
    w1_b = torch.randn(wb, wb, generator=gen, dtype=dtype)  # [n_b, n_in']
    w2_a = torch.randn(w, w, generator=gen, dtype=dtype)    # [n_out, n_a]
    w2_b = torch.randn(wb, wb, generator=gen, dtype=dtype)  # [n_out', n_b]
    return [
        (w1_a, w1_b, _map(w, wb, n_pad, gen), 1),
        (w2_a.T, w2_b.T, _map(w, wb, n_pad, gen), 1),
    ]


def naive(terms):
    """The torch reference: materialize the padded, gathered B of every term, one matmul each."""
    out = None
    for a, b, m, block in terms:
        k_t = b.shape[1] // block
        b_pad = F.pad(b, (0, block))  # block zero columns at index k_t * block
        src = torch.where(m >= 0, m, torch.full_like(m, k_t))
        idx = (src[:, None] * block + torch.arange(block)).reshape(-1)
        c = a @ b_pad.index_select(1, idx).T
        out = c if out is None else out.add_(c)
    return out


def pregathered(terms):
    """A_cat [n_a, K_eff], B_cat [n_b, K_eff]: the valid inner columns of every term, concatenated."""
    a_cols, b_cols = [], []
    for a, b, m, block in terms:
        q = torch.nonzero(m >= 0).flatten()
        r = torch.arange(block)
        a_cols.append(a[:, (q[:, None] * block + r).reshape(-1)])
        b_cols.append(b[:, (m[q][:, None] * block + r).reshape(-1)])
    return torch.cat(a_cols, 1).contiguous(), torch.cat(b_cols, 1).contiguous()


def run(widths, repeat: int = 3, cases=("perm", "hetero"), dtype=torch.float32) -> list[dict]:
    rows = []
    ours_thr, torch_thr = threads()
    for w in widths:
        for case in cases:
            terms = make_case(case, w, dtype)
            a_cat, b_cat = pregathered(terms)
            n_a, n_b, k_eff = a_cat.shape[0], b_cat.shape[0], a_cat.shape[1]
            out = torch.empty(n_a, n_b, dtype=dtype)
            flops = 2.0 * n_a * n_b * k_eff
            # warm-up (thread pools, first-touch page faults) only where it is negligible
            t = best_times({"ours": lambda: ops.cost_matrix(terms, out=out),
                            "mm": lambda: torch.mm(a_cat, b_cat.T, out=out),
                            "naive": lambda: naive(terms)}, repeat, warmup=int(flops < 5e10))
            rows.append(dict(case=case, n=w, ours_s=t["ours"], mm_pregathered_s=t["mm"], naive_s=t["naive"],
                             ratio_vs_mm=t["ours"] / t["mm"], speedup_vs_naive=t["naive"] / t["ours"],
                             gflops=flops / t["ours"] / 1e9, ours_thr=ours_thr, torch_thr=torch_thr))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--cases", nargs="+", default=["perm", "hetero"])
    p.add_argument("--threads", type=int, default=None, help="hetmerge and torch threads (default: torch's)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows = run(args.widths, args.repeat, tuple(args.cases), getattr(torch, args.dtype))
    print(f"cost_matrix {args.dtype}, threads: hetmerge {threads()[0]}, torch {threads()[1]}")
    print(f"{'case':8} {'n':>6} {'ours_s':>9} {'mm_s':>9} {'naive_s':>9} {'ours/mm':>8} {'naive/ours':>10} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['case']:8} {r['n']:>6} {r['ours_s']:>9.4f} {r['mm_pregathered_s']:>9.4f} {r['naive_s']:>9.4f} "
              f"{r['ratio_vs_mm']:>8.3f} {r['speedup_vs_naive']:>10.2f} {r['gflops']:>8.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
