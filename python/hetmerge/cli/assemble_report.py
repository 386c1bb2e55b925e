"""The report of `hetmerge assemble`: report.json (every number), a terminal table, report.md, and two
plots: accuracy along the assembly, and each step's λ curve on the validation split."""
from __future__ import annotations

from pathlib import Path

import torch


def _split_metrics(model, val, test, tval, ttest) -> dict:
    """{"val": {...}, "test": {...}} of a model: base_acc/base_loss (+ target_*) per split."""
    import torch.nn.functional as F

    out = {}   # loaded models are in eval mode already (cli.models.load_model)
    with torch.no_grad():
        for split, d, td in (("val", val, tval), ("test", test, ttest)):
            m = {}
            for prefix, dd in (("base", d), ("target", td)):
                if dd is not None:
                    logits = model(dd[0])
                    m[f"{prefix}_acc"] = float((logits.argmax(-1) == dd[1]).float().mean())
                    m[f"{prefix}_loss"] = float(F.cross_entropy(logits, dd[1]))
            out[split] = m
    return out


def build_doc(base, options, search: str, steps: list[dict], skipped: list[dict], data: dict, output: Path,
              versions: dict) -> dict:
    from .models import fingerprint

    val, test, tval, ttest = data["val"], data["test"], data["target_val"], data["target_test"]
    doc = {"created_by": "hetmerge assemble", "versions": versions, "output": str(output),
           "base": fingerprint(base), "options": options.to_dict(), "search": search,
           "splits": {"val": len(val[1]), "test": len(test[1]),
                      "target_val": None if tval is None else len(tval[1]),
                      "target_test": None if ttest is None else len(ttest[1]),
                      "note": "λ is chosen on val; test is held out and is what to report"},
           "start": _split_metrics(data["base_model"], val, test, tval, ttest), "steps": [], "skipped": skipped}
    for s in steps:
        st = s["step"]
        c = st.curve
        doc["steps"].append({
            "model": st.model, "file": s["file"], "fingerprint": s["fingerprint"], "lam": st.lam,
            "lam_star": st.lam_star, "barrier": st.barrier, "replaced": st.replaced, "layer_map": st.layer_map,
            "val": {"before": st.before, "after": st.after}, "test": {"before": st.eval_before, "after": st.eval_after},
            "member_test_acc": s["member_test_acc"], "time_s": st.time, "evaluations": c.n_evals,
            "curve": {"lambdas": c.lambdas.tolist(), "loss": c.loss.tolist(), "acc": c.acc.tolist(),
                      "target_loss": None if c.target_loss is None else c.target_loss.tolist(),
                      "target_acc": None if c.target_acc is None else c.target_acc.tolist()}})
    last = doc["steps"][-1] if doc["steps"] else None
    doc["final"] = {"val": last["val"]["after"] if last else doc["start"]["val"],
                    "test": last["test"]["after"] if last else doc["start"]["test"]}
    return doc


def rows(doc: dict) -> list[dict]:
    """One terminal/markdown row per step (accuracies in %, test split unless marked val)."""
    target = doc["splits"]["target_test"] is not None
    out = [{"step": "base", "λ": None, "λ*": None, "barrier": None,
            "val acc": 100 * doc["start"]["val"]["base_acc"], "test acc": 100 * doc["start"]["test"]["base_acc"],
            **({"target test acc": 100 * doc["start"]["test"]["target_acc"]} if target else {}), "evals": None}]
    for s in doc["steps"]:
        out.append({"step": f"+{s['model']}", "λ": s["lam"], "λ*": s["lam_star"], "barrier": s["barrier"],
                    "val acc": 100 * s["val"]["after"]["base_acc"], "test acc": 100 * s["test"]["after"]["base_acc"],
                    **({"target test acc": 100 * s["test"]["after"]["target_acc"]} if target else {}),
                    "evals": s["evaluations"]})
    return out


def plot_curves(doc: dict, path: Path) -> Path:
    """Per step: validation loss (top) and accuracy (bottom) against λ, with λ* and the λ taken."""
    from ..report import _plt, _save   # the report module's Agg backend and atomic PNG writer

    plt = _plt()
    steps = doc["steps"]
    n = max(1, len(steps))
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 0.6, 6.0), squeeze=False, sharex=True)
    for j, s in enumerate(steps):
        c = s["curve"]
        axes[0, j].plot(c["lambdas"], c["loss"], "-o", ms=3, color="tab:blue", label="base domain")
        axes[1, j].plot(c["lambdas"], [100 * a for a in c["acc"]], "-o", ms=3, color="tab:blue", label="base domain")
        if c["target_acc"] is not None:
            axes[0, j].plot(c["lambdas"], c["target_loss"], "--s", ms=3, color="tab:green", label="target domain")
            axes[1, j].plot(c["lambdas"], [100 * a for a in c["target_acc"]], "--s", ms=3, color="tab:green",
                            label="target domain")
        for ax in axes[:, j]:
            ax.axvline(s["lam"], color="tab:red", lw=1, label=f"λ taken = {s['lam']:.2f}")
            ax.axvline(s["lam_star"], color="gray", lw=0.8, ls=":", label=f"λ* = {s['lam_star']:.2f}")
            ax.grid(alpha=0.3)
        axes[0, j].set_title(f"step {j + 1}: +{s['model']}", fontsize=9)
        axes[1, j].set_xlabel("merging factor λ (0 = current base)")
        axes[1, j].legend(fontsize=7, loc="lower left")
    axes[0, 0].set_ylabel("validation loss (cross-entropy)")
    axes[1, 0].set_ylabel("validation accuracy (%)")
    fig.suptitle(f"λ curves of each assembly step (validation split, search: {doc['search']})")
    fig.tight_layout()
    return _save(fig, path)


def write_report(folder: Path, ui, owned, base, options, search, steps, skipped, data, output, versions) -> dict:
    """report.json, report.md, assembly.png, lambda_curves.png, written into a temporary folder that
    replaces `folder` only when all are done (checkpoint.atomic_dir)."""
    from .. import report as R
    from ..checkpoint import atomic_dir

    doc = build_doc(base, options, search, steps, skipped, data, output, versions)
    table = rows(doc)
    ui.out(R.table(table, align_left=["step"]))
    for s in skipped:
        ui.out(f"skipped {s['model']} ({s['file']}): {s['reason']}")
    pts = [{"model": "base", "lam": 0.0, "test_acc": doc["start"]["test"]["base_acc"],
            "val_acc": doc["start"]["val"]["base_acc"], "member_acc": None}]
    pts += [{"model": s["model"], "lam": s["lam"], "test_acc": s["test"]["after"]["base_acc"],
             "val_acc": s["val"]["after"]["base_acc"], "member_acc": s["member_test_acc"],
             "replaced": s["replaced"]} for s in doc["steps"]]
    with atomic_dir(folder, owned) as tmp:
        tmp = Path(tmp)
        R.write_json(doc, tmp / "report.json")
        R.plot_assembly(pts, tmp / "assembly.png", "accuracy along the assembly",
                        member_label="model merged in, alone (test)")
        plot_curves(doc, tmp / "lambda_curves.png")
        md = ["# hetmerge assemble", "",
              f"Base `{doc['base']['file']}`, {len(doc['steps'])} zoo model(s) assembled into `{output}`; λ chosen "
              f"on the validation split ({doc['splits']['val']} samples, search: {search}), accuracies in % on the "
              f"held-out test split ({doc['splits']['test']} samples) unless marked val.", "",
              R.markdown_table(table, list(table[0])), ""]
        if skipped:
            md += ["Skipped:", ""] + [f"- `{s['model']}` ({s['file']}): {s['reason']}" for s in skipped] + [""]
        md += ["![accuracy along the assembly](assembly.png)", "", "![λ curves](lambda_curves.png)", ""]
        R.write_markdown(tmp / "report.md", "\n".join(md))
    return doc
