"""Benchmark of the Python layer against plain torch+scipy references, ratios taken in one process.

1. Weight matching of a depth-4 MLP (784 -> w -> w -> w -> 10), base width 4096 vs target width 2048
   (random weights): hm.align vs the reference coordinate descent of tests/helpers_models.py (padding
   materialized, scipy.optimize.linear_sum_assignment), same seed and order, same objective.
2. Sweep of 25 merging factors on digits (MLP 64-256-256-10, 9,000 samples): hm.sweep vs per-λ
   loops (hm.merge + forward; functional_call; DataLoader), bench/bench_sweep.py's case.
Both suites ship in the package (hetmerge.benchmarks.align / .sweep); each row states the threads.

    python bench/bench_align.py                 # full sizes (several minutes on 2 cores)
    python bench/bench_align.py --small         # 1024 vs 512, quick check
    python bench/bench_align.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import hetmerge as hm
from hetmerge.benchmarks.align import bench_weight_matching
from hetmerge.benchmarks.common import set_threads
from hetmerge.benchmarks.sweep import bench_case

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def bench_sweep(repeat: int = 3) -> list[dict]:
    r = bench_case(256, 9000, 25, repeat)
    return [{"case": f"sweep {r['case']} vs {name}", "ours_s": r["ours_s"], "ref_s": r[f"{key}_s"],
             "speedup": r[f"{key}_s"] / r["ours_s"], "threads": r["thr"],
             "max_abs_loss_diff": r["max_loss_diff"], "same_acc": r["same_acc"]}
            for name, key in (("lean loop (hm.merge + forward per λ)", "lean_loop"),
                              ("functional_call loop", "functional_loop"),
                              ("DataLoader loop", "heavy_loop"))]


def evidence(pairs: int = 5, restarts: int = 8) -> dict:
    """Digits evidence for the closing note: loss barriers of same-architecture pairs (unaligned,
    aligned, best of `restarts`), and λ* / accuracy of heterogeneous pairs (450 test samples)."""
    from helpers_models import digits, trained_mlp   # the checkout's tests/ (trained digits models)

    d = digits()
    data = (d.X_test, d.y_test)
    lams = torch.linspace(0, 1, 21)
    bars = {"unaligned": [], "aligned": [], f"aligned, best of {restarts}": []}
    for s in range(pairs):
        base, target = trained_mlp((128, 64), 2 * s), trained_mlp((128, 64), 2 * s + 1)
        bars["unaligned"].append(hm.sweep(base, target, None, lams, data=data).barrier)
        bars["aligned"].append(hm.sweep(base, target, hm.align(base, target, seed=s), lams,
                                        data=data).barrier)
        bars[f"aligned, best of {restarts}"].append(
            hm.sweep(base, target, hm.align(base, target, seed=s, restarts=restarts), lams,
                     data=data).barrier)
    out = {"mean barrier, 128-64 MLP pairs": {k: sum(v) / len(v) for k, v in bars.items()}}
    for wa, wb in (((128,), (64,)), ((128, 64), (64, 32)), ((128, 64, 64), (64, 32))):
        base, target = trained_mlp(wa, 0), trained_mlp(wb, 1)
        al = hm.sweep(base, target, hm.align(base, target, restarts=4), lams, data=data)
        un = hm.sweep(base, target, None, lams, data=data)
        out[f"{wa} vs {wb}"] = {"lam_star aligned": al.lam_star, "lam_star unaligned": un.lam_star,
                                "acc(0)": float(al.acc[0]), "acc(0.1) aligned": float(al.acc[2]),
                                "barrier aligned": al.barrier, "barrier unaligned": un.barrier}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="1024 vs 512 instead of 4096 vs 2048")
    ap.add_argument("--threads", type=int, default=None, help="torch and hetmerge threads")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--skip", choices=["align", "sweep"], default=None)
    ap.add_argument("--evidence", action="store_true", help="also print the digits evidence numbers")
    ap.add_argument("--max-iter", type=int, default=None,
                    help="cap on sweeps for both implementations (default: 100 small, 5 full: random "
                         "4096-wide weights take dozens of sweeps to converge)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    print(f"threads: hetmerge {hm.get_num_threads()}, torch {torch.get_num_threads()} (scipy's assignment "
          "solver in the weight-matching reference: 1)")
    rows = []
    if args.skip != "sweep":
        rows += bench_sweep()
    if args.skip != "align":
        wa, wb = (1024, 512) if args.small else (4096, 2048)
        max_iter = args.max_iter or (100 if args.small else 5)
        rows.append(bench_weight_matching(wa, wb, max_iter=max_iter))
    print(f"{'case':<100} {'ours (s)':>10} {'reference (s)':>14} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:<100} {r['ours_s']:>10.4f} {r['ref_s']:>14.4f} {r['speedup']:>7.2f}x")
    for r in rows:
        if "case" not in r:
            continue
        extra = {k: v for k, v in r.items() if k not in ("case", "ours_s", "ref_s", "speedup")}
        print(f"  {r['case']}: {extra}")
    if args.evidence:
        ev = evidence()
        for k, v in ev.items():
            print(f"{k}: " + ", ".join(f"{kk} {vv:.3f}" for kk, vv in v.items()))
        rows.append({"evidence": ev})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
