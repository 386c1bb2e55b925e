"""linear_assignment: ours vs scipy.optimize.linear_sum_assignment and the fastest lapx solver.

    python bench/primitives/linear_assignment.py --widths 1024 2048 4096

Cases (float64 numpy inputs, the same matrix for every solver):
  uniform          n x n, U(0, 1), minimize
  weight_matching  n x n, C = W_a @ W_b.T with W_b a noisy row-permuted copy of W_a (n x n), maximize
  rect             n x 2n, U(0, 1), minimize
lapx minimizes only: it gets -C for maximize, negated outside the timing (the stricter comparison for
us). lapx_s is the best over its dense solvers that accept the case, lapx_solver names the winner.
ratio_vs_* = reference time / ours (higher is better). objective_equal: ours, scipy and lapx reach
the same total to 1e-12 relative.
Threads: scipy and lapx are single-threaded solvers; ours runs with hetmerge's thread count
(ours_thr) and, for the like-for-like ratio, with one thread (ours_1thr_s, ratio_1thr_vs_*).
lapx is the [bench] extra: pip install 'hetmerge[bench]'.

With --batch B --block n: linear_assignment_batched on B matrices n x n (the per-head blocks of
attention alignment: 32 x 32 head pairs of 128 dims is B = 1024, n = 128), weight-matching-like
costs, maximize, against scipy called once per matrix (the code a user writes) and against our
linear_assignment called once per matrix.
"""
from __future__ import annotations

import time

import numpy as np

from .common import best_time, print_table, require, set_threads, threads

CASES = ["uniform", "weight_matching", "rect"]


def make_case(case: str, n: int, seed: int = 0) -> tuple[np.ndarray, bool]:
    rng = np.random.default_rng(seed)
    if case == "uniform":
        return rng.random((n, n)), False
    if case == "weight_matching":
        wa = rng.standard_normal((n, n))
        wb = wa[rng.permutation(n)] + 0.5 * rng.standard_normal((n, n))
        return wa @ wb.T, True
    if case == "rect":
        return rng.random((n, 2 * n)), False
    raise ValueError(case)


def _lapx_solvers(rect: bool):
    """(name, fn(cost) -> (rows, cols)) for the lapx dense solvers."""
    lap = require("lap", "the linear_assignment benchmark's lapx reference")

    def from_x(x):
        rows = np.flatnonzero(x >= 0)
        return rows, x[rows]

    cands = {
        "lapjvx": lambda c: lap.lapjvx(c, extend_cost=True, return_cost=False),
        "lapjvh": lambda c: lap.lapjvh(c, extend_cost=True, return_cost=False),
        "lapjvr": lambda c: lap.lapjvr(c, extend_cost=True, return_cost=False),
        "lapjvs": lambda c: lap.lapjvs(c, extend_cost=True, return_cost=False, prefer_float32=False),
        "lapjv": lambda c: from_x(lap.lapjv(c, extend_cost=True, return_cost=False)[0]),
    }
    # lapjv/lapjvx/lapjvs pad a rectangle to a square (seconds at these sizes, never the winner).
    skip = {"lapjvx", "lapjv", "lapjvs"} if rect else set()
    return [(k, f) for k, f in cands.items() if k not in skip and hasattr(lap, k)]


def _objective(cost: np.ndarray, rows, cols) -> float:
    return float(cost[np.asarray(rows), np.asarray(cols)].sum())


def _same(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


def run(widths, repeat: int = 3) -> list[dict]:
    from scipy.optimize import linear_sum_assignment

    import hetmerge

    from .. import ops

    _lapx_solvers(False)   # fail early, before any timing, when the [bench] extra is missing
    ours_thr = threads()[0]
    rows_out = []
    for n in widths:
        for case in CASES:
            cost, maximize = make_case(case, n)
            r, c = ops.linear_assignment(cost, maximize=maximize)
            ours_obj = _objective(cost, r, c)
            ours_s = best_time(lambda: ops.linear_assignment(cost, maximize=maximize), repeat=repeat)
            hetmerge.set_num_threads(1)
            try:
                ours1_s = best_time(lambda: ops.linear_assignment(cost, maximize=maximize), repeat=repeat)
            finally:
                hetmerge.set_num_threads(ours_thr)

            rr, cc = linear_sum_assignment(cost, maximize=maximize)
            scipy_obj = _objective(cost, rr, cc)
            scipy_s = best_time(lambda: linear_sum_assignment(cost, maximize=maximize), repeat=repeat, warmup=0)

            lapx_ok = True
            solvers = _lapx_solvers(rect=cost.shape[0] != cost.shape[1])
            lc = np.ascontiguousarray(-cost if maximize else cost)
            # One timed call each to pick the fastest, then best-of-repeat for that one.
            first = {}
            for name, fn in solvers:
                t0 = time.perf_counter()
                lr, lcol = fn(lc)
                first[name] = time.perf_counter() - t0
                lapx_ok &= _same(_objective(cost, lr, lcol), scipy_obj)
            lapx_name = min(first, key=first.get)
            fn = dict(solvers)[lapx_name]
            lapx_s = min(first[lapx_name], best_time(lambda: fn(lc), repeat=max(1, repeat - 1), warmup=0))

            rows_out.append({
                "case": case,
                "n": n,
                "shape": f"{cost.shape[0]}x{cost.shape[1]}",
                "ours_s": ours_s,
                "ours_1thr_s": ours1_s,
                "scipy_s": scipy_s,
                "lapx_s": lapx_s,
                "lapx_solver": lapx_name,
                "ratio_vs_scipy": scipy_s / ours_s,
                "ratio_vs_lapx": lapx_s / ours_s,
                "ratio_1thr_vs_scipy": scipy_s / ours1_s,
                "ratio_1thr_vs_lapx": lapx_s / ours1_s,
                "ours_thr": ours_thr,
                "ref_thr": 1,
                "objective_equal": _same(ours_obj, scipy_obj) and lapx_ok,
            })
    return rows_out


def run_batched(batch: int, block: int, repeat: int) -> list[dict]:
    from scipy.optimize import linear_sum_assignment

    from .. import ops

    rng = np.random.default_rng(0)
    wa = rng.standard_normal((batch, block, 2 * block))
    wb = wa[:, rng.permutation(block)] + 0.5 * rng.standard_normal((batch, block, 2 * block))
    cost = np.einsum("bik,bjk->bij", wa, wb)
    r, c = ops.linear_assignment_batched(cost, maximize=True)
    ours_obj = sum(cost[b][r[b], c[b]].sum() for b in range(batch))
    ref_obj = 0.0
    for b in range(batch):
        rr, cc = linear_sum_assignment(cost[b], maximize=True)
        ref_obj += cost[b][rr, cc].sum()
    ours_s = best_time(lambda: ops.linear_assignment_batched(cost, maximize=True), repeat=repeat)
    loop_s = best_time(lambda: [ops.linear_assignment(cost[b], maximize=True) for b in range(batch)], repeat=repeat)
    scipy_s = best_time(lambda: [linear_sum_assignment(cost[b], maximize=True) for b in range(batch)], repeat=repeat)
    return [{"batch": batch, "block": block, "ours_batched_s": ours_s, "ours_loop_s": loop_s, "scipy_loop_s": scipy_s,
             "ratio_vs_scipy": scipy_s / ours_s, "ratio_vs_ours_loop": loop_s / ours_s, "ours_thr": threads()[0],
             "ref_thr": 1, "objective_equal": _same(ours_obj, ref_obj)}]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[1024])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="hetmerge threads (scipy and lapx use one)")
    p.add_argument("--batch", type=int, default=None, help="time linear_assignment_batched on this many matrices")
    p.add_argument("--block", type=int, default=128, help="size of each matrix with --batch")
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.batch is not None:
        print_table(f"linear_assignment_batched ({args.batch} matrices {args.block}x{args.block}; ratio = reference / "
                    f"ours; ours on {threads()[0]} threads, scipy single-threaded)",
                    run_batched(args.batch, args.block, args.repeat))
        return 0
    print_table(f"linear_assignment (ratio_vs_* = reference / ours; ours on {threads()[0]} threads and on 1, "
                "scipy and lapx single-threaded)", run(args.widths, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
