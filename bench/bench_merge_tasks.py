"""Multi-task merging: accuracy on digits tasks, and speed on Llama-shaped tensors.

    python bench/bench_merge_tasks.py                     # both parts, small speed table (about 3 min, 2 cores)
    python bench/bench_merge_tasks.py --only accuracy     # 7 digits tasks, about 1.5 min; or: --only speed
    python bench/bench_merge_tasks.py --only speed --shapes 4096x4096 4096x11008 --threads 1 2 \
        --tsv-shapes 1024x1024 1024x2752 --json out.json # docs/merge_tasks.md's table (about 13 min)

Accuracy: an MLP trunk pretrained on sklearn digits (hetmerge.data.digits), then one expert per
fixed task (digits rotated by 90° and 180°, mirrored, inverted, pixel-permuted, shifted, parity
labels), each fine-tuning the whole trunk with its own head. Heads are not merged: the merged trunk
is evaluated with each expert's head. scale (and density; MASS's layer and rank; NeuLig's alpha)
are chosen on the validation split by the mean normalized accuracy (merged / expert) and reported
on the test split. MASS is also scored without task labels (the head of the task it routes to), with
its routing accuracy; NeuLig with its ensemble and the merge-vs-ensemble gap. Fixed seeds throughout.

Speed: hm.merge_tasks' per-tensor handlers against the straightforward torch code for the same
formula, on random float32 tensors shaped like Llama-7B's projections, T experts, best of --repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hetmerge as hm  # noqa: E402
from common import best_time, print_table  # noqa: E402
from hetmerge.data import digits  # noqa: E402
from hetmerge.tasks.registry import TensorContext, get_task_method  # noqa: E402

# ---------------------------------------------------------------------------------------------
# accuracy: digits tasks
# ---------------------------------------------------------------------------------------------

WIDTH = 128


def trunk() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU())


def _img(X):
    return X.view(-1, 8, 8)


PERM = torch.randperm(64, generator=torch.Generator().manual_seed(123))
TASKS = {   # name: (input transform, label transform, classes)
    "rotate90": (lambda X: torch.rot90(_img(X), 1, (1, 2)).reshape(-1, 64), lambda y: y, 10),
    "mirror": (lambda X: torch.flip(_img(X), (2,)).reshape(-1, 64), lambda y: y, 10),
    "invert": (lambda X: 1.0 - X, lambda y: y, 10),
    "permute": (lambda X: X[:, PERM], lambda y: y, 10),
    "parity": (lambda X: X, lambda y: y % 2, 2),
    "rotate180": (lambda X: torch.rot90(_img(X), 2, (1, 2)).reshape(-1, 64), lambda y: y, 10),
    # two pixels to the right, zeros entering on the left (a translation, not a roll)
    "shift": (lambda X: F.pad(_img(X), (2, 0))[:, :, :8].reshape(-1, 64), lambda y: y, 10),
}


def fit(model, head, X, y, epochs, lr, seed):
    """Adam on cross-entropy over trunk + head, seeded minibatches; in place."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(model(X[idx])), y[idx]).backward()
            opt.step()


@torch.no_grad()
def acc(model, head, X, y) -> float:
    return (head(model(X)).argmax(-1) == y).float().mean().item()


GRIDS = {   # method -> list of (scale, density); density None for the methods without it
    "task_arithmetic": [(s, None) for s in (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)],
    "ties": [(s, d) for d in (0.1, 0.2, 0.4, 0.7) for s in (0.6, 0.8, 1.0, 1.3, 1.6)],
    "dare": [(s, d) for d in (0.3, 0.5, 0.8) for s in (0.2, 0.3, 0.4, 0.6)],
    "dare_ties": [(s, d) for d in (0.3, 0.5, 0.8) for s in (0.6, 0.8, 1.0, 1.3)],
    "tsv": [(s, None) for s in (0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5)],
}
# input-dependent methods: their own knobs (scale 1 keeps a routed input's model = its expert's rank-k
# reconstruction; NeuLig's β already sums to 1)
MASS_GRID = [{"layer": layer, "rank": r} for layer in ("0", "2") for r in (None, 4, 8, 16)]
NEULIG_GRID = [{"alpha": a} for a in (0.0, 0.3, 3.0, 30.0)]
NEULIG_PER_TASK = 150   # labeled training inputs per task for Portland (from the training split)


@torch.no_grad()
def acc_routed(model, heads: list, X, y) -> tuple[float, float, torch.Tensor]:
    """MASS with no task label: the head of the task each input is routed to.
    (accuracy, routing accuracy is computed by the caller, routed task per input)."""
    tasks = model.route(X)[0][:, 0]
    out = model(X)
    hit = torch.zeros(len(y), dtype=torch.bool)
    for t in tasks.unique().tolist():
        i = tasks == t
        hit[i] = heads[t](out[i]).argmax(-1) == y[i]
    return hit.float().mean().item(), tasks


def build_tasks(seed: int = 0):
    """(base trunk, experts, heads, data) of the digits tasks: data[name] = {"val": (X, y), "test": (X, y)}
    plus "train"; seeded, so every caller gets the same models."""
    torch.manual_seed(seed)
    split = digits(seed=seed, val_size=300)
    Xtr, ytr, Xva, yva, Xte, yte = split.X_train, split.y_train, split.X_val, split.y_val, split.X_test, split.y_test
    base = trunk()
    head0 = nn.Linear(WIDTH, 10)
    fit(base, head0, Xtr, ytr, epochs=30, lr=3e-3, seed=seed)
    experts, heads, data = {}, {}, {}
    for i, (name, (fx, fy, classes)) in enumerate(TASKS.items()):
        data[name] = {"val": (fx(Xva), fy(yva)), "test": (fx(Xte), fy(yte))}
        m = trunk()
        m.load_state_dict(base.state_dict())
        torch.manual_seed(seed + 100 + i)
        h = nn.Linear(WIDTH, classes)
        if classes == 10:   # start from the pretrained head: a fine-tune, not a new problem
            h.load_state_dict(head0.state_dict())
        fit(m, h, fx(Xtr), fy(ytr), epochs=25, lr=2e-3, seed=seed + i)
        experts[name], heads[name] = m, h
        data[name]["train"] = (fx(Xtr), fy(ytr))
    return base, experts, heads, data


def run_accuracy(seed: int = 0) -> dict:
    t_start = time.perf_counter()
    base, experts, heads, data = build_tasks(seed)
    t_train = time.perf_counter() - t_start

    def scores(model, part):
        return {n: acc(model, heads[n], *data[n][part]) for n in TASKS}

    expert_val = {n: acc(experts[n], heads[n], *data[n]["val"]) for n in TASKS}
    expert_test = {n: acc(experts[n], heads[n], *data[n]["test"]) for n in TASKS}
    rows, results = [], {}

    def add_row(label, test, hp=""):
        norm = {n: test[n] / expert_test[n] for n in TASKS}
        row = {"method": label, "chosen": hp}
        for n in TASKS:
            row[n] = f"{100 * test[n]:.1f} ({100 * norm[n]:.0f}%)"
        row["mean abs"] = 100 * sum(test.values()) / len(TASKS)
        row["mean norm %"] = 100 * sum(norm.values()) / len(TASKS)
        rows.append(row)
        return {"test": test, "normalized": norm, "mean_abs": row["mean abs"] / 100, "mean_norm": row["mean norm %"] / 100}

    results["experts"] = add_row("experts (individual)", expert_test)
    results["base"] = add_row("base trunk (zero-shot)", scores(base, "test"))
    ex = [experts[n] for n in TASKS]
    for method, grid in GRIDS.items():
        best, t_merge = None, []
        for s, d in grid:
            t0 = time.perf_counter()
            merged = hm.merge_tasks(base, ex, method, scale=s, density=d, seed=seed)
            t_merge.append(time.perf_counter() - t0)
            v = scores(merged, "val")
            val = sum(v[n] / expert_val[n] for n in TASKS) / len(TASKS)
            if best is None or val > best[0]:
                best = (val, s, d, merged)
        val, s, d, merged = best
        hp = f"scale={s}" + (f", density={d}" if d is not None else "")
        results[method] = add_row(method, scores(merged, "test"), hp)
        results[method].update({"scale": s, "density": d, "val_mean_norm": val,
                                "merge_s_median": sorted(t_merge)[len(t_merge) // 2], "grid_size": len(grid)})
        rows[-1]["merge ms"] = 1000 * results[method]["merge_s_median"]
    names = list(TASKS)
    head_list = [heads[n] for n in names]

    # MASS: knobs on val (task-known heads, as the rows above), then test with and without task labels
    best, mass_rows = None, []
    for opts in MASS_GRID:
        t0 = time.perf_counter()
        m = hm.merge_tasks(base, ex, "mass", **opts)
        t_build = time.perf_counter() - t0
        v = scores(m, "val")
        val = sum(v[n] / expert_val[n] for n in TASKS) / len(TASKS)
        with torch.no_grad():
            rv = [(m.route(data[n]["val"][0])[0][:, 0] == t).float().mean().item() for t, n in enumerate(names)]
        mass_rows.append({"layer": opts["layer"], "rank": f"{opts['rank'] or 'auto'} (k={m.rank})",
                          "val routing %": 100 * sum(rv) / len(rv), "val mean norm %": 100 * val})
        if best is None or val > best[0]:
            best = (val, opts, m, t_build)
    val, opts, m, t_build = best
    hp = f"layer {opts['layer']}, rank {opts['rank'] or 'auto'} (k={m.rank})"
    t0 = time.perf_counter()
    results["mass"] = add_row("mass (task head)", scores(m, "test"), hp)
    t_eval = time.perf_counter() - t0
    routed, route_acc = {}, {}
    for t, n in enumerate(names):
        routed[n], tasks = acc_routed(m, head_list, *data[n]["test"])
        route_acc[n] = (tasks == t).float().mean().item()
    results["mass_no_label"] = add_row("mass (routed head, no task label)", routed, hp)
    results["mass"].update({"options": opts, "val_mean_norm": val, "build_s": t_build, "eval_s": t_eval,
                            "routing_acc": route_acc})
    rows[-2]["merge ms"] = rows[-1]["merge ms"] = 1000 * t_build

    # NeuLig: Portland trained on labeled training inputs of every task (the task picks the head in the
    # loss, as in the paper's per-dataset heads); alpha chosen on val; merged and ensemble on test
    tr = {n: (data[n]["train"][0][:NEULIG_PER_TASK], data[n]["train"][1][:NEULIG_PER_TASK]) for n in TASKS}
    Xn = torch.cat([tr[n][0] for n in names])
    yn = torch.cat([torch.stack([torch.full_like(tr[n][1], t), tr[n][1]], 1) for t, n in enumerate(names)])

    def task_head_loss(out, y):
        loss = out.new_zeros(())
        for t in y[:, 0].unique().tolist():
            i = y[:, 0] == t
            loss = loss + F.cross_entropy(head_list[t](out[i]), y[i, 1], reduction="sum")
        return loss / len(y)

    best, neulig_rows = None, []
    for opts in NEULIG_GRID:
        t0 = time.perf_counter()
        m = hm.merge_tasks(base, ex, "neulig", data=(Xn, yn), loss=task_head_loss, seed=seed, **opts)
        t_build = time.perf_counter() - t0
        with torch.no_grad():
            v = scores(m, "val")
            ve = {n: acc(m.ensemble, heads[n], *data[n]["val"]) for n in names}
        val = sum(v[n] / expert_val[n] for n in TASKS) / len(TASKS)
        neulig_rows.append({"alpha": opts["alpha"], "val merged %": 100 * sum(v.values()) / len(v),
                            "val ensemble %": 100 * sum(ve.values()) / len(ve),
                            "gap (ens − merged)": 100 * sum(ve[n] - v[n] for n in names) / len(names),
                            "final L_a": m.history[-1]["align"], "final L_b": m.history[-1]["boost"],
                            "train s": t_build})
        if best is None or val > best[0]:
            best = (val, opts, m, t_build)
    val, opts, m, t_build = best
    hp = f"alpha {opts['alpha']}"
    with torch.no_grad():
        t0 = time.perf_counter()
        results["neulig"] = add_row("neulig (merged, per-sample β)", scores(m, "test"), hp)
        t_eval = time.perf_counter() - t0
        ens = {n: acc(m.ensemble, heads[n], *data[n]["test"]) for n in names}
        beta = {n: m.coefficients(data[n]["test"][0]).mean(0).tolist() for n in names}
    results["neulig_ensemble"] = add_row("neulig ensemble (same β)", ens, hp)
    results["neulig"].update({"options": opts, "val_mean_norm": val, "build_s": t_build, "eval_s": t_eval,
                              "gap": {n: results["neulig_ensemble"]["test"][n] - results["neulig"]["test"][n]
                                      for n in names},
                              "mean_beta": beta, "history_first_last": [m.history[0], m.history[-1]]})
    rows[-2]["merge ms"] = rows[-1]["merge ms"] = 1000 * t_build
    wall = time.perf_counter() - t_start
    print_table(f"digits tasks: test accuracy % (normalized = merged / expert), {len(TASKS)} experts, "
                f"trunk 64-{WIDTH}-{WIDTH}; scale/density chosen on {len(yva)} validation samples", rows,
                ["method", "chosen", *TASKS, "mean abs", "mean norm %", "merge ms"])
    print(f"wall: {wall:.1f} s (training base + {len(TASKS)} experts {t_train:.1f} s)")
    print_table("MASS knobs (validation): routing accuracy without task labels, mean normalized accuracy",
                mass_rows)
    print_table("NeuLig alpha (validation): mean accuracy of the merged model and the ensemble with the same β",
                neulig_rows)
    results["mass"]["grid"], results["neulig"]["grid"] = mass_rows, neulig_rows
    ra = results["mass"]["routing_acc"]
    print("MASS routing accuracy (no task labels; chance " f"{100 / len(TASKS):.0f}%): " +
          ", ".join(f"{n} {100 * ra[n]:.1f}" for n in names) + f"; mean {100 * sum(ra.values()) / len(ra):.1f}")
    gap = results["neulig"]["gap"]
    print("NeuLig ensemble − merged (points): " + ", ".join(f"{n} {100 * gap[n]:+.1f}" for n in names) +
          f"; mean {100 * sum(gap.values()) / len(gap):+.1f}")
    print("NeuLig mean β per task's test inputs (rows: task, columns: expert): " +
          "; ".join(f"{n} [{' '.join(f'{b:.2f}' for b in results['neulig']['mean_beta'][n])}]" for n in names))
    ta = results["task_arithmetic"]["test"]
    for key in [*GRIDS, "mass", "mass_no_label", "neulig"]:
        worse = [n for n in names if results[key]["test"][n] < ta[n]]
        results[key]["worse_than_ta"] = worse
        if key != "task_arithmetic":
            print(f"worse than task_arithmetic: {key}: {len(worse)} ({', '.join(worse) or '-'})")
    return {"tasks": names, "results": results, "wall_s": wall, "train_s": t_train}


# ---------------------------------------------------------------------------------------------
# speed: Llama-shaped tensors, ours vs the straightforward torch code
# ---------------------------------------------------------------------------------------------


def plain_task_arithmetic(b, es, s, d):
    return b + s * sum(e - b for e in es)


def plain_ties(b, es, s, d):
    taus = []
    for e in es:
        t = e - b
        k = max(1, int(d * t.numel()))
        idx = torch.topk(t.abs().flatten(), k).indices
        mask = torch.zeros(t.numel(), dtype=torch.bool)
        mask[idx] = True
        taus.append(t * mask.view(t.shape))
    tau = torch.stack(taus)
    sign = torch.where(tau.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(tau) == sign
    return b + s * (tau * agree).sum(0) / agree.sum(0).clamp(min=1)


def plain_dare(b, es, s, d):
    out = b.clone()
    for e in es:
        out += s * torch.bernoulli(torch.full_like(b, d)) * (e - b) / d
    return out


PLAIN = {"task_arithmetic": plain_task_arithmetic, "ties": plain_ties, "dare": plain_dare}


def run_speed(shapes, T: int, threads_list, repeat: int, tsv_shapes) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    cases = [(m, sh) for sh in shapes for m in ("task_arithmetic", "ties", "dare")] + \
            [("tsv", sh) for sh in tsv_shapes]
    for shape in sorted(set(shapes) | set(tsv_shapes)):
        b = torch.randn(shape, generator=g) * 0.02
        es = [b + 1e-3 * torch.randn(shape, generator=g) for _ in range(T)]
        for method, sh in cases:
            if sh != shape:
                continue
            meth = get_task_method(method)
            d = 0.3 if meth.uses_density else None
            ctx = TensorContext("w", 1.0, d, 0, dict(meth.options))
            for th in threads_list:
                torch.set_num_threads(th)
                hm.set_num_threads(th)
                ours = best_time(lambda: meth.handler(b, es, ctx), repeat=repeat, warmup=0 if method == "tsv" else 1)
                plain = PLAIN.get(method)
                ref = best_time(lambda: plain(b, es, 1.0, d), repeat=repeat) if plain else None
                rows.append({"method": method, "shape": "x".join(map(str, shape)), "experts": T, "threads": th,
                             "ours s": ours, "torch s": ref, "speedup": None if ref is None else ref / ours})
                print("  ", rows[-1], flush=True)
        del b, es
    print_table(f"speed: one tensor, float32, {T} experts, best of {repeat} (torch = the straightforward "
                "torch code for the same formula)", rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["accuracy", "speed"], default=None)
    p.add_argument("--shapes", nargs="*", default=["4096x4096"])
    p.add_argument("--tsv-shapes", nargs="+", default=["512x512"],
                   help="TSV is SVD-bound (5 SVDs per matrix): smaller shapes keep the run short")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    parse = lambda s: tuple(int(x) for x in s.lower().split("x"))  # noqa: E731
    print(f"hetmerge {hm.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    out = {}
    t0 = time.perf_counter()
    if args.only in (None, "accuracy"):
        torch.set_num_threads(1)   # tiny MLPs: one thread is fastest on a shared machine
        hm.set_num_threads(1)
        out["accuracy"] = run_accuracy()
    if args.only in (None, "speed"):
        out["speed"] = run_speed([parse(s) for s in args.shapes], args.experts, args.threads, args.repeat,
                                 [parse(s) for s in args.tsv_shapes])
    print(f"\ntotal wall: {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
