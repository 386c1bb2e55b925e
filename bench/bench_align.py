"""Benchmark of the Python layer against plain torch+scipy references, ratios taken in one process.

1. Weight matching of a depth-4 MLP (784 -> w -> w -> w -> 10), base width 4096 vs target width 2048
   (random weights): hm.align vs the reference coordinate descent of tests/helpers_models.py (padding
   materialized, scipy.optimize.linear_sum_assignment), same seed and order, same objective.
2. Sweep of 25 merging factors on digits (128-64 base vs 64-32 target, trained): hm.sweep vs the
   obvious loop (build the merged model with hm.merge, run it once per λ) and vs a leaner loop
   (target permuted once, functional_call per λ); same numbers.

    python bench/bench_align.py                 # full sizes (several minutes on 2 cores)
    python bench/bench_align.py --small         # 1024 vs 512, quick check
    python bench/bench_align.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import hetmerge as hm  # noqa: E402
from hetmerge import models as hmm  # noqa: E402
from hetmerge.merging import resolve  # noqa: E402
from hetmerge.maps import transform  # noqa: E402
from helpers_models import digits, ref_weight_matching, trained_mlp  # noqa: E402


def bench_weight_matching(wa: int, wb: int, seed: int = 0, repeats: int = 1, max_iter: int = 100) -> dict:
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
    return {"case": f"weight matching depth-4 MLP {wa} vs {wb}", "ours_s": min(t_ours),
            "ref_s": min(t_ref), "speedup": min(t_ref) / min(t_ours), "ours_objective": res.objective,
            "ref_objective": ref_obj, "sweeps": res.iterations, "max_iter": max_iter,
            "same_maps": all(torch.equal(res.maps[f"fc{i}"], ref_maps[i]) for i in range(3)),
            "ours_timings": {k: round(v, 3) for k, v in res.timings.items()}}


def loop_sweep(base, target, res, lambdas, X, y):
    """The obvious loop: per λ, build the merged model (hm.merge) and run it once."""
    loss, acc = [], []
    with torch.no_grad():
        for lam in lambdas.tolist():
            out = hm.merge(base, target, res, lam=lam)(X)
            loss.append(F.cross_entropy(out, y).item())
            acc.append((out.argmax(-1) == y).float().mean().item())
    return torch.tensor(loss), torch.tensor(acc)


def lean_loop_sweep(base, target, res, lambdas, X, y):
    """A leaner loop: the target is permuted once, then per λ a merged state dict goes through
    torch.func.functional_call (no module copies)."""
    pairing, maps = resolve(base, target, res)
    sa, sb = base.state_dict(), target.state_dict()
    aligned = {}
    for pp in pairing.params:
        rows, cols = transform(pp, maps)
        aligned[pp.base_key] = hm.ops.permute_pad(sb[pp.target_key], rows, cols)
    loss, acc = [], []
    with torch.no_grad():
        for lam in lambdas.tolist():
            sd = dict(sa)
            for k, b in aligned.items():
                sd[k] = (1 - lam) * sa[k] + lam * b
            out = functional_call(base, sd, (X,))
            loss.append(F.cross_entropy(out, y).item())
            acc.append((out.argmax(-1) == y).float().mean().item())
    return torch.tensor(loss), torch.tensor(acc)


def bench_sweep(K: int = 25, repeats: int = 20) -> list[dict]:
    d = digits()
    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    res = hm.align(base, target)
    lams = torch.linspace(0, 1, K)
    data = (d.X_test, d.y_test)
    rows = []
    for name, loop in (("obvious loop: hm.merge + forward per λ", loop_sweep),
                       ("lean loop: functional_call per λ", lean_loop_sweep)):
        curve = hm.sweep(base, target, res, lams, data=data)   # warm up
        loss, acc = loop(base, target, res, lams, *data)
        t_ours, t_loop = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            curve = hm.sweep(base, target, res, lams, data=data)
            t1 = time.perf_counter()
            loss, acc = loop(base, target, res, lams, *data)
            t2 = time.perf_counter()
            t_ours.append(t1 - t0)
            t_loop.append(t2 - t1)
        rows.append({"case": f"sweep {K} λ, digits MLP vs {name}", "ours_s": min(t_ours),
                     "ref_s": min(t_loop), "speedup": min(t_loop) / min(t_ours),
                     "max_abs_loss_diff": float((curve.loss - loss).abs().max()),
                     "same_acc": bool(torch.equal(curve.acc, acc))})
    return rows


def evidence(pairs: int = 5, restarts: int = 8) -> dict:
    """Digits evidence for the closing note: loss barriers of same-architecture pairs (unaligned,
    aligned, best of `restarts`), and λ* / accuracy of heterogeneous pairs (450 test samples)."""
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
    if args.threads:
        torch.set_num_threads(args.threads)
        hm.set_num_threads(args.threads)
    rows = []
    if args.skip != "sweep":
        rows += bench_sweep()
    if args.skip != "align":
        wa, wb = (1024, 512) if args.small else (4096, 2048)
        max_iter = args.max_iter or (100 if args.small else 5)
        rows.append(bench_weight_matching(wa, wb, max_iter=max_iter))
    print(f"{'case':<66} {'ours (s)':>10} {'reference (s)':>14} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:<66} {r['ours_s']:>10.4f} {r['ref_s']:>14.4f} {r['speedup']:>7.1f}x")
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
