"""Timing, thread and table helpers shared by the benchmark suites."""
from __future__ import annotations

import time
from typing import Callable, Iterable

BENCH_EXTRA = "pip install 'hetmerge[bench]'"


class BenchDependencyError(ImportError):
    """A reference implementation's package is missing (the message says how to install it)."""


def require(module: str, what: str):
    """Import `module` for the reference `what`, or raise naming the [bench] extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BenchDependencyError(f"{what} needs the Python package {module!r} ({exc}); "
                                   f"install the benchmark references with: {BENCH_EXTRA}") from None


def threads() -> tuple[int, int]:
    """(hetmerge's native threads, torch's intra-op threads) in this process."""
    import torch

    import hetmerge

    return hetmerge.get_num_threads(), torch.get_num_threads()


def set_threads(n: int | None) -> None:
    """The same thread count for hetmerge and torch, so that both sides of a ratio get equal cores."""
    if n:
        import torch

        import hetmerge

        torch.set_num_threads(n)
        hetmerge.set_num_threads(n)


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeat` calls (the least disturbed by other load on a shared machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_times(fns: dict[str, Callable[[], object]], repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Best wall time of each function, calls interleaved so that a noisy neighbour slows all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def print_table(title: str, rows: Iterable[dict], columns: list[str] | None = None) -> None:
    rows = list(rows)
    if not rows:
        print(f"\n{title}: no rows")
        return
    columns = columns or [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))]
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
