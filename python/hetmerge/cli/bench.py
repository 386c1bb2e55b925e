"""`hetmerge bench`."""
from __future__ import annotations


from .ui import UI


def cmd_bench(args, ui: UI) -> int:
    from ..benchmarks import run_bench

    return run_bench(args, ui)
