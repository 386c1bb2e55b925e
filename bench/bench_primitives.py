"""Benchmark hetmerge.ops against reference implementations, in one process, as ratios.

    python bench/bench_primitives.py                      # quick: width 1024
    python bench/bench_primitives.py --widths 1024 2048 4096 8192
    python bench/bench_primitives.py --only interpolate cost_matrix

Columns: *_s are best-of-repeat seconds; speedup = reference / ours (higher is better);
ratio_vs_mm = ours / torch.mm on pre-gathered operands (lower is better).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import hetmerge  # noqa: E402
from common import print_table  # noqa: E402

SUITES = ["permute_pad", "interpolate", "weighted_sum", "cost_matrix", "linear_assignment"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[1024])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", nargs="+", choices=SUITES, default=SUITES)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hetmerge.set_num_threads(args.threads)
    print(f"hetmerge {hetmerge.__version__}, torch {torch.__version__}, threads {args.threads}, widths {args.widths}")

    if {"permute_pad", "interpolate", "weighted_sum"} & set(args.only):
        from primitives import data_movement

        rows = [r for r in data_movement.run(args.widths, args.repeat) if r["primitive"] in args.only]
        for name in ("permute_pad", "interpolate", "weighted_sum"):
            sel = [r for r in rows if r["primitive"] == name]
            if sel:
                print_table(f"{name} (torch reference vs ours; *_out = preallocated out=)", sel,
                            [c for c in sel[0] if c != "primitive"])
    for name in ("cost_matrix", "linear_assignment"):
        if name not in args.only:
            continue
        try:
            module = __import__(f"primitives.{name}", fromlist=["run"])
        except ImportError as exc:
            print(f"\n{name}: benchmark unavailable ({exc})")
            continue
        print_table(name, module.run(args.widths, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
