"""Reports of the CLI: terminal tables, report.json (atomic, with versions), PNG plots, report.md.

Plots use matplotlib's Agg backend (no display needed) and are meant to be read at a glance:
every figure has a title, labelled axes with units, and a legend or colour bar.
"""
from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .checkpoint import atomic_write

__all__ = ["versions", "fmt", "table", "write_json", "to_jsonable", "plot_sweeps", "plot_heatmaps",
           "plot_traces", "plot_assembly", "write_markdown"]


def versions() -> dict[str, str]:
    """Versions of everything that can change a number in a report."""
    import numpy

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "numpy": numpy.__version__}
    try:
        import hetmerge
        out["hetmerge"] = hetmerge.__version__
    except Exception:   # the report is still worth writing without the extension
        pass
    for mod in ("scipy", "sklearn", "mnist1d", "safetensors", "matplotlib"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = m.__version__
    return out


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if abs(v) < 10 ** -digits:
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
          headers: Mapping[str, str] | None = None, align_left: Iterable[str] = ()) -> str:
    """A plain-text table (also valid Markdown when `markdown` style rows are joined with pipes)."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    headers = dict(headers or {})
    left = set(align_left)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    names = [headers.get(c, c) for c in columns]
    widths = [max(len(n), *(len(row[i]) for row in cells)) for i, n in enumerate(names)]

    def line(vals):
        return "  ".join(v.ljust(w) if c in left else v.rjust(w) for v, w, c in zip(vals, widths, columns))
    return "\n".join([line(names), "  ".join("-" * w for w in widths)] + [line(r) for r in cells])


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   headers: Mapping[str, str] | None = None) -> str:
    headers = dict(headers or {})
    out = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def to_jsonable(obj: Any) -> Any:
    """Tensors -> lists, paths -> str, dataclasses -> dicts, non-finite floats -> None: the result
    is strict JSON (json.dumps(..., allow_nan=False) succeeds; NaN/Infinity are not JSON)."""
    import dataclasses
    from pathlib import PurePath

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if torch.is_tensor(obj):
        return to_jsonable(obj.detach().cpu().tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.repr or f.name != "pairing"}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist) and getattr(obj, "ndim", 0) > 0:   # numpy arrays
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):   # numpy scalars
        return to_jsonable(obj.item())
    return obj


def write_json(obj: Any, path: str | Path) -> Path:
    p = Path(path)
    with atomic_write(p, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    return p


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")    # files only; works on machines without a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    with atomic_write(p) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return p


def plot_sweeps(pairs: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """One column per pair: loss (top) and accuracy (bottom) against λ, aligned vs unaligned.

    pairs: [{"name", "lambdas", "aligned": {"loss", "acc", "lam_star"}, "unaligned": {...}}].
    """
    plt = _plt()
    n = len(pairs)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 0.6, 6.0), squeeze=False, sharex=True)
    for j, pr in enumerate(pairs):
        lam = list(pr["lambdas"])
        for key, style, label in (("unaligned", "--", "unaligned (by position)"), ("aligned", "-", "aligned")):
            c = pr[key]
            color = "tab:red" if key == "unaligned" else "tab:blue"
            axes[0, j].plot(lam, c["loss"], style, color=color, marker="o", ms=3, label=label)
            axes[1, j].plot(lam, [100 * a for a in c["acc"]], style, color=color, marker="o", ms=3, label=label)
        ls = pr["aligned"].get("lam_star")
        if ls is not None:
            axes[1, j].axvline(ls, color="tab:blue", lw=0.8, alpha=0.6, label=f"λ* aligned = {ls:.2f}")
        axes[0, j].set_title(pr["name"], fontsize=9)
        axes[1, j].set_xlabel("merging factor λ (0 = base, 1 = target)")
        if j == 0:
            axes[0, j].set_ylabel("test loss (cross-entropy)")
            axes[1, j].set_ylabel("test accuracy (%)")
        axes[0, j].grid(alpha=0.3)
        axes[1, j].grid(alpha=0.3)
        axes[1, j].legend(fontsize=7, loc="lower left")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def heatmap_panel(ax, M, labels: Sequence[str], name: str, vmin: float, vmax: float, annotate: bool,
                  cmap="viridis", xlabel: str = "target model (merged in)"):
    """One base × target barrier matrix on `ax` (NaN cells shown as the colour map's 'bad' colour),
    values written in the cells when `annotate`; returns the image (for a colour bar)."""
    import numpy as np

    n = len(labels)
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("base model (architecture kept)")
    ax.set_title(name, fontsize=10)
    if annotate:
        for i in range(n):
            for j in range(n):
                if np.isfinite(M[i, j]):
                    ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if M[i, j] < (vmin + vmax) / 2 else "black")
    return im


def plot_heatmaps(labels: Sequence[str], before, after, path: str | Path, title: str) -> Path:
    """Loss-barrier heat maps (rows: base, columns: target), unaligned and aligned on one colour scale.
    before/after: [n][n] lists (None where a pair was not run)."""
    plt = _plt()
    import numpy as np

    A = np.array([[np.nan if v is None else v for v in r] for r in before], dtype=float)
    B = np.array([[np.nan if v is None else v for v in r] for r in after], dtype=float)
    vmax = float(np.nanmax(np.concatenate([A.ravel(), B.ravel()]))) if np.isfinite(A).any() else 1.0
    vmin = min(0.0, float(np.nanmin(np.concatenate([A.ravel(), B.ravel()]))))
    n = len(labels)
    size = max(4.0, 0.55 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.2, size))
    for ax, M, name in ((axes[0], A, "unaligned (by position)"), (axes[1], B, "aligned (weight matching)")):
        im = heatmap_panel(ax, M, labels, name, vmin, vmax, annotate=n <= 14)
    fig.colorbar(im, ax=axes, shrink=0.8, label="loss barrier (max over λ of loss above the straight line)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_traces(traces: Mapping[str, Sequence[float]], path: str | Path, title: str,
                ylabel: str = "objective (cosine similarity of aligned weights)") -> Path:
    """Objective after each alignment sweep (trace[0] = before the first sweep), one line per pair."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, tr in traces.items():
        ax.plot(range(len(tr)), list(tr), marker="o", ms=3, label=name)
    ax.set_xlabel("alignment sweep (0 = identity / by position)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_assembly(steps: Sequence[Mapping[str, Any]], path: str | Path, title: str,
                  member_label: str = "model merged in, alone (test)") -> Path:
    """Accuracy of the assembled model after each integration step: on the test split (reported) and
    on the validation split λ was chosen on, plus each merged-in model's own accuracy.
    steps: [{"model", "lam", "test_acc", "val_acc", "member_acc", "replaced"}], steps[0] = the base
    alone. member_label names what member_acc is; call it "target-domain" only when the members come
    from a domain other than the base's."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(steps) + 2), 4.2))
    x = list(range(len(steps)))

    def series(key):
        return [100 * s[key] if s.get(key) is not None else float("nan") for s in steps]

    ax.plot(x, series("test_acc"), "-o", color="tab:blue", label="assembled model, test accuracy")
    if any(s.get("val_acc") is not None for s in steps):
        ax.plot(x, series("val_acc"), "--o", color="tab:blue", alpha=0.5, ms=3,
                label="assembled model, validation accuracy (λ chosen on it)")
    if any(s.get("member_acc") is not None for s in steps):
        ax.plot(x, series("member_acc"), "s", color="tab:green", label=member_label)

    def tick(i, s):
        if i == 0:
            return s["model"]
        return f"+{s['model']}\nλ={s['lam']:.2f}" + (" (replaced)" if s.get("replaced") else "")
    ax.set_xticks(x, [tick(i, s) for i, s in enumerate(steps)], fontsize=7)
    ax.set_xlabel("integration step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_bench(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Time against width per benchmark (one panel per primitive/case), ours vs each reference.
    rows: {"primitive", "case", "width", "<impl>_s": seconds, ...}; "ours_s" is ours."""
    plt = _plt()
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(f"{r.get('primitive', '?')}" + (f" ({r['case']})" if r.get("case") else ""), []).append(r)
    n = len(groups)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (name, rs) in zip(axes.ravel(), groups.items()):
        impls = [k for k in rs[0] if k.endswith("_s") and not k.endswith("_out_s")]
        for impl in impls:
            pts = sorted((r["width"], r[impl]) for r in rs if r.get(impl) is not None)
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3,
                          label=impl[:-2] + (" (hetmerge)" if impl == "ours_s" else ""),
                          lw=2.2 if impl == "ours_s" else 1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("width (units)")
        ax.set_ylabel("time (s, best of N)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def write_markdown(path: str | Path, text: str) -> Path:
    p = Path(path)
    with atomic_write(p, "w") as f:
        f.write(text)
    return p


# ---------------------------------------------------------------------------------------------
# sweep reports (hetmerge sweep)
# ---------------------------------------------------------------------------------------------

def sweep_curves(curves: Mapping[str, Any]) -> dict[str, Any]:
    """{"lambdas": [...], name: {loss, acc, barrier, lam_star, target_*, timings}} of SweepResults
    (e.g. "unaligned" and "aligned"), as strict-JSON-ready lists."""
    first = next(iter(curves.values()))
    out: dict[str, Any] = {"lambdas": first.lambdas.tolist()}
    for name, c in curves.items():
        out[name] = {"loss": c.loss.tolist(), "acc": c.acc.tolist(), "barrier": c.barrier, "lam_star": c.lam_star,
                     "target_loss": None if c.target_loss is None else c.target_loss.tolist(),
                     "target_acc": None if c.target_acc is None else c.target_acc.tolist(),
                     "target_barrier": c.target_barrier, "timings": c.timings}
    return out


def sweep_tables(doc: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """(per-λ rows, per-curve summary rows) of an aligned-vs-unaligned sweep document."""
    lams = doc["lambdas"]
    rows = [{"λ": l, "loss_unal": doc["unaligned"]["loss"][i], "loss_al": doc["aligned"]["loss"][i],
             "acc_unal %": 100 * doc["unaligned"]["acc"][i], "acc_al %": 100 * doc["aligned"]["acc"][i]}
            for i, l in enumerate(lams)]
    summary = [{"": n, "barrier": doc[n]["barrier"], "λ*": doc[n]["lam_star"],
                "acc at λ*": 100 * doc[n]["acc"][min(range(len(lams)), key=lambda i: abs(lams[i] - doc[n]["lam_star"]))]}
               for n in ("unaligned", "aligned")]
    return rows, summary


def write_sweep_report(folder: Path, doc: Mapping[str, Any], rows: list[dict], trace: Sequence[float],
                       pair_name: str, intro: str, title: str) -> None:
    """sweep.json, sweep.png, report.md (and alignment_trace.png when there is a trace) in `folder`."""
    folder = Path(folder)
    write_json(doc, folder / "sweep.json")
    png = plot_sweeps([{"name": pair_name, "lambdas": doc["lambdas"], "aligned": doc["aligned"],
                        "unaligned": doc["unaligned"]}], folder / "sweep.png", title)
    if trace:
        plot_traces({"aligned": list(trace)}, folder / "alignment_trace.png", "weight-matching convergence")
    md = ["# hetmerge sweep", "", intro, "", markdown_table(rows, list(rows[0])), "", f"![λ sweep]({png.name})", ""]
    if trace:
        md += ["![alignment trace](alignment_trace.png)", ""]
    write_markdown(folder / "report.md", "\n".join(md))
