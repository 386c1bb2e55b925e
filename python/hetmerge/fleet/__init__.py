"""Studies over many checkpoints, run on one core, a process pool or a Ray cluster.

executors: one interface (submit / map / results) with retries, three backends.
tasks: what a worker runs for one checkpoint or one pair (paths in, plain dicts out).
study: the zoo study (all pairs: compatibility, alignment, λ sweep), resumable, and its report.
"""
from .executors import (EXECUTORS, Executor, InProcessExecutor, Outcome, PoolExecutor, RayExecutor,
                        make_executor, run_task)

__all__ = ["EXECUTORS", "Executor", "InProcessExecutor", "PoolExecutor", "RayExecutor", "Outcome",
           "make_executor", "run_task"]
