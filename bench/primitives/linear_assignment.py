"""Thin script over hetmerge.benchmarks.linear_assignment (the suite ships with the package; see its docstring).

    python bench/primitives/linear_assignment.py --widths 1024 2048 4096
"""
from hetmerge.benchmarks.linear_assignment import main, run  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
