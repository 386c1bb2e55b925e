"""hm.sweep(search="adaptive") vs the 25-point grid on a small zoo of digits MLPs (every ordered
pair of different architectures, hm.align'ed, and the same pairs unaligned, whose barriers are
large): merged models evaluated (forward passes over the
data), wall time (best of N, interleaved), and how far λ* and the barrier land from the grid's and
from a 101-point grid's (the barrier's reference). Numbers go to docs/sweep_search.md.

    PYTHONPATH=python python bench/bench_adaptive.py                 # widths 64..512, 450 test digits
    PYTHONPATH=python python bench/bench_adaptive.py --repeat-data 8 # 3,600 samples: forward-bound
"""
from __future__ import annotations

import argparse
import statistics

import torch

import hetmerge as hm
from hetmerge import data as hd
from hetmerge import models as hmm

from common import best_times, print_table, set_threads

ARCHS = {"64": [64], "256": [256], "128-64": [128, 64], "512-256": [512, 256]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="best of N wall times")
    p.add_argument("--repeat-data", type=int, default=1, help="evaluate on the test split repeated N times")
    p.add_argument("--epochs", type=int, default=15)
    a = p.parse_args()
    set_threads(a.threads)
    d = hd.digits(seed=0)
    X, y = d.X_test.repeat(a.repeat_data, 1), d.y_test.repeat(a.repeat_data)
    zoo = {}
    for i, (name, w) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        zoo[name] = hmm.train(hmm.mlp(64, w, 10), d.X_train, d.y_train, epochs=a.epochs, seed=i)
    g25, g101 = torch.linspace(0, 1, 25), torch.linspace(0, 1, 101)
    rows = []
    for bn, base in zoo.items():
        for tn, target in zoo.items():
            if bn == tn:
                continue
            for res in (hm.align(base, target), None):
                ref = hm.sweep(base, target, res, g101, data=(X, y))
                out = {}
                times = best_times({
                    "grid": lambda: out.__setitem__("grid", hm.sweep(base, target, res, g25, data=(X, y))),
                    "adaptive": lambda: out.__setitem__("ad", hm.sweep(base, target, res, g25, data=(X, y),
                                                                       search="adaptive"))}, repeat=a.repeat)
                gr, ad = out["grid"], out["ad"]
                rows.append({"base ← target": f"{bn} ← {tn}", "aligned": res is not None,
                             "evals grid": gr.n_evals, "evals adaptive": ad.n_evals,
                             "calls": ad.timings["rounds"], "time grid ms": 1e3 * times["grid"],
                             "time adaptive ms": 1e3 * times["adaptive"], "λ* grid": gr.lam_star,
                             "λ* adaptive": ad.lam_star, "barrier 101": ref.barrier,
                             "Δbarrier grid": gr.barrier - ref.barrier,
                             "Δbarrier adaptive": ad.barrier - ref.barrier})
    print_table(f"adaptive search vs the 25-point grid ({len(y)} samples, {a.threads} thread(s); "
                "Δbarrier: against a 101-point grid)", rows)
    ev = statistics.mean(r["evals adaptive"] for r in rows)
    print(f"\nmean evaluations: adaptive {ev:.1f} vs grid 25 ({25 / ev:.1f}x fewer); "
          f"λ* equal to the grid's in {sum(abs(r['λ* grid'] - r['λ* adaptive']) < 1e-6 for r in rows)}/{len(rows)} "
          f"pairs; max |Δbarrier| adaptive {max(abs(r['Δbarrier adaptive']) for r in rows):.1e}, "
          f"grid {max(abs(r['Δbarrier grid']) for r in rows):.1e}; time adaptive/grid "
          f"{statistics.median(r['time adaptive ms'] / r['time grid ms'] for r in rows):.2f} (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
