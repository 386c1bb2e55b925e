"""Timing and table helpers for the scripts in bench/: the package's own (hetmerge.benchmarks.common)."""
from hetmerge.benchmarks.common import best_time, best_times, fmt, print_table, set_threads, threads  # noqa: F401
