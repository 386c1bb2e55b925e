"""Merging N MLPs at once: the C2M3 universe (hm.align_many + hm.merge_many) vs aligning each model to
model 0 with hm.align and averaging (the pairwise baseline) vs averaging without alignment. Also the
cycle-consistency error of independent pairwise alignments and the summed weight-matching objective.
Numbers go to docs/many_models.md.

    PYTHONPATH=python python bench/bench_c2m3.py [--models 4] [--dataset digits|mnist1d]
        [--seeds 0 1 2] [--widths 128,128 [96,96 ...]] [--epochs N]

Each seed s trains models with seeds s·100 + k (k < N) on the training split (the validation part
held out, as the zoo does) and reports test accuracy. --widths cycles over the models (one entry:
all equal; several: heterogeneous widths).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import hetmerge as hm
from hetmerge import models as hmm
from hetmerge.benchmarks.common import print_table
from hetmerge.zoo import QUICK_RECIPES, RECIPES, load_data


def train_models(split, widths_list, n, seed, epochs, lr, batch_size):
    Xtr, ytr = split.X_train, split.y_train
    out = []
    for k in range(n):
        torch.manual_seed(seed * 100 + k)
        m = hmm.mlp(int(Xtr.shape[1]), widths_list[k % len(widths_list)], int(ytr.max()) + 1)
        out.append(hmm.train(m, Xtr, ytr, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed * 100 + k))
    return out


def cycle_error(pair, n, links) -> float:
    """Fraction of units (over all triples i<j<k and hidden links) where pair(i, k) differs from
    pair(j, k) ∘ pair(i, j); triples through a padded unit count the padded units as mismatches only
    when both sides are real units."""
    bad = total = 0
    for i, j, k in itertools.combinations(range(n), 3):
        for g in links:
            a, b, c = pair(i, j)[g], pair(j, k)[g], pair(i, k)[g]
            ok = a >= 0
            via = torch.full_like(a, -1)
            via[ok] = b[a[ok]]
            real = (via >= 0) & (c >= 0)
            bad += int((via[real] != c[real]).sum())
            total += int(real.sum())
    return bad / max(total, 1)


def run(args, seed, split, recipe) -> dict:
    t0 = time.perf_counter()
    models = train_models(split, args.widths, args.models, seed, args.epochs or recipe.epochs, recipe.lr,
                          recipe.batch_size)
    train_s = time.perf_counter() - t0
    Xte, yte = split.X_test, split.y_test
    accs = [hmm.accuracy(m, Xte, yte) for m in models]
    with torch.no_grad():
        ens = float((torch.stack([m(Xte).softmax(-1) for m in models]).mean(0).argmax(-1) == yte).float().mean())
    row = {"seed": seed, "models": f"{min(accs):.3f}-{max(accs):.3f}", "ensemble": ens}
    times, objs, res = {}, {}, {}
    for method in ("identity", "reference", "c2m3"):
        t0 = time.perf_counter()
        res[method] = hm.align_many(models, method=method, seed=seed)
        times[method] = time.perf_counter() - t0
        row[method] = hmm.accuracy(hm.merge_many(models, res[method]), Xte, yte)
        objs[method] = res[method].objective
    n = len(models)
    links = list(res["c2m3"].perms)
    t0 = time.perf_counter()
    indep = {(i, j): hm.align(models[i], models[j], seed=seed) for i in range(n) for j in range(i + 1, n)}
    times["pairwise"] = time.perf_counter() - t0
    row["cyc_pairwise"] = cycle_error(lambda i, j: indep[(i, j)].maps, n, links)
    row["cyc_c2m3"] = cycle_error(lambda i, j: res["c2m3"].pair(i, j).maps, n, links)
    indep_sum = sum(r.objective for r in indep.values())
    row["obj_ref/pw"] = objs["reference"] / indep_sum
    row["obj_c2m3/pw"] = objs["c2m3"] / indep_sum
    row["fw_steps"] = res["c2m3"].iterations
    row["t_c2m3_s"] = times["c2m3"]
    row["t_pairs_s"] = times["pairwise"]
    row["train_s"] = train_s
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--widths", nargs="+", default=["128,128"],
                    help="hidden widths per model, comma-separated; cycled over the models")
    ap.add_argument("--epochs", type=int, default=0, help="0: the zoo's recipe")
    ap.add_argument("--quick", action="store_true", help="the zoo's quick recipe (fewer epochs)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.models < 3:
        ap.error("--models: at least 3 (cycle consistency needs triples)")
    args.widths = [[int(w) for w in s.split(",")] for s in args.widths]
    torch.set_num_threads(args.threads)
    split = load_data(args.dataset)
    recipe = (QUICK_RECIPES if args.quick else RECIPES)[args.dataset]
    rows = [run(args, s, split, recipe) for s in args.seeds]
    if len(rows) > 1:
        mean = {"seed": "mean", "models": "", **{k: statistics.mean(r[k] for r in rows)
                                                 for k in rows[0] if k not in ("seed", "models")}}
        rows.append(mean)
    ws = " / ".join(",".join(map(str, w)) for w in args.widths)
    print_table(f"{args.models} MLPs ({ws}) on {args.dataset}, test accuracy of the uniform merge "
                f"(identity = no alignment, reference = each aligned to model 0, c2m3 = universe)", rows)


if __name__ == "__main__":
    main()
