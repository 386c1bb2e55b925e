"""`hetmerge bench`: run the source checkout's bench/ suites across widths, write a table and a plot.

bench/ is not installed with the package (it needs the tests' references and lapx), so this module
finds it: --bench-dir, $HETMERGE_BENCH_DIR, the checkout an editable install points into, or the
current folder and its parents. Each suite module under bench/primitives/ exposes
``run(widths, repeat) -> [row]``; bench/bench_align.py exposes ``bench_weight_matching(wa, wb)``.
Rows share one convention: columns ending in ``_s`` are seconds, ``ours_s`` is hetmerge.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

__all__ = ["find_bench_dir", "collect", "run_bench"]


def find_bench_dir(explicit: str | None = None) -> Path | None:
    cands = []
    if explicit:
        cands.append(Path(explicit))
    if os.environ.get("HETMERGE_BENCH_DIR"):
        cands.append(Path(os.environ["HETMERGE_BENCH_DIR"]))
    here = Path(__file__).resolve()
    cands += [p / "bench" for p in here.parents]          # editable install: python/hetmerge/...
    cwd = Path.cwd().resolve()
    cands += [p / "bench" for p in (cwd, *cwd.parents)]
    cands.append(cwd)
    for c in cands:
        if (c / "primitives").is_dir() or (c / "bench_align.py").is_file():
            return c
    return None


def _suites(bench: Path) -> dict[str, str]:
    """suite name -> module (primitives/<name>.py with a run(); 'align' from bench_align.py)."""
    out = {}
    for f in sorted((bench / "primitives").glob("*.py")):
        if not f.name.startswith("_"):
            out[f.stem] = f"primitives.{f.stem}"
    if (bench / "bench_align.py").is_file():
        out["align"] = "bench_align"
    return out


def collect(bench: Path, widths, repeat: int, only=None, log=print, bar=None) -> tuple[list[dict], list[str]]:
    """Rows from every suite (or those in `only`); notes for suites that could not run."""
    for p in (bench, bench.parent / "tests"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    rows, notes = [], []
    suites = _suites(bench)
    for name, modname in suites.items():
        if only and name not in only and not (name == "data_movement" and
                                              {"permute_pad", "interpolate", "weighted_sum"} & set(only)):
            continue
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:     # a suite needing an optional package (lapx) must not stop the rest
            notes.append(f"{name}: skipped ({type(exc).__name__}: {exc})")
            continue
        if name == "align":
            fn = getattr(mod, "bench_weight_matching", None)
            if fn is None:
                notes.append("align: bench_align.py has no bench_weight_matching(); skipped")
                continue
            for w in widths:
                r = fn(w, max(1, w // 2))
                rows.append({"primitive": "align (weight matching)", "case": "depth-4 MLP, target half as wide",
                             "width": w, **{k: v for k, v in r.items() if k != "case"}})
                if bar:
                    bar.update(1)
        else:
            run = getattr(mod, "run", None)
            if run is None:
                continue
            for r in run(list(widths), repeat):
                r = dict(r)
                r.setdefault("primitive", name)
                if "width" not in r:
                    r["width"] = r.get("n") or r.get("size") or r.get("w")
                if only and r["primitive"] not in only and name not in only:
                    continue
                rows.append(r)
            if bar:
                bar.update(len(widths))
        log(f"{name}: {time.perf_counter() - t0:.1f} s")
    return rows, notes


def run_bench(args, ui) -> int:
    import hetmerge

    from .. import report as R

    bench = find_bench_dir(args.bench_dir)
    if bench is None:
        from ..checkpoint import CheckpointError
        raise CheckpointError("bench: no bench/ folder found; hetmerge bench runs the benchmarks of a source "
                              "checkout: run it from the checkout, or pass --bench-dir PATH/TO/bench")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ui.out(f"hetmerge {hetmerge.__version__}: benchmarks of {bench} at widths {args.widths}")
    n_suites = len(_suites(bench))
    bar = ui.bar(total=n_suites * len(args.widths), desc="bench", unit="case")
    rows, notes = collect(bench, args.widths, args.repeat, args.only, log=ui.info, bar=bar)
    bar.close()
    for n in notes:
        ui.warn(n)
    if not rows:
        from ..plan import PlanError
        raise PlanError(f"bench: no benchmark ran (suites: {sorted(_suites(bench))}; --only {args.only})")
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["primitive"], []).append(r)
    md = ["# hetmerge bench", "", f"hetmerge {hetmerge.__version__}; widths {args.widths}; best of "
          f"{args.repeat}. Columns ending in _s are seconds; ours_s is hetmerge.", ""]
    for name, rs in groups.items():
        cols = [c for c in rs[0] if c != "primitive" and not isinstance(rs[0][c], (dict, list))]
        ui.out(f"\n{name}")
        ui.out(R.table(rs, cols, align_left=["case"]))
        md += [f"## {name}", "", R.markdown_table(rs, cols), ""]
    png = R.plot_bench(rows, out / "bench_time_vs_width.png", "time against width: hetmerge (ours) vs references")
    md += [f"![time against width]({png.name})", ""]
    R.write_json({"versions": R.versions(), "widths": args.widths, "repeat": args.repeat, "rows": rows,
                  "notes": notes}, out / "bench.json")
    R.write_markdown(out / "bench.md", "\n".join(md))
    ui.out(f"\nwrote {out}/bench.json, bench.md, {png.name}")
    return 0
