"""hm.sweep vs per-λ loops (hm.merge + forward; functional_call; DataLoader), ratios in one process.

    python bench/bench_sweep.py                       # digits MLP 64-256-256-10, 25 λ, 9,000 samples
    python bench/bench_sweep.py --threads 1
    python bench/bench_sweep.py --width 1024 --samples 2000

A thin script over hetmerge.benchmarks.sweep (see its docstring for the references).
"""
from hetmerge.benchmarks.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
