"""Benchmark suites shipped with the package: hetmerge vs the fastest honest references, as ratios
measured in one process. `hetmerge bench` runs them from any folder; bench/*.py in a source checkout
are thin scripts over the same modules.

Suites (modules of this package), each ``run(widths, repeat) -> [row]``:
  data_movement      permute_pad, interpolate, weighted_sum vs torch (out= on both sides)
  cost_matrix        vs torch.mm on pre-gathered operands and the naive gather + matmul
  linear_assignment  vs scipy and lapx (lapx: the [bench] extra, pip install 'hetmerge[bench]')
  align              hm.align vs a plain torch + scipy weight matching
  sweep              hm.sweep vs per-λ loops
Rows share one convention: columns ending in ``_s`` are seconds, ``ours_s`` is hetmerge, and every
row says the threads each side ran with.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

from .common import BENCH_EXTRA, BenchDependencyError

__all__ = ["SUITES", "PRIMITIVE_SUITE", "collect", "run_bench", "BenchDependencyError"]

SUITES = ["data_movement", "cost_matrix", "linear_assignment", "align", "sweep"]
# names accepted by --only: a suite, or one primitive of data_movement
PRIMITIVE_SUITE = {"permute_pad": "data_movement", "interpolate": "data_movement",
                   "weighted_sum": "data_movement"}


def _selected(only) -> dict[str, set | None]:
    """suite -> the primitives to keep (None: all) for --only names."""
    if not only:
        return {s: None for s in SUITES}
    unknown = [n for n in only if n not in SUITES and n not in PRIMITIVE_SUITE]
    if unknown:
        raise ValueError(f"--only: unknown suite {unknown[0]!r}; choose from "
                         f"{SUITES + sorted(PRIMITIVE_SUITE)}")
    sel: dict[str, set | None] = {}
    for n in only:
        if n in SUITES:
            sel[n] = None
        else:
            s = PRIMITIVE_SUITE[n]
            if sel.get(s, set()) is not None:
                sel.setdefault(s, set()).add(n)
    return {s: sel[s] for s in SUITES if s in sel}


def collect(widths, repeat: int, only=None, log=print, bar=None) -> tuple[list[dict], list[str]]:
    """Rows from every selected suite; notes for suites that could not run (a missing reference
    package names the [bench] extra)."""
    rows, notes = [], []
    for name, keep in _selected(only).items():
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
            out = mod.run(list(widths), repeat)
        except BenchDependencyError as exc:   # a suite needing an optional package must not stop the rest
            notes.append(f"{name}: skipped: {exc}")
            continue
        except ImportError as exc:
            notes.append(f"{name}: skipped: {exc}; install the benchmark references with: {BENCH_EXTRA}")
            continue
        for r in out:
            r = dict(r)
            r.setdefault("primitive", name)
            r.setdefault("width", r.get("n"))
            if keep is None or r["primitive"] in keep:
                rows.append(r)
        if bar:
            bar.update(1)
        log(f"{name}: {time.perf_counter() - t0:.1f} s")
    return rows, notes


def run_bench(args, ui) -> int:
    import torch

    import hetmerge

    from .. import report as R
    from ..plan import PlanError

    try:
        suites = _selected(args.only)
    except ValueError as exc:
        raise PlanError(f"bench: {exc}") from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    thr = f"threads: hetmerge {hetmerge.get_num_threads()}, torch {torch.get_num_threads()}"
    ui.out(f"hetmerge {hetmerge.__version__}, torch {torch.__version__}: benchmarks at widths {args.widths}; {thr}")
    bar = ui.bar(total=len(suites), desc="bench", unit="suite")
    rows, notes = collect(args.widths, args.repeat, args.only, log=ui.info, bar=bar)
    bar.close()
    for n in notes:
        ui.warn(n)
    if not rows:
        raise PlanError(f"bench: no benchmark ran ({'; '.join(notes) or 'no rows'})")
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["primitive"], []).append(r)
    md = ["# hetmerge bench", "", f"hetmerge {hetmerge.__version__}, torch {torch.__version__}; widths "
          f"{args.widths}; best of {args.repeat}; {thr}. Columns ending in _s are seconds; ours_s is "
          "hetmerge; ratio/speedup = reference / ours unless the column says otherwise; *_thr: threads "
          "each side ran with.", ""]
    for name, rs in groups.items():
        cols = [c for c in rs[0] if c != "primitive" and not isinstance(rs[0][c], (dict, list))]
        ui.out(f"\n{name}")
        ui.out(R.table(rs, cols, align_left=["case"]))
        md += [f"## {name}", "", R.markdown_table(rs, cols), ""]
    png = R.plot_bench(rows, out / "bench_time_vs_width.png", "time against width: hetmerge (ours) vs references")
    md += [f"![time against width]({png.name})", ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    R.write_json({"versions": R.versions(), "widths": args.widths, "repeat": args.repeat, "rows": rows,
                  "notes": notes}, out / "bench.json")
    R.write_markdown(out / "bench.md", "\n".join(md))
    ui.out(f"\nwrote {out}/bench.json, bench.md, {png.name}")
    return 0
