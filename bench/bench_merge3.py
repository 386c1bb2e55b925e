"""MERGE3 on the digits tasks of bench_merge_tasks.py: per-task coefficients searched by CMA-ES with
fitness on the validation split, estimated from a small item subset by IRT, vs the same search scored
on every validation item, vs the plain subset accuracy; test accuracy reported. Also the estimator's
quality on random candidates (correlation with the full validation accuracy) and the search's
candidate evaluations in one process vs a 2-process pool.

    PYTHONPATH=python python bench/bench_merge3.py [--generations 10] [--popsize 8] [--items 16]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import hetmerge as hm  # noqa: E402
from bench_merge_tasks import TASKS, acc, build_tasks  # noqa: E402
from hetmerge.tasks.irt import estimate_accuracy, fit_2pl, select_items  # noqa: E402
from hetmerge.tasks.merge3 import CandidateEvaluator  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--items", type=int, default=16, help="subset items per task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)   # the pool's workers are the parallelism; one thread each, same as in-process
    print(f"torch {torch.__version__}; torch threads 1 per process, hetmerge threads {hm.get_num_threads()}")
    base, experts, heads, data = build_tasks(args.seed)
    names = list(TASKS)
    ex = [experts[n] for n in names]
    hl = [heads[n] for n in names]
    val = [data[n]["val"] for n in names]
    expert_test = {n: acc(experts[n], heads[n], *data[n]["test"]) for n in names}

    def test_scores(model):
        s = {n: acc(model, heads[n], *data[n]["test"]) for n in names}
        return sum(s.values()) / len(s), sum(s[n] / expert_test[n] for n in names) / len(names), s

    # task arithmetic, scale chosen on validation
    t0 = time.perf_counter()
    best = max((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), key=lambda sc: sum(
        acc(hm.merge_tasks(base, ex, "task_arithmetic", scale=sc), hl[t], *val[t]) for t in range(len(names))))
    ta = hm.merge_tasks(base, ex, "task_arithmetic", scale=best)
    rows = [("task arithmetic (scale on val)", f"scale {best}", *test_scores(ta)[:2], 8 * sum(len(y) for _, y in val),
             time.perf_counter() - t0)]

    reports = {}
    for est in ("irt", "subset", "full"):
        t0 = time.perf_counter()
        m = hm.merge_tasks(base, ex, "merge3", data=val, heads=hl, items=args.items, generations=args.generations,
                           popsize=args.popsize, estimator=est, seed=args.seed)
        wall = time.perf_counter() - t0
        r = m.merge3
        reports[est] = r
        rows.append((f"merge3, fitness: {est}", "c = " + " ".join(f"{c:.2f}" for c in r.coefficients),
                     *test_scores(m)[:2], r.item_evaluations, wall))
    print(f"\n{len(names)} digits tasks; CMA-ES {args.generations} generations × {args.popsize}; subset "
          f"{args.items} items per task of {sum(len(y) for _, y in val)} validation items; test accuracy\n")
    print("| method | chosen | mean test acc | mean normalized | item evaluations | wall s |")
    print("|---|---|---|---|---|---|")
    for name, chosen, a, nrm, ev, wall in rows:
        print(f"| {name} | {chosen} | {a:.3f} | {nrm:.3f} | {ev:,} | {wall:.1f} |")

    # the estimator on random candidates: fitted as merge3 fits it (experts, x0, 6 random), then
    # 24 fresh random coefficient vectors answer the subset; compared with their full validation accuracy
    T = len(names)
    g = torch.Generator().manual_seed(args.seed + 7)
    full = CandidateEvaluator(base, [e.state_dict() for e in ex], val, hl, None)
    sizes = [len(y) for _, y in val]
    groups = torch.cat([torch.full((n,), t) for t, n in enumerate(sizes)])
    refs = [[1.0 if s == t else 0.0 for s in range(T)] for t in range(T)] + [[0.3] * T]
    refs += (1.5 * torch.rand(6, T, generator=g)).tolist()
    items, _ = fit_2pl(torch.stack([full(c) for c in refs]).float())
    subset = select_items(items, groups, args.items)
    est_irt, est_sub, truth = [], [], []
    for c in (1.5 * torch.rand(24, T, generator=g)).tolist():
        ans = full(c)
        truth.append(float(torch.stack([ans[groups == t].float().mean() for t in range(T)]).mean()))
        est_irt.append(float(estimate_accuracy(items, groups, subset, ans[subset]).mean()))
        sg = groups[subset]
        est_sub.append(float(torch.stack([ans[subset][sg == t].float().mean() for t in range(T)]).mean()))
    truth_t = torch.tensor(truth)
    print(f"\nestimator on 24 random candidates (c_t ~ U[0, 1.5]), subset of {len(subset)} items:")
    print("| estimator | Pearson r with full val accuracy | mean abs error |")
    print("|---|---|---|")
    for name, e in (("IRT (gp-IRT, 2PL)", est_irt), ("plain subset accuracy", est_sub)):
        et = torch.tensor(e)
        r = float(torch.corrcoef(torch.stack([et, truth_t]))[0, 1])
        print(f"| {name} | {r:.3f} | {float((et - truth_t).abs().mean()):.3f} |")

    # the search's evaluations: one process vs a 2-process pool
    t0 = time.perf_counter()
    hm.merge_tasks(base, ex, "merge3", data=val, heads=hl, items=args.items, generations=3, popsize=args.popsize,
                   estimator="full", seed=args.seed)
    one = time.perf_counter() - t0
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        list(pool.map(abs, [1, 2]))   # start the workers outside the timing
        t0 = time.perf_counter()
        hm.merge_tasks(base, ex, "merge3", data=val, heads=hl, items=args.items, generations=3,
                       popsize=args.popsize, estimator="full", seed=args.seed, executor=pool)
        two = time.perf_counter() - t0
    print(f"\nsearch with full-data fitness, 3 generations × {args.popsize}: in-process {one:.1f} s, "
          f"2-process pool {two:.1f} s (speed-up {one / two:.2f}×, efficiency {one / two / 2:.0%}; each task "
          "ships the base, the experts and the data to its worker)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
