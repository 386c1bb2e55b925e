"""Benchmark hetmerge.ops against the fastest plain references, in one process, as ratios.

    python bench/bench_primitives.py                      # quick: width 1024
    python bench/bench_primitives.py --widths 1024 2048 4096 8192
    python bench/bench_primitives.py --only interpolate cost_matrix --threads 1

The suites live in the package (hetmerge.benchmarks; `hetmerge bench` runs them from any folder).
Columns: *_s are best-of-repeat seconds; speedup / ratio_vs_* = reference / ours (higher is better)
unless the column says ours / reference; *_thr: the threads each side ran with.
lapx (the linear_assignment reference) is the [bench] extra: pip install 'hetmerge[bench]'.
"""
from __future__ import annotations

import argparse

import torch

import hetmerge
from hetmerge.benchmarks import BenchDependencyError
from hetmerge.benchmarks.common import print_table, set_threads

SUITES = ["permute_pad", "interpolate", "weighted_sum", "cost_matrix", "linear_assignment"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[1024])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="hetmerge and torch threads")
    p.add_argument("--only", nargs="+", choices=SUITES, default=SUITES)
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(f"hetmerge {hetmerge.__version__}, torch {torch.__version__}, threads: hetmerge "
          f"{hetmerge.get_num_threads()}, torch {torch.get_num_threads()}; widths {args.widths}")

    if {"permute_pad", "interpolate", "weighted_sum"} & set(args.only):
        from hetmerge.benchmarks import data_movement

        rows = [r for r in data_movement.run(args.widths, args.repeat) if r["primitive"] in args.only]
        for name in ("permute_pad", "interpolate", "weighted_sum"):
            sel = [r for r in rows if r["primitive"] == name]
            if sel:
                print_table(f"{name} (torch reference vs ours, both out= into the same buffer)", sel,
                            [c for c in sel[0] if c != "primitive"])
    for name in ("cost_matrix", "linear_assignment"):
        if name not in args.only:
            continue
        module = __import__(f"hetmerge.benchmarks.{name}", fromlist=["run"])
        try:
            print_table(name, module.run(args.widths, args.repeat))
        except BenchDependencyError as exc:
            print(f"\n{name}: benchmark unavailable: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
