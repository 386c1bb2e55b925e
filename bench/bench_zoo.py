"""All-pairs study of a 16-model zoo (hetmerge zoo's library): in-process vs a process pool vs a
local Ray, wall time and parallel efficiency on this machine, and the cost of 1,000 models on a
cluster extrapolated from the measured per-pair time and driver overhead.

    python bench/bench_zoo.py                        # 16 digits MLPs (4 widths x 4 seeds), 240 pairs
    python bench/bench_zoo.py --modes inprocess pool --jobs 4 --lambdas 21

Models are trained once by hetmerge.zoo.train_zoo and cached ($HETMERGE_CACHE_DIR or
~/.cache/hetmerge). Every mode runs the same study into a fresh folder; the script checks that all
modes report the same numbers. Speedup = in-process wall / mode wall; efficiency = speedup / workers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ARCHS = {"32x2": [32, 32], "64x2": [64, 64], "128x2": [128, 128], "64x3": [64, 64, 64]}


def build_zoo(folder: Path, seeds, log) -> Path:
    from hetmerge.zoo import RECIPES, cache_dir, train_zoo

    t0 = time.perf_counter()
    zoo, _ = train_zoo(["digits"], ARCHS, seeds, RECIPES, cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    for z in zoo.values():
        shutil.copy(z.path, folder / f"{z.arch}-s{z.seed}.safetensors")
    log(f"zoo: {len(zoo)} models ({sum(z.cached for z in zoo.values())} from the cache) in "
        f"{time.perf_counter() - t0:.1f} s")
    return folder


def run_mode(mode: str, zoo: Path, out: Path, jobs: int, lambdas: int) -> dict:
    """mode: inprocess[:THREADS], pool or ray (workers = jobs, one thread each)."""
    import hetmerge as hm
    from hetmerge.fleet import make_executor
    from hetmerge.fleet.study import ZooConfig, run_zoo
    from hetmerge.fleet.tasks import PRELOAD

    kind, _, t = mode.partition(":")
    saved = torch.get_num_threads(), hm.get_num_threads()
    if t:
        torch.set_num_threads(int(t))
        hm.set_num_threads(int(t))
    cfg = ZooConfig(zoo, out, "digits", lambdas=[i / (lambdas - 1) for i in range(lambdas)])
    try:
        t0 = time.perf_counter()
        with make_executor(kind, workers=jobs, threads=None if kind == "inprocess" else 1, preload=PRELOAD) as ex:
            t1 = time.perf_counter()
            rep = run_zoo(cfg, ex)
            t2 = time.perf_counter()
            workers = ex.workers
        threads = torch.get_num_threads() if kind == "inprocess" else 1
    finally:
        torch.set_num_threads(saved[0])
        hm.set_num_threads(saved[1])
    pair_s = [v for v in rep["run"]["pair_seconds"].values() if v is not None]
    return {"mode": mode, "workers": workers, "threads/worker": threads,
            "startup_s": t1 - t0, "study_s": t2 - t1, "pairs": len(rep["pairs"]),
            "task_s_sum": sum(pair_s), "task_s_median": statistics.median(pair_s),
            "save_ms_per_pair": 1000 * rep["run"]["save_s"] / len(rep["pairs"]),
            # the driver's floor per result: its own bookkeeping, or the savers' fsyncs shared by
            # their threads, whichever is longer
            "driver_ms_per_pair": 1000 * max(rep["run"]["driver_s"], rep["run"]["save_s"] / rep["run"]["writers"])
            / len(rep["pairs"]), "report": rep}


def compare(ref: dict, rep: dict) -> str:
    """identical; or "same curves" when only the alignment objective's last bits differ (they depend
    on the thread count); else DIFFERENT."""
    a = {k: v for k, v in ref.items() if k != "run"}
    b = {k: v for k, v in rep.items() if k != "run"}
    if a == b:
        return "identical"
    same = all(p["status"] == q["status"] and p.get("sweep") == q.get("sweep") and
               abs((p.get("align") or {}).get("objective", 0) - (q.get("align") or {}).get("objective", 0))
               <= 1e-6 * abs((p.get("align") or {}).get("objective", 1))
               for p, q in zip(a["pairs"], b["pairs"])) and len(a["pairs"]) == len(b["pairs"])
    return "same curves, objective ±1e-6" if same else "DIFFERENT"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4, help="seeds per width (4 widths; default 4 -> 16 models)")
    ap.add_argument("--modes", nargs="+", default=["inprocess:1", "pool", "ray", "inprocess"],
                    help="inprocess[:THREADS], pool, ray; the first is the reference (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="pool workers / local Ray CPUs (default 2)")
    ap.add_argument("--lambdas", type=int, default=11)
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        zoo = build_zoo(Path(tmp) / "zoo", list(range(args.seeds)), print)
        rows = [run_mode(m, zoo, Path(tmp) / f"out-{m}", args.jobs, args.lambdas) for m in args.modes]
    base = rows[0]
    ref = base["report"]
    for r in rows:
        r.update(same_results=compare(ref, r["report"]), speedup=base["study_s"] / r["study_s"],
                 efficiency=base["study_s"] / r["study_s"] / r["workers"])
    cols = ["mode", "workers", "threads/worker", "startup_s", "study_s", "pairs", "task_s_median",
            "save_ms_per_pair", "driver_ms_per_pair", "speedup", "efficiency", "same_results"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    # on paper: 1,000 models, every ordered pair, per-pair time as measured in process (1 worker)
    t_pair = base["task_s_sum"] / base["pairs"]   # the reference: one thread, one worker
    drv = statistics.median(r["driver_ms_per_pair"] for r in rows) / 1000
    n = 1000
    pairs = n * (n - 1)
    print(f"\nper pair (first mode, these models): {t_pair:.3f} s of work, {1000 * drv:.1f} ms of driver bookkeeping")
    print(f"1,000 models: {pairs:,} ordered pairs ({pairs // 2:,} with --one-way)")
    est = []
    for w in (16, 256, 2048):
        work_h = pairs * t_pair / w / 3600
        floor_h = pairs * drv / 3600   # one driver takes every result in
        est.append({"workers": w, "work_h": work_h, "driver_floor_h": floor_h, "wall_h": max(work_h, floor_h)})
        print(f"  {w:5d} workers: {work_h:7.2f} h of work per worker, driver floor {floor_h:.2f} h -> "
              f"~{max(work_h, floor_h):.2f} h")
    for r in rows:
        r.pop("report")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "t_pair_s": t_pair, "driver_s_per_pair": drv,
                                               "estimate_1000": est}, indent=1))
    return 0 if all(r["same_results"] != "DIFFERENT" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
