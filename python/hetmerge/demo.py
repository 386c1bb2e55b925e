"""`hetmerge demo`: the whole Model Assembly Learning flow on a zoo of heterogeneous MLPs trained on
offline real data (sklearn digits, MNIST-1D), with a terminal table, report.json, plots and report.md.

Flow per data set: train/load the zoo -> for every (base arch, target arch) pair (base seed 0,
target seed 1): align by weight matching and sweep λ, aligned and unaligned (by position) ->
barrier heat maps -> λ curves of a few showcase pairs (same architecture, narrower / wider target,
deeper target, size-incompatible) -> one assembly of several zoo models into one base.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import report as R
from .zoo import ARCHS, QUICK_ARCHS, QUICK_RECIPES, RECIPES, ZooModel, cache_dir, train_zoo, zoo_layer_map

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    out: Path
    quick: bool = False
    datasets: list[str] = field(default_factory=lambda: ["digits", "mnist1d"])
    seeds: tuple[int, int] = (0, 1)
    lambdas: int = 21            # λ curves of the showcase pairs
    heat_lambdas: int = 11       # λ values per heat-map cell (the barrier needs only a coarse grid)
    restarts: int = 2
    acc_tol: float = 0.01
    device: str = "cpu"
    cache: Path | None = None
    retrain: bool = False
    assemble_on: str = "digits"
    progress: Callable | None = None           # tqdm-like factory, or None for no bars
    log: Callable[[str], None] = print


def _showcase(archs: dict[str, list[int]]) -> list[tuple[str, str, str]]:
    """(label, base arch, target arch) for the λ-curve figure, from whatever the zoo holds."""
    names = list(archs)
    ref = "128x2" if "128x2" in archs else names[0]
    w = archs[ref]
    out = [("same architecture", ref, ref)]
    narrower = [a for a in names if len(archs[a]) == len(w) and len(set(archs[a])) == 1 and archs[a][0] < w[0]]
    wider = [a for a in names if len(archs[a]) == len(w) and len(set(archs[a])) == 1 and archs[a][0] > w[0]]
    deeper = [a for a in names if len(archs[a]) > len(w)]
    incompatible = [a for a in names if len(set(archs[a])) > 1]
    for label, cands in (("narrower target (zero-padding)", narrower), ("wider target (units dropped)", wider),
                         ("deeper target (shallow layers)", deeper), ("size-incompatible (alternating P/Q)",
                                                                      incompatible)):
        if cands:
            out.append((label, ref, cands[-1] if label.startswith("narrower") else cands[0]))
    return out


OBJECTIVE_UNIT = "cosine similarity of the paired weights: sum <A, T(B)> / (||A|| ||B||)"


def _cosine(res, base, target) -> float:
    """res.objective (sum of inner products) in the unit of res.trace: divided by the norms of the
    paired base and target tensors."""
    sa, sb = base.state_dict(), target.state_dict()
    na = sum(float(sa[pp.base_key].double().square().sum()) for pp in res.pairing.params)
    nb = sum(float(sb[pp.target_key].double().square().sum()) for pp in res.pairing.params)
    return res.objective / ((na * nb) ** 0.5 or 1.0)


def _loss_acc(model, data) -> tuple[float, float]:
    X, y = data
    with torch.no_grad():
        logits = model(X)
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def _eval_pair(hm, b: ZooModel, t: ZooModel, test, lambdas, restarts: int, seed: int, tol: float) -> dict:
    lmap = zoo_layer_map(b.widths, t.widths)
    t0 = time.perf_counter()
    res = hm.align(b.model, t.model, layer_map=lmap, restarts=restarts, seed=seed)
    t_align = time.perf_counter() - t0
    t0 = time.perf_counter()
    un = hm.sweep(b.model, t.model, None, lambdas, data=test, layer_map=lmap, tol=tol)
    al = hm.sweep(b.model, t.model, res, lambdas, data=test, tol=tol)
    t_sweep = time.perf_counter() - t0
    cases = sorted(set(res.cases.values()))
    t_loss, t_acc = _loss_acc(t.model, test)
    b_loss, _ = _loss_acc(b.model, test)
    return {
        "base": b.name, "target": t.name, "base_arch": b.arch, "target_arch": t.arch,
        "layer_map": lmap, "cases": res.cases, "case": " + ".join(c.replace("size-", "") for c in cases),
        "base_acc": b.acc, "target_acc": t.acc, "base_loss": b_loss, "target_loss": t_loss,
        # λ = 1 is the target's weights in the base's architecture: the target model itself only when
        # nothing was dropped or left out (same depth, target no wider); else the barrier's right end
        # is another model, shown next to the target's own numbers
        "lam1_loss": float(al.loss[-1]), "lam1_acc": float(al.acc[-1]),
        "lam1_is_target": abs(float(al.loss[-1]) - t_loss) <= 1e-4 * max(1.0, t_loss),
        "lambdas": al.lambdas.tolist(),
        "unaligned": {"loss": un.loss.tolist(), "acc": un.acc.tolist(), "barrier": un.barrier,
                      "lam_star": un.lam_star},
        "aligned": {"loss": al.loss.tolist(), "acc": al.acc.tolist(), "barrier": al.barrier,
                    "lam_star": al.lam_star, "objective": _cosine(res, b.model, t.model),
                    "trace": list(res.trace),
                    "iterations": res.iterations, "converged": res.converged},
        "align_s": t_align, "sweep_s": t_sweep,
    }


def barrier_counts(results: dict[tuple[str, str], dict], eps: float = 1e-6) -> dict[str, Any]:
    """How alignment changed the barrier over all pairs: lower, equal (within eps: both ~0, no barrier
    to remove) and worse, the worse ones named as {"pair": "base<-target", "unaligned", "aligned"}."""
    lower = equal = 0
    worse = []
    for (a, b), r in results.items():
        un, al = r["unaligned"]["barrier"], r["aligned"]["barrier"]
        if al < un - eps:
            lower += 1
        elif al > un + eps:
            worse.append({"pair": f"{a}<-{b}", "unaligned": un, "aligned": al})
        else:
            equal += 1
    return {"pairs_aligned_lower": lower, "pairs_equal": equal, "pairs_aligned_worse": len(worse),
            "worse_pairs": worse, "pairs": len(results)}


def _acc_at(curve: dict, lambdas: list[float], lam: float) -> float:
    i = min(range(len(lambdas)), key=lambda k: abs(lambdas[k] - lam))
    return curve["acc"][i]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import hetmerge as hm

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache_dir(cfg.cache)
    archs = QUICK_ARCHS if cfg.quick else ARCHS
    recipes = QUICK_RECIPES if cfg.quick else RECIPES
    bar = cfg.progress

    t0 = time.perf_counter()
    zoo, splits = train_zoo(cfg.datasets, archs, cfg.seeds, recipes, cache, cfg.device, cfg.retrain,
                            progress=bar, log=cfg.log)
    t_zoo = time.perf_counter() - t0
    n_trained = sum(1 for z in zoo.values() if not z.cached)

    rep: dict[str, Any] = {
        "command": "hetmerge demo" + (" --quick" if cfg.quick else ""),
        "versions": R.versions(), "device": cfg.device, "threads": torch.get_num_threads(),
        "config": {"quick": cfg.quick, "datasets": cfg.datasets, "seeds": list(cfg.seeds),
                   "archs": archs, "recipes": {d: recipes[d].__dict__ for d in cfg.datasets},
                   "lambdas": cfg.lambdas, "heat_lambdas": cfg.heat_lambdas, "restarts": cfg.restarts,
                   "acc_tol": cfg.acc_tol, "align": {"method": "weight", "objective": "inner", "seed": 0,
                                                     "objective_unit": OBJECTIVE_UNIT},
                   "cache": str(cache)},
        "splits": {d: {"train": len(splits[d].y_train), "val": len(splits[d].y_val), "test": len(splits[d].y_test),
                       "note": "val held out of training (fixed seed): chooses λ in the assembly; "
                               "every reported accuracy, loss and barrier is on test"} for d in cfg.datasets},
        "zoo": [{"name": z.name, "dataset": z.dataset, "arch": z.arch, "widths": z.widths, "seed": z.seed,
                 "test_acc": z.acc, "train_s": z.train_s, "cached": z.cached, "file": str(z.path)}
                for z in zoo.values()],
        "timings": {"zoo_s": t_zoo, "models_trained": n_trained},
        "datasets": {}, "plots": {},
    }
    s_base, s_target = cfg.seeds
    fine = torch.linspace(0, 1, cfg.lambdas)
    coarse = torch.linspace(0, 1, cfg.heat_lambdas)
    names = list(archs)
    showcase = _showcase(archs)
    show_keys = {(b, t) for _, b, t in showcase}

    for d in cfg.datasets:
        Xtr, ytr, Xte, yte = splits[d]
        test = (Xte.to(cfg.device), yte.to(cfg.device))
        pairs = [(a, b) for a in names for b in names]
        p = bar(total=len(pairs), desc=f"{d}: align+sweep", unit="pair") if bar else None
        results: dict[tuple[str, str], dict] = {}
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for a, b in pairs:
                base, target = zoo[f"{d}/{a}/s{s_base}"], zoo[f"{d}/{b}/s{s_target}"]
                lam = fine if (a, b) in show_keys else coarse
                r = _eval_pair(hm, base, target, test, lam, cfg.restarts, 0, cfg.acc_tol)
                results[(a, b)] = r
                if p is not None:
                    al = r["aligned"]
                    p.set_postfix_str(f"{a}<-{b} barrier {r['unaligned']['barrier']:.2f}->"
                                      f"{al['barrier']:.2f}, cosine {al['trace'][0]:.3f}->{al['objective']:.3f} "
                                      f"in {al['iterations']} sweeps")
                    p.update(1)
        if p is not None:
            p.close()
        t_pairs = time.perf_counter() - t0
        before = [[results[(a, b)]["unaligned"]["barrier"] for b in names] for a in names]
        after = [[results[(a, b)]["aligned"]["barrier"] for b in names] for a in names]
        show = []
        for label, a, b in showcase:
            r = dict(results[(a, b)])
            r["label"] = label
            show.append(r)
        rep["datasets"][d] = {
            "archs": names, "barrier_unaligned": before, "barrier_aligned": after,
            **barrier_counts(results),
            "not_target_at_lam1": [f"{a}<-{b}" for a, b in pairs if not results[(a, b)]["lam1_is_target"]],
            "mean_barrier_unaligned": sum(map(sum, before)) / len(pairs),
            "mean_barrier_aligned": sum(map(sum, after)) / len(pairs),
            "showcase": show,
            "all_pairs": [{k: v for k, v in r.items() if k not in ("lambdas",)} | {"lambdas": r["lambdas"]}
                          for r in results.values()],
            "pairs_s": t_pairs,
        }
        plots = rep["plots"].setdefault(d, {})
        plots["lambda_curves"] = R.plot_sweeps(
            [{"name": f"{s['label']}\n{s['base_arch']} ← {s['target_arch']}", "lambdas": s["lambdas"],
              "aligned": s["aligned"], "unaligned": s["unaligned"]} for s in show],
            out / f"{d}_lambda_curves.png",
            f"{d}: merging the target into the base, aligned vs unaligned (test set)").name
        plots["barrier_heatmap"] = R.plot_heatmaps(
            names, before, after, out / f"{d}_barrier_heatmap.png",
            f"{d}: loss barrier for every architecture pair (base seed {s_base}, target seed {s_target})").name
        plots["alignment_traces"] = R.plot_traces(
            {f"{s['base_arch']} ← {s['target_arch']}": s["aligned"]["trace"] for s in show},
            out / f"{d}_alignment_traces.png", f"{d}: weight-matching convergence (best restart)",
            ylabel="objective: " + OBJECTIVE_UNIT).name

    # assembly: several zoo models integrated one by one into a base, λ picked by hm.assemble on the
    # validation split and reported on the test split
    if cfg.assemble_on in cfg.datasets:
        d = cfg.assemble_on
        sp = splits[d]
        test = (sp.X_test.to(cfg.device), sp.y_test.to(cfg.device))
        val = (sp.X_val.to(cfg.device), sp.y_val.to(cfg.device))
        ref = "128x2" if "128x2" in archs else names[0]
        base = zoo[f"{d}/{ref}/s{s_base}"]
        members = [zoo[f"{d}/{a}/s{s_target}"] for a in names if a != ref][:5] + [zoo[f"{d}/{ref}/s{s_target}"]]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            merged, steps = hm.assemble(
                base.model, {m.name: m.model for m in members}, data=val, eval_data=test, tol=cfg.acc_tol,
                lambdas=torch.linspace(0, 1, cfg.heat_lambdas), restarts=cfg.restarts,
                layer_maps={m.name: zoo_layer_map(base.widths, m.widths) for m in members})
        t_asm = time.perf_counter() - t0
        from .models import accuracy
        final_acc = accuracy(merged, *test)
        rows = [{"model": base.name, "lam": 0.0, "replaced": False, "test_acc": base.acc,
                 "val_acc": accuracy(base.model, *val), "member_acc": None}]
        for st, m in zip(steps, members):
            rows.append({"model": st.model, "lam": st.lam, "replaced": st.replaced, "lam_star": st.lam_star,
                         "barrier": st.barrier, "val_acc": st.after["base_acc"],
                         "val_acc_before": st.before["base_acc"], "test_acc": st.eval_after["base_acc"],
                         "test_acc_before": st.eval_before["base_acc"], "member_acc": m.acc, "time_s": st.time})
        rep["assembly"] = {"dataset": d, "base": base.name, "members": [m.name for m in members],
                           "selected_on": "val", "reported_on": "test", "lam_max": "largest swept λ below 1",
                           "replacements": [r["model"] for r in rows if r["replaced"]],
                           "steps": rows, "final_acc": final_acc, "base_acc": base.acc, "seconds": t_asm}
        rep["plots"]["assembly"] = R.plot_assembly(
            [{**r, "model": r["model"].split("/", 1)[1]} for r in rows], out / "assembly.png",
            f"{d}: assembling {len(members)} zoo models into {base.arch} (λ < 1 chosen on validation, "
            f"within {100 * cfg.acc_tol:.0f} point of the base)",
            member_label=f"model merged in, alone (test; same domain: {d})").name
    rep["timings"]["total_s"] = time.perf_counter() - t_start
    return rep


# ---------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------

_SHOW_COLS = ["pair", "case", "barrier_unal", "barrier_al", "lam*_unal", "lam*_al", "acc_base", "acc_target",
              "loss_target", "loss@1_al", "1=target", "acc@0.5_unal", "acc@0.5_al", "align_ms", "sweep_ms"]

_LAM1_NOTE = ("1=target: whether λ = 1 (the barrier's right end: the target's weights moved into the base's "
              "architecture) is the target model itself; where it is 'no' (wider target: units dropped; "
              "other depth: the base's unpaired layers kept) the barrier is measured against that model, "
              "not the target: compare loss@1_al with the target's own loss_target")


def showcase_rows(ds: dict) -> list[dict]:
    rows = []
    for s in ds["showcase"]:
        lam = s["lambdas"]
        rows.append({"pair": f"{s['base_arch']} <- {s['target_arch']}", "case": s["label"].split(" (")[0],
                     "barrier_unal": s["unaligned"]["barrier"], "barrier_al": s["aligned"]["barrier"],
                     "lam*_unal": s["unaligned"]["lam_star"], "lam*_al": s["aligned"]["lam_star"],
                     "acc_base": 100 * s["base_acc"], "acc_target": 100 * s["target_acc"],
                     "loss_target": s["target_loss"], "loss@1_al": s["lam1_loss"], "1=target": s["lam1_is_target"],
                     "acc@0.5_unal": 100 * _acc_at(s["unaligned"], lam, 0.5),
                     "acc@0.5_al": 100 * _acc_at(s["aligned"], lam, 0.5),
                     "align_ms": 1000 * s["align_s"], "sweep_ms": 1000 * s["sweep_s"]})
    return rows


def _counts(ds: dict) -> str:
    """'aligned lower in 34/49 pairs, equal in 12, worse in 3: 64x4<-64x4 (1.350 -> 1.670), ...' (tiny
    barriers in e-notation, so that a pair listed as worse never reads '0.00 -> 0.00')."""
    worse = ds["worse_pairs"]
    text = (f"aligned lower in {ds['pairs_aligned_lower']}/{ds['pairs']} pairs, equal in {ds['pairs_equal']}, "
            f"worse in {len(worse)}")
    if worse:
        text += ": " + ", ".join(f"{w['pair']} ({R.fmt(w['unaligned'])} -> {R.fmt(w['aligned'])})" for w in worse)
    return text


def _assembly_rows(a: dict) -> list[dict]:
    return [{"step": i, "model merged in": r["model"], "lam": r["lam"], "replaced": r["replaced"],
             "lam*": r.get("lam_star"), "barrier": r.get("barrier"), "val_acc": 100 * r["val_acc"],
             "test_acc": 100 * r["test_acc"],
             "alone_test_acc": None if r["member_acc"] is None else 100 * r["member_acc"]}
            for i, r in enumerate(a["steps"])]


def terminal_summary(rep: dict) -> str:
    lines = []
    z = rep["zoo"]
    lines.append(f"zoo: {len(z)} MLPs ({rep['timings']['models_trained']} trained, "
                 f"{len(z) - rep['timings']['models_trained']} from cache) in {rep['timings']['zoo_s']:.1f} s")
    for d, ds in rep["datasets"].items():
        accs = [m["test_acc"] for m in z if m["dataset"] == d]
        lines.append("")
        lines.append(f"{d}: {len(accs)} models, test accuracy {100 * min(accs):.1f}-{100 * max(accs):.1f}%; "
                     f"barrier = max over λ of test loss above the straight line; λ* = largest λ within "
                     f"{100 * rep['config']['acc_tol']:.0f} point of the base's accuracy; accuracies in %")
        lines.append(R.table(showcase_rows(ds), _SHOW_COLS, align_left=["pair", "case"]))
        lines.append("  " + _LAM1_NOTE)
        lines.append(f"  all {ds['pairs']} architecture pairs: mean barrier {ds['mean_barrier_unaligned']:.3f} "
                     f"unaligned -> {ds['mean_barrier_aligned']:.3f} aligned; {_counts(ds)} "
                     f"({ds['pairs_s']:.1f} s)")
        lines.append(f"  λ = 1 is not the target model in {len(ds['not_target_at_lam1'])}/{ds['pairs']} pairs "
                     "(different depth, or wider target)")
    if "assembly" in rep:
        a = rep["assembly"]
        lines.append("")
        lines.append(f"assembly on {a['dataset']}: {len(a['members'])} zoo models merged one by one into "
                     f"{a['base']} ({a['seconds']:.1f} s)")
        lines.append(R.table(_assembly_rows(a), align_left=["model merged in"]))
        lines.append("  λ chosen on the validation split (< 1: λ = 1 would replace the base); accuracies on "
                     "the test split unless marked val")
        lines.append(f"  base test accuracy {100 * a['base_acc']:.1f}% -> assembled model "
                     f"{100 * a['final_acc']:.1f}%" + (f"; steps that REPLACED the base: {', '.join(a['replacements'])}"
                                                        if a["replacements"] else ""))
    lines.append("")
    lines.append(f"total {rep['timings']['total_s']:.1f} s on {rep['device']} ({rep['threads']} threads)")
    return "\n".join(lines)


def markdown(rep: dict) -> str:
    md = ["# hetmerge demo report", "",
          f"`{rep['command']}` — hetmerge {rep['versions'].get('hetmerge', '?')}, torch {rep['versions']['torch']}, "
          f"{rep['device']}, total {rep['timings']['total_s']:.1f} s. Every number is in `report.json`.", "",
          "Zoo: MLPs trained (seeded, cached) on offline real data; base models use seed "
          f"{rep['config']['seeds'][0]}, targets seed {rep['config']['seeds'][1]}. Alignment: weight matching "
          f"({rep['config']['restarts']} restarts). Unaligned = target units paired by position "
          "(zero-padded / cropped). Barrier = max over λ of the test loss above the straight line between "
          "the endpoints; λ* = largest λ whose base-domain test accuracy stays within "
          f"{100 * rep['config']['acc_tol']:.0f} point of the base's. Alignment objectives are in one unit: "
          f"{OBJECTIVE_UNIT}.", "", _LAM1_NOTE + ".", ""]
    for d, ds in rep["datasets"].items():
        p = rep["plots"][d]
        md += [f"## {d}", "",
               R.markdown_table(showcase_rows(ds), _SHOW_COLS), "",
               f"All {ds['pairs']} architecture pairs: mean barrier {ds['mean_barrier_unaligned']:.3f} unaligned, "
               f"{ds['mean_barrier_aligned']:.3f} aligned; {_counts(ds)} (equal: no barrier either way). "
               f"λ = 1 is not the target model in {len(ds['not_target_at_lam1'])} of {ds['pairs']} pairs.", "",
               f"![λ curves]({p['lambda_curves']})", "", f"![barrier heat map]({p['barrier_heatmap']})", "",
               f"![alignment traces]({p['alignment_traces']})", ""]
    if "assembly" in rep:
        a = rep["assembly"]
        md += ["## Assembly", "",
               f"{len(a['members'])} zoo models merged one by one into {a['base']}; each λ is the one "
               "`hm.assemble` picks on the validation split under the accuracy tolerance, capped below 1 "
               "(λ = 1 would replace the base, not assemble); accuracies in % on the test split, val_acc on "
               "the validation split that chose λ. The zoo models come from the base's own domain, so "
               "alone_test_acc is each model's own test accuracy, not a target-domain number."
               + (f" Steps that replaced the base: {', '.join(a['replacements'])}." if a["replacements"] else ""), "",
               R.markdown_table(_assembly_rows(a), list(_assembly_rows(a)[0])), "",
               f"![assembly]({rep['plots']['assembly']})", ""]
    md += ["## Versions", "", "| package | version |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rep["versions"].items()]
    return "\n".join(md) + "\n"
