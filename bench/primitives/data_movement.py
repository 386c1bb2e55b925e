"""Thin re-export of hetmerge.benchmarks.data_movement (the suite ships with the package)."""
from hetmerge.benchmarks.data_movement import run  # noqa: F401
