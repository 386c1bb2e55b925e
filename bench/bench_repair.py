"""REPAIR on a small zoo: loss barrier and λ = 0.5 test accuracy of weight-matched merges, with and
without REPAIR (hm.sweep(repair=X) / hm.merge(repair=X)). MLPs and small CNNs, BatchNorm-free and
with BatchNorm, same and different widths; each pair is two models trained from different seeds.
REPAIR statistics come from the training split; loss and accuracy are measured on the test split.
Numbers go to docs/repair.md.

    PYTHONPATH=python python bench/bench_repair.py --dataset digits [--pairs mlp cnn-bn ...] [--seeds 0 1]

Pair names: mlp, mlp-wide-narrow, mlp-narrow-wide, mlp-bn, mlp-bn-wide-narrow, cnn, cnn-wide-narrow,
cnn-bn, cnn-bn-wide-narrow. Base seed 10·s, target seed 10·s + 1 for each s in --seeds.
"""
from __future__ import annotations

import argparse
import time

import torch

import hetmerge as hm
from hetmerge import models
from hetmerge.zoo import load_data

# name: (kind, base widths, target widths, BatchNorm)
PAIRS = {
    "mlp": ("mlp", [128, 128, 128], [128, 128, 128], False),
    "mlp-wide-narrow": ("mlp", [128, 128, 128], [64, 64, 64], False),
    "mlp-narrow-wide": ("mlp", [64, 64, 64], [128, 128, 128], False),
    "mlp-bn": ("mlp", [128, 128, 128], [128, 128, 128], True),
    "mlp-bn-wide-narrow": ("mlp", [128, 128, 128], [64, 64, 64], True),
    "cnn": ("cnn", [16, 32], [16, 32], False),
    "cnn-wide-narrow": ("cnn", [32, 32], [16, 16], False),
    "cnn-bn": ("cnn", [16, 32], [16, 32], True),
    "cnn-bn-wide-narrow": ("cnn", [32, 32], [16, 16], True),
}
EPOCHS = {"digits": 30, "mnist1d": 20}


def views(split, kind, dataset):
    """(X_train, y_train, X_test, y_test) shaped for an MLP ([N, F]) or a CNN ([N, 1, 8, 8] / [N, 1, 40])."""
    Xtr, ytr, Xte, yte = split
    if kind == "cnn":
        shape = (1, 8, 8) if dataset == "digits" else (1, Xtr.shape[1])
        Xtr, Xte = Xtr.view(-1, *shape), Xte.view(-1, *shape)
    return Xtr, ytr, Xte, yte


def build(kind, widths, bn, dataset, n_in, seed):
    torch.manual_seed(seed)
    if kind == "mlp":
        return models.mlp(n_in, widths, 10, bn=bn)
    spatial = [8, 8] if dataset == "digits" else [n_in]
    return models.cnn(1, widths, 10, spatial, bn=bn)


_TRAINED: dict = {}


def trained(kind, widths, bn, dataset, split, seed):
    key = (kind, tuple(widths), bn, dataset, seed)
    if key not in _TRAINED:
        Xtr, ytr, _, _ = views(split, kind, dataset)
        m = build(kind, widths, bn, dataset, split[0].shape[1], seed)
        _TRAINED[key] = models.train(m, Xtr, ytr, epochs=EPOCHS[dataset], lr=3e-3, batch_size=128, seed=seed)
    return _TRAINED[key]


def row(name, dataset, split, s, lambdas):
    kind, wa, wb, bn = PAIRS[name]
    Xtr, ytr, Xte, yte = views(split, kind, dataset)
    a = trained(kind, wa, bn, dataset, split, 10 * s)
    b = trained(kind, wb, bn, dataset, split, 10 * s + 1)
    res = hm.align(a, b)
    t0 = time.perf_counter()
    plain = hm.sweep(a, b, res, lambdas, data=(Xte, yte))
    t1 = time.perf_counter()
    fixed = hm.sweep(a, b, res, lambdas, data=(Xte, yte), repair=Xtr)
    t2 = time.perf_counter()
    i = lambdas.index(0.5)
    out = {"pair": name, "seeds": f"{10 * s}/{10 * s + 1}",
           "acc A": 100 * models.accuracy(a, Xte, yte), "acc B": 100 * models.accuracy(b, Xte, yte),
           "barrier": plain.barrier, "barrier R": fixed.barrier,
           "acc½": 100 * float(plain.acc[i]), "acc½ R": 100 * float(fixed.acc[i]),
           "acc½ R bn=repair": None, "barrier bn_data": None, "sweep s": t1 - t0, "sweep R s": t2 - t1}
    if bn:
        # the alternative for BatchNorm nets: correct the BatchNorm output instead of resetting it
        m = hm.repair(hm.merge(a, b, res, 0.5), a, b, res, 0.5, Xtr, bn="repair")
        out["acc½ R bn=repair"] = 100 * models.accuracy(m, Xte, yte)
        # hetmerge's existing baseline: BatchNorm statistics re-estimated per λ, no rescale
        out["barrier bn_data"] = hm.sweep(a, b, res, lambdas, data=(Xte, yte), bn_data=(Xtr, ytr)).barrier
    return out


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits")
    p.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split = load_data(args.dataset)
    lambdas = [round(0.1 * k, 1) for k in range(11)]
    print(f"# REPAIR on {args.dataset}: {len(split[1])} train (REPAIR statistics) / {len(split[3])} test "
          f"(loss, accuracy); λ grid {lambdas[0]}..{lambdas[-1]} step 0.1; weight matching; torch {torch.__version__}")
    rows = []
    t0 = time.perf_counter()
    for name in args.pairs:
        for s in args.seeds:
            rows.append(row(name, args.dataset, split, s, lambdas))
            r = rows[-1]
            print(f"  {r['pair']} {r['seeds']}: barrier {r['barrier']:.3f} -> {r['barrier R']:.3f}, acc½ "
                  f"{r['acc½']:.1f} -> {r['acc½ R']:.1f}", flush=True)
    cols = list(rows[0])
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    worse_b = sum(r["barrier R"] > r["barrier"] for r in rows)
    worse_a = sum(r["acc½ R"] < r["acc½"] for r in rows)
    print()
    print(f"pairs: {len(rows)}; REPAIR made the barrier worse on {worse_b}, the λ = 0.5 accuracy worse on "
          f"{worse_a}; mean barrier {sum(r['barrier'] for r in rows) / len(rows):.3f} -> "
          f"{sum(r['barrier R'] for r in rows) / len(rows):.3f}, mean acc½ "
          f"{sum(r['acc½'] for r in rows) / len(rows):.1f} -> {sum(r['acc½ R'] for r in rows) / len(rows):.1f} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
