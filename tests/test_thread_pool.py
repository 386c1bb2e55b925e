"""The native thread pool under concurrency and fork.

set_num_threads_during_running_calls: Python threads run primitives (the bindings release the GIL,
so the calls overlap in the pool) while other threads change the thread count; the pool a call
runs on used to be freed under it (use after free). fork_while_pool_busy: os.fork() while another
thread is inside the pool; the child used to inherit the pool's mutex locked by a thread that does
not exist in it and hang on its first parallel call.

Each scenario runs in a subprocess with a timeout, so a crash or a deadlock fails the test instead
of taking the test session down with it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from subprocess_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = 2.0  # wall time each scenario's workload runs for
FORKS = 10  # at least this many forks, however slow the machine


def _workloads(rng: np.random.Generator):
    """Calls large enough to be split over the pool, each with its independent numpy reference."""
    from scipy.optimize import linear_sum_assignment

    from hetmerge import ops

    w = rng.standard_normal((300, 257)).astype(np.float32)
    rows = rng.permutation(320)[:300] - 20  # -20..299: negatives are padding
    rows[rows < 0] = -1
    cols = rng.permutation(257)

    def permute_pad():
        got = ops.permute_pad(w, rows, cols)
        ref = np.where(rows[:, None] >= 0, w[rows][:, cols], 0)
        return np.array_equal(got, ref)

    small = rng.standard_normal((128, 1024)).astype(np.float32)
    small_rows = rng.permutation(128)

    def permute_pad_small():  # split over the pool, but short: many pool runs and rebuilds per second
        return np.array_equal(ops.permute_pad(small, small_rows), small[small_rows])

    a = rng.standard_normal((256, 300))
    b = rng.standard_normal((256, 300))
    lam = [0.0, 0.25, 1.0]

    def interpolate():
        got = ops.interpolate(a, b, lam)
        ref = np.stack([(1 - t) * a + t * b for t in lam])
        return np.allclose(got, ref, rtol=1e-12, atol=1e-12)

    ts = [rng.standard_normal((200, 300)) for _ in range(3)]
    coeffs = rng.standard_normal((2, 3))

    def weighted_sum():
        got = ops.weighted_sum(ts, coeffs)
        ref = np.einsum("kt,tij->kij", coeffs, np.stack(ts))
        return np.allclose(got, ref, rtol=1e-10, atol=1e-10)

    A = rng.standard_normal((160, 96))
    Bm = rng.standard_normal((150, 96))

    def cost_matrix():
        return np.allclose(ops.cost_matrix([(A, Bm)]), A @ Bm.T, rtol=1e-10, atol=1e-10)

    C = rng.random((200, 230))

    def linear_assignment():
        r, c = ops.linear_assignment(C)
        rr, cc = linear_sum_assignment(C)
        return len(set(c.tolist())) == len(c) and np.isclose(C[r, c].sum(), C[rr, cc].sum(), rtol=1e-12)

    return [permute_pad, permute_pad_small, interpolate, weighted_sum, cost_matrix, linear_assignment]


def scenario_set_num_threads_during_running_calls() -> None:
    import hetmerge

    stop = threading.Event()
    failures: list[str] = []
    calls = [0]
    works = [_workloads(np.random.default_rng(seed)) for seed in range(4)]

    def caller(work) -> None:
        i = 0
        while not stop.is_set():
            f = work[i % len(work)]
            try:
                if not f():
                    failures.append(f"{f.__name__}: wrong result")
            except Exception as exc:  # noqa: BLE001 - any exception is a failure here
                failures.append(f"{f.__name__}: {exc!r}")
            i += 1
        calls[0] += i

    def switcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            hetmerge.set_num_threads(int(rng.integers(1, 6)))
            time.sleep(float(rng.random()) * 1e-3)

    threads = [threading.Thread(target=caller, args=(w,)) for w in works]
    threads += [threading.Thread(target=switcher, args=(100 + s,)) for s in range(2)]
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert calls[0] >= 20, calls[0]
    print(f"ok: {calls[0]} calls")


def _wait(pid: int, timeout: float) -> int | None:
    """waitpid with a deadline: the child's exit code, or None (child killed) if it hung."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


def scenario_fork_while_pool_busy() -> None:
    import hetmerge

    stop = threading.Event()
    failures: list[str] = []
    works = [_workloads(np.random.default_rng(seed)) for seed in range(2)]
    child_work = _workloads(np.random.default_rng(7))

    def busy(work) -> None:
        # Rebuilding the pool on every call (alternating thread counts) holds the pool's global
        # mutex for a while (creating/joining workers): the window a fork must not freeze.
        i = 0
        while not stop.is_set():
            hetmerge.set_num_threads(2 + i % 2)
            if not work[i % len(work)]():
                failures.append("parent: wrong result")
            i += 1

    workers = [threading.Thread(target=busy, args=(w,)) for w in works]
    for t in workers:
        t.start()
    forks = hung = 0
    bad: list[int] = []
    end = time.monotonic() + SECONDS
    while forks < FORKS or time.monotonic() < end:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                hetmerge.set_num_threads(3)
                code = 0 if all(f() for f in child_work) else 2
            finally:
                os._exit(code)
        forks += 1
        code = _wait(pid, timeout=30.0)
        if code is None:
            hung += 1
        elif code != 0:
            bad.append(code)
    stop.set()
    for t in workers:
        t.join()
    assert hung == 0, f"{hung} of {forks} forked children deadlocked"
    assert not bad, f"children exited with {bad[:5]} (2 = wrong result)"
    assert not failures, failures[:5]
    # The parent's pool still works after all those forks.
    assert all(f() for f in _workloads(np.random.default_rng(8)))
    print(f"ok: {forks} forks")


def run_scenario(name: str, timeout: float = 300.0) -> str:
    env = subprocess_env()
    # The numpy references must not use OpenBLAS's own thread pool: its fork handler tears that
    # pool down under a matmul running in another thread, which then spins forever (not ours).
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # glibc scribbles over freed memory, so a pool used after being freed fails loudly.
    env["MALLOC_PERTURB_"] = "165"
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), name], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} hung for {timeout} s (deadlock)")
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_set_num_threads_during_running_calls():
    assert "ok:" in run_scenario("scenario_set_num_threads_during_running_calls")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_fork_while_pool_busy():
    assert "ok:" in run_scenario("scenario_fork_while_pool_busy")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
