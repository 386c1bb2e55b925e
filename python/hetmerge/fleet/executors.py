"""Executors: run many independent tasks in this process, in a local process pool, or on Ray.

One interface for every backend, so a study (all pairs of a zoo, MERGE3 candidates, ...) is written
once and runs on one core, on every core of a machine, or on a cluster:

    with make_executor("pool", workers=4, retries=2) as ex:
        for key, path in jobs:
            ex.submit(key, evaluate_checkpoint, path, options)   # fn: a top-level function
        for outcome in ex.results():                            # as tasks finish, any order
            outcome.key, outcome.ok, outcome.result, outcome.error, outcome.attempts

A task is ``fn(*args)``: `fn` is a module-level (importable, picklable) function; `args` are plain
values — checkpoint *paths* and options, not models, so that nothing large crosses the executor —
and it returns a plain dict (strict-JSON friendly). A task that raises, or whose worker process
dies, is retried up to `retries` more times (on any free worker) and then reported as failed with
the reason of every attempt; other tasks are not affected. The in-process executor cannot survive
its own process dying (it is the driver), everything else holds for it too.

Workers set torch's and hetmerge's CPU threads to `threads` once (default: cores // workers), so N
workers do not oversubscribe the machine.
"""
from __future__ import annotations

import collections
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator

__all__ = ["Outcome", "Executor", "InProcessExecutor", "PoolExecutor", "RayExecutor", "make_executor",
           "run_task", "EXECUTORS"]

EXECUTORS = ("inprocess", "pool", "ray")


@dataclass
class Outcome:
    """What became of one task. result: the task's dict when ok; error: the last attempt's reason
    ("ValueError: ...", "worker died: ..."), errors: every failed attempt's reason, in order."""
    key: Hashable
    ok: bool
    result: dict | None = None
    error: str | None = None
    errors: list[str] = field(default_factory=list)
    attempts: int = 0
    wall_s: float = 0.0          # of the successful (or last) attempt, measured in the worker
    worker: str = ""             # host:pid that ran the last attempt
    traceback: str | None = None  # of the last attempt's exception (None when its worker died)


@dataclass
class _Task:
    key: Hashable
    fn: Callable
    args: tuple
    attempts: int = 0
    errors: list = field(default_factory=list)


_THREADS_SET: list = []


def _set_threads(threads: int | None) -> None:
    """torch and hetmerge threads of this worker process, once."""
    if not threads or _THREADS_SET:
        return
    import torch
    torch.set_num_threads(threads)
    try:
        import hetmerge
        hetmerge.set_num_threads(threads)
    except ImportError:   # a task that never touches hetmerge's kernels still runs
        pass
    _THREADS_SET.append(threads)


def run_task(fn: Callable, args: tuple, threads: int | None = None) -> tuple:
    """Run one task in a worker: (ok, dict or error text, traceback, seconds, "host:pid").
    Exceptions are turned into text here, so that an exception type the driver cannot unpickle
    still reports its message."""
    _set_threads(threads)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    t0 = time.perf_counter()
    try:
        value = fn(*args)
        if not isinstance(value, dict):
            raise TypeError(f"task {getattr(fn, '__qualname__', fn)} returned {type(value).__name__}; "
                            "tasks return a plain dict")
    except Exception as exc:   # reported (and retried) by the driver; KeyboardInterrupt propagates
        return False, f"{type(exc).__name__}: {exc}", traceback.format_exc(), time.perf_counter() - t0, worker
    return True, value, None, time.perf_counter() - t0, worker


class Executor:
    """Base class: the retry bookkeeping; backends implement _launch, _collect and capacity."""
    name = "?"

    def __init__(self, retries: int = 2, threads: int | None = None):
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: expected an integer >= 0, got {retries!r}")
        self.retries, self.threads = retries, threads
        self.workers = 1
        self._queue: collections.deque[_Task] = collections.deque()
        self._sources: collections.deque = collections.deque()   # (fn, iterator of (key, args)) from map()
        self._inflight = 0

    # -- backend -------------------------------------------------------------------------------
    def _launch(self, task: _Task) -> None:
        raise NotImplementedError

    def _collect(self) -> list[tuple[_Task, tuple]]:
        """Block until at least one launched task ends; [(task, run_task's tuple)] for each."""
        raise NotImplementedError

    def capacity(self) -> int:
        """Tasks kept in flight at once."""
        return self.workers

    def close(self) -> None:
        pass

    # -- interface -------------------------------------------------------------------------------
    def submit(self, key: Hashable, fn: Callable, *args: Any) -> None:
        """Queue fn(*args) under `key` (returned with its Outcome); nothing runs until results()."""
        if not callable(fn):
            raise TypeError(f"submit: fn must be callable, got {type(fn).__name__}")
        self._queue.append(_Task(key, fn, tuple(args)))

    def map(self, fn: Callable, items: Iterable[tuple[Hashable, tuple]]) -> Iterator[Outcome]:
        """fn(*args) under `key` for each (key, args) of `items`, then results(). `items` is read
        lazily, as workers free up: a generator of a million tasks holds a few in memory, not all."""
        if not callable(fn):
            raise TypeError(f"map: fn must be callable, got {type(fn).__name__}")
        self._sources.append((fn, iter(items)))
        return self.results()

    def _next(self) -> _Task | None:
        """The next task to launch: submitted ones and retries first, then map()'s items."""
        if self._queue:
            return self._queue.popleft()
        while self._sources:
            fn, it = self._sources[0]
            try:
                key, args = next(it)
            except StopIteration:
                self._sources.popleft()
                continue
            return _Task(key, fn, tuple(args))
        return None

    def results(self) -> Iterator[Outcome]:
        """Outcomes of every submitted task, in the order they finish; failed attempts are retried
        (up to `retries` more times) before their task is reported as failed."""
        while True:
            while self._inflight < self.capacity():
                task = self._next()
                if task is None:
                    break
                task.attempts += 1
                self._launch(task)
                self._inflight += 1
            if not self._inflight:
                return
            for task, (ok, value, tb, wall, worker) in self._collect():
                self._inflight -= 1
                if ok:
                    yield Outcome(task.key, True, value, None, task.errors, task.attempts, wall, worker)
                    continue
                task.errors.append(value)
                if task.attempts <= self.retries:
                    self._queue.append(task)   # behind the retries already waiting: a flaky node may recover
                else:
                    yield Outcome(task.key, False, None, value, task.errors, task.attempts, wall, worker, tb)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class InProcessExecutor(Executor):
    """Tasks run one after the other in this process (the default; no pickling, easiest to debug)."""
    name = "inprocess"

    def __init__(self, retries: int = 2, threads: int | None = None):
        super().__init__(retries, threads)
        self._done: list = []

    def _launch(self, task):
        # threads: left as the caller set them (this is the user's process, not a worker)
        self._done.append((task, run_task(task.fn, task.args, None)))

    def _collect(self):
        done, self._done = self._done, []
        return done


def _pool_context(name: str | None, preload=("hetmerge",)):
    import multiprocessing as mp

    if name is None:   # forkserver: fast worker starts without fork()'s copy of the driver's threads
        name = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if name not in ("spawn", "forkserver"):
        raise ValueError(f"context: expected 'spawn' or 'forkserver', got {name!r} (fork is unsafe with "
                         "torch's threads)")
    ctx = mp.get_context(name)
    if name == "forkserver":
        # the server imports torch and hetmerge (and `preload`) once; every worker, and every
        # replacement of a dead one, forks from it in milliseconds instead of importing for seconds.
        # (One forkserver per driver process: the first pool's list is the one that counts.)
        ctx.set_forkserver_preload(list(preload))
    return ctx


class PoolExecutor(Executor):
    """A local process pool: `workers` processes (spawn or forkserver), each a one-worker
    concurrent.futures.ProcessPoolExecutor. One pool per worker because a ProcessPoolExecutor whose
    process dies breaks as a whole and fails every task in flight (BrokenProcessPool) without saying
    which one killed it; with one process per pool the dead worker's task is known exactly, only
    that pool is replaced, and the other workers' tasks go on. preload: modules the forkserver
    imports once for all workers (e.g. what the tasks import: sklearn takes seconds)."""
    name = "pool"

    def __init__(self, workers: int = 2, retries: int = 2, threads: int | None = None, context: str | None = None,
                 preload=("hetmerge",)):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers (--jobs): expected an integer >= 1, got {workers!r}")
        super().__init__(retries, threads or max(1, (os.cpu_count() or 1) // workers))
        self.workers = workers
        self._ctx = _pool_context(context, preload)
        self._pools: list = [None] * workers
        self._running: dict = {}   # future -> (slot, task)

    def _launch(self, task):
        from concurrent.futures import ProcessPoolExecutor

        busy = {slot for slot, _ in self._running.values()}
        slot = next(i for i in range(self.workers) if i not in busy)
        if self._pools[slot] is None:
            self._pools[slot] = ProcessPoolExecutor(1, mp_context=self._ctx)
        fut = self._pools[slot].submit(run_task, task.fn, task.args, self.threads)
        self._running[fut] = (slot, task)

    def _collect(self):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            slot, task = self._running.pop(fut)
            try:
                out.append((task, fut.result()))
            except BrokenProcessPool:
                code = self._exitcode(slot)
                self._pools[slot].shutdown(wait=False)
                self._pools[slot] = None     # a fresh worker for the next task on this slot
                out.append((task, (False, f"worker died (exit code {code}) while running the task", None, 0.0, "")))
            except Exception as exc:   # e.g. the task's arguments or result could not be pickled
                out.append((task, (False, f"{type(exc).__name__}: {exc}", None, 0.0, "")))
        return out

    def _exitcode(self, slot):
        # ProcessPoolExecutor keeps its processes in a private dict; the exit code is only a diagnostic
        procs = getattr(self._pools[slot], "_processes", None) or {}
        codes = [p.exitcode for p in list(procs.values())]
        return codes[0] if codes else "unknown"

    def close(self):
        """Stop the workers now; tasks still running are abandoned (after Ctrl-C, they are redone next run)."""
        for pool in self._pools:
            if pool is None:
                continue
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:   # shutdown() would let a running task finish first
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
        self._pools = [None] * self.workers
        self._running.clear()
        self._queue.clear()
        self._sources.clear()
        self._inflight = 0


class RayExecutor(Executor):
    """Tasks on a Ray cluster: an existing one (`address`, e.g. "auto" or "ray://host:10001"), else a
    local Ray started here with `workers` CPUs (default: all cores) and stopped on close. Each task
    asks for `cpus_per_task` CPUs and runs with that many threads. Retries are counted here, not by
    Ray (max_retries=0), so a crashed worker and an exception are handled alike. Workers import
    `fn` by its module path: hetmerge must be installed on every node, and checkpoint paths must
    name the same files there (a shared file system)."""
    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, retries: int = 2,
                 cpus_per_task: int = 1):
        try:
            import ray
        except ImportError:
            raise RuntimeError("executor 'ray' needs Ray, which is not installed: pip install 'ray>=2.9' "
                               "(or use --jobs N for a local process pool)") from None
        if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
            raise ValueError(f"cpus_per_task: expected an integer >= 1, got {cpus_per_task!r}")
        super().__init__(retries, cpus_per_task)
        self._ray = ray
        self._owned = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
                self._owned = True   # started here, so stopped here
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, cpus // cpus_per_task)
        self._remote = ray.remote(run_task).options(num_cpus=cpus_per_task, max_retries=0,
                                                     retry_exceptions=False)
        self._running: dict = {}   # ObjectRef -> task

    def capacity(self) -> int:
        # a few more than the workers keep every CPU busy while results travel back, without
        # putting a whole study's tasks into the cluster's queue at once
        return 2 * self.workers

    def _launch(self, task):
        self._running[self._remote.remote(task.fn, task.args, self.threads)] = task

    def _collect(self):
        ray = self._ray
        done, _ = ray.wait(list(self._running), num_returns=1)
        out = []
        for ref in done:
            task = self._running.pop(ref)
            try:
                out.append((task, ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:   # the task's arguments could not be unpickled, ...
                out.append((task, (False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}", None, 0.0, "")))
            except ray.exceptions.RayError as exc:       # worker crashed, node died, out of memory
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                out.append((task, (False, f"worker died ({type(exc).__name__}: {first})", None, 0.0, "")))
        return out

    def close(self):
        for ref in list(self._running):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:   # already finished or its worker is gone: nothing to stop
                pass
        self._running.clear()
        self._queue.clear()
        self._sources.clear()
        self._inflight = 0
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
            self._owned = False


def make_executor(kind: str = "inprocess", workers: int | None = None, retries: int = 2,
                  threads: int | None = None, address: str | None = None, preload=("hetmerge",)) -> Executor:
    """The executor named `kind` ("inprocess", "pool", "ray"). workers: pool processes, or the
    CPUs of a local Ray (ignored with an `address`); threads: per worker (pool; Ray: CPUs per task);
    preload: modules a pool's workers import once, before forking."""
    if kind == "inprocess":
        return InProcessExecutor(retries)
    if kind == "pool":
        return PoolExecutor(workers or os.cpu_count() or 1, retries, threads, preload=preload)
    if kind == "ray":
        return RayExecutor(address, workers, retries, threads or 1)
    raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {kind!r}")
