"""Timing and table helpers shared by the benchmark scripts."""
from __future__ import annotations

import time
from typing import Callable, Iterable


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
    columns = columns or list(rows[0].keys())
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
