"""Thin script over hetmerge.benchmarks.cost_matrix (the suite ships with the package; see its docstring).

    python bench/primitives/cost_matrix.py --widths 1024 2048 4096
"""
from hetmerge.benchmarks.cost_matrix import main, run  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
