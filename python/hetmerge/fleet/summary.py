"""The zoo study's report: strict JSON (hetmerge.report), the barrier heat map, the λ* table, the
suggested assembly order, and report.md. Built from the saved model and pair files only, so a
resumed study reports exactly what an uninterrupted one does (timings and versions aside, kept
under "run").

Assembly order rule: the base is the best model on validation (accuracy, then loss, then name);
the others follow by ascending validation loss barrier of the pair (base <- model), the pair
hm.assemble would merge first; models whose pair with the base was not run (sampled out),
is incompatible or failed come after, unordered, with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import report as R

__all__ = ["build_report", "write_outputs", "lam_table", "assembly_order", "plot_barriers", "REPORT_FILES"]

REPORT_FILES = ("report.json", "barrier_heatmap.png", "report.md")

ORDER_RULE = ("base = best model on validation (accuracy, then loss, then name); then the others by "
              "ascending validation loss barrier of the pair (base <- model); models without a result "
              "for that pair last")


def _pair_entry(doc: dict) -> dict:
    e = {"base": doc["base"], "target": doc["target"], "status": doc["status"]}
    if doc["status"] != "ok":
        e["reason"] = doc.get("reason")
        if doc.get("errors"):
            e["errors"] = doc["errors"]
    e.update(doc.get("result") or {})
    return e


def lam_table(pairs: list[dict]) -> list[dict]:
    """One row per pair: barrier (validation, test), λ*, accuracy at λ* (validation, test)."""
    rows = []
    for p in pairs:
        s = p.get("sweep") or {}
        cases = (p.get("compat") or {}).get("cases") or {}
        kinds = sorted(set(cases.values()))
        rows.append({"base": p["base"], "target": p["target"], "status": p["status"],
                     "layers": ", ".join(kinds) if kinds else "-",
                     "barrier val": s.get("barrier"), "barrier test": s.get("test_barrier"),
                     "λ*": s.get("lam_star"),
                     "acc@λ* val %": None if s.get("val_acc_at_lam_star") is None else 100 * s["val_acc_at_lam_star"],
                     "acc@λ* test %": None if s.get("test_acc_at_lam_star") is None else 100 * s["test_acc_at_lam_star"]})
    return rows


def assembly_order(usable: list[dict], pairs: list[dict]) -> dict:
    from .study import ranked

    if not usable:
        return {"rule": ORDER_RULE, "base": None, "order": [], "unplaced": []}
    base = ranked(usable)[0]["name"]
    by_pair = {(p["base"], p["target"]): p for p in pairs}
    placed, unplaced = [], []
    for m in usable:
        if m["name"] == base:
            continue
        p = by_pair.get((base, m["name"]))
        if p is None:
            unplaced.append({"model": m["name"], "reason": f"pair {base} <- {m['name']} was not run (sampled out, "
                             "or --one-way made the model the base)"})
        elif p["status"] != "ok":
            unplaced.append({"model": m["name"], "reason": f"{p['status']}: {p.get('reason')}"})
        else:
            s = p["sweep"]
            placed.append({"model": m["name"], "barrier": s["barrier"], "lam_star": s["lam_star"],
                           "val_acc_at_lam_star": s["val_acc_at_lam_star"]})
    placed.sort(key=lambda e: (e["barrier"], e["model"]))
    return {"rule": ORDER_RULE, "base": base, "order": placed, "unplaced": unplaced}


def build_report(cfg, models: list[dict], usable: list[dict], pair_docs: list[dict], universe, run) -> dict:
    from .study import config_dict

    pairs = [_pair_entry(d) for d in pair_docs]
    names = [m["name"] for m in usable]
    idx = {n: i for i, n in enumerate(names)}
    heat: list[list[Any]] = [[None] * len(names) for _ in names]
    for p in pairs:
        if p["status"] == "ok":
            heat[idx[p["base"]]][idx[p["target"]]] = p["sweep"]["barrier"]
    counts = {s: sum(1 for p in pairs if p["status"] == s) for s in ("ok", "incompatible", "failed")}
    return R.to_jsonable({
        "created_by": "hetmerge zoo",
        "config": {k: v for k, v in config_dict(cfg).items() if k != "out"},
        "models": models, "pair_counts": counts, "pairs": pairs,
        "heatmap": {"labels": names, "barrier": heat,
                    "what": "validation loss barrier; row = base (architecture kept), column = target"},
        "lam_table": lam_table(pairs), "assembly_order": assembly_order(usable, pairs),
        # what may differ between two runs of the same study (resumed or not): kept apart
        "universe": universe, "run": {**run, "versions": R.versions()}})


def plot_barriers(labels: list[str], barrier, path: Path, title: str, universe=None) -> Path:
    """Heat map of the aligned validation barrier (grey: not run, incompatible or failed); with a
    C2M3 universe, a second panel for the universe's barrier on one colour scale."""
    import numpy as np

    plt = R._plt()
    mats = [("pairwise weight matching", barrier)] + ([("C2M3 universe", universe)] if universe is not None else [])
    arrs = [np.array([[np.nan if v is None else v for v in row] for row in M], dtype=float) for _, M in mats]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrs]) if arrs else np.array([])
    vmin, vmax = (min(0.0, float(finite.min())), float(finite.max())) if finite.size else (0.0, 1.0)
    n = len(labels)
    size = max(4.0, 0.45 * n + 2.5)
    fig, axes = plt.subplots(1, len(mats), figsize=(size * len(mats) + 1.2, size), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    if n == 0:   # every model failed or was left out: say so instead of an empty axis
        axes[0, 0].text(0.5, 0.5, "no usable models", ha="center", va="center")
        axes[0, 0].axis("off")
        fig.suptitle(title)
        return R._save(fig, path)
    for ax, (name, _), A in zip(axes[0], mats, arrs):
        im = R.heatmap_panel(ax, A, labels, name, vmin, vmax, annotate=n <= 16, cmap=cmap,
                             xlabel="target model (aligned and merged in)")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="loss barrier on validation (max over λ of loss above "
                 "the straight line)")
    fig.suptitle(title)
    return R._save(fig, path)


def write_outputs(rep: dict, out: Path) -> list[str]:
    """report.json, barrier_heatmap.png and report.md in `out` (each atomically); returns the names."""
    out = Path(out)
    R.write_json(rep, out / "report.json")
    uni = rep.get("universe") or {}
    plot_barriers(rep["heatmap"]["labels"], rep["heatmap"]["barrier"], out / "barrier_heatmap.png",
                  f"zoo of {len(rep['heatmap']['labels'])} models on {rep['config']['data']}: loss barrier",
                  uni.get("barrier") if uni.get("available") else None)
    rows = lam_table(rep["pairs"])
    order = rep["assembly_order"]
    md = ["# hetmerge zoo", "", f"Zoo `{rep['config']['zoo_dir']}`, data {rep['config']['data']}: "
          f"{len(rep['models'])} checkpoints, {sum(rep['pair_counts'].values())} pairs "
          f"({rep['pair_counts']['ok']} ok, {rep['pair_counts']['incompatible']} incompatible, "
          f"{rep['pair_counts']['failed']} failed). λ* is chosen on validation; test numbers are reported.", "",
          "![barrier heat map](barrier_heatmap.png)", "", "## Models", "",
          R.markdown_table([{"model": m["name"], "status": m["status"], "arch": m.get("arch"),
                             "val acc %": None if not m.get("val") else 100 * m["val"]["acc"],
                             "test acc %": None if not m.get("test") else 100 * m["test"]["acc"]}
                            for m in rep["models"]], ["model", "status", "arch", "val acc %", "test acc %"]),
          "", "## λ* per pair", "", R.markdown_table(rows, list(rows[0])) if rows else "(no pairs)", "",
          "## Suggested assembly order", "", f"Rule: {order['rule']}.", "", f"Base: `{order['base']}`", ""]
    md += [f"{k + 1}. `{e['model']}` (barrier {R.fmt(e['barrier'])}, λ* {R.fmt(e['lam_star'])})"
           for k, e in enumerate(order["order"])]
    md += [f"- `{e['model']}`: {e['reason']}" for e in order["unplaced"]]
    if uni:
        md += ["", "## C2M3 universe", "", uni.get("note", "")]
    R.write_markdown(out / "report.md", "\n".join(md) + "\n")
    return list(REPORT_FILES)
