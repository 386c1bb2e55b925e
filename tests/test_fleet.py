"""hetmerge.fleet executors: the process pool and Ray give what the in-process executor gives; a task
that raises or whose worker dies is retried, then recorded as failed with the reason, and the other
tasks are not affected."""
from __future__ import annotations

import copy

import pytest
import torch

import fleet_helpers as H
from hetmerge.fleet import InProcessExecutor, PoolExecutor, make_executor, run_task
from hetmerge.fleet import tasks as T


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return H.make_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (startup costs seconds); skipped only if Ray cannot start here."""
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:   # no shared memory, no free ports, ...: say why
        pytest.skip(f"a local Ray cannot start on this machine: {type(exc).__name__}: {exc}")
    # the misbehaving tasks live in the tests folder, which Ray workers cannot import
    ray.cloudpickle.register_pickle_by_value(H)
    yield ray
    ray.shutdown()


def _executor(kind, request, retries=1):
    if kind == "ray":
        request.getfixturevalue("ray_session")   # a RayExecutor joins the running Ray and leaves it up
        return make_executor("ray", retries=retries)
    return make_executor(kind, workers=2, retries=retries)


def _pair_jobs(zoo, n=3):
    files = sorted(zoo.glob("*.safetensors"))
    opts = {"data": "digits", "lambdas": [0.0, 0.25, 0.5, 0.75, 1.0], "acc_tol": 0.01}
    pairs = [(files[0], files[1]), (files[2], files[0]), (files[3], files[1])][:n]
    return [((b.stem, t.stem), (str(b), str(t), opts)) for b, t in pairs]


@pytest.fixture(scope="module")
def reference(zoo):
    """The in-process executor's outcomes of _pair_jobs, computed once for every backend compared,
    with one thread as the workers (the alignment objective's last bits depend on the thread count)."""
    import hetmerge as hm

    threads = torch.get_num_threads(), hm.get_num_threads()
    torch.set_num_threads(1)
    hm.set_num_threads(1)
    try:
        with InProcessExecutor() as ex:
            return {o.key: o for o in ex.map(T.pair_task, _pair_jobs(zoo))}
    finally:
        torch.set_num_threads(threads[0])
        hm.set_num_threads(threads[1])


def _comparable(result):
    r = copy.deepcopy(result)
    r.pop("timings")
    r["alignment"]["info"].pop("versions")   # modules imported differ between driver and workers
    return r


@pytest.mark.parametrize("kind", ["pool", "ray"])
def test_executor_results_equal_in_process(kind, zoo, reference, request):
    jobs, want = _pair_jobs(zoo), reference
    with _executor(kind, request) as ex:
        got = {o.key: o for o in ex.map(T.pair_task, jobs)}
        workers = ex.workers
    assert workers == 2
    assert set(got) == set(want) == {k for k, _ in jobs}
    for k in want:
        assert want[k].ok and got[k].ok, (got[k].error, want[k].error)
        assert got[k].attempts == 1 and got[k].errors == []
        # maps, objective, every loss and accuracy: bit for bit
        assert _comparable(got[k].result) == _comparable(want[k].result)


def test_pair_task_is_align_and_sweep_called_directly(zoo, reference):
    """The reference itself: hm.align + hm.sweep on the validation split, barrier by its formula."""
    import hetmerge as hm

    jobs = _pair_jobs(zoo)
    b, t, opts = jobs[1][1]
    base, _ = T.load_checkpoint(b)
    target, _ = T.load_checkpoint(t)
    res = hm.align(base, target)
    val = T.load_splits("digits", base)["val"]
    curve = hm.sweep(base, target, res, torch.tensor(opts["lambdas"]), data=val)
    r = reference[jobs[1][0]].result
    assert r["sweep"]["barrier"] == curve.barrier and r["sweep"]["lam_star"] == curve.lam_star
    assert r["alignment"]["maps"] == {n: m.tolist() for n, m in res.maps.items()}
    # the barrier from its definition on the stored curve (numpy, not hetmerge.evaluate.barrier)
    import numpy as np
    lam, loss = np.array(r["sweep"]["lambdas"]), np.array(r["sweep"]["val_loss"], dtype=np.float64)
    assert r["sweep"]["barrier"] == pytest.approx(float(np.max(loss - ((1 - lam) * loss[0] + lam * loss[-1]))),
                                                  abs=1e-6)
    # λ = 0 is the base alone: its validation accuracy as model_task measures it
    assert r["sweep"]["val_acc"][0] == pytest.approx(T.model_task(b, {"data": "digits"})["val"]["acc"], abs=1e-6)
    assert r["sweep"]["val_acc_at_lam_star"] == r["sweep"]["val_acc"][r["sweep"]["lambdas"].index(r["sweep"]["lam_star"])]


def test_pool_workers_set_their_threads():
    with PoolExecutor(workers=2, threads=1) as ex:
        out = [o.result for o in ex.map(H.threads, [(i, ()) for i in range(2)])]
    assert out == [{"torch": 1, "hetmerge": 1}] * 2


@pytest.mark.parametrize("kind", ["inprocess", "pool", "ray"])
def test_task_that_raises_is_retried_then_recorded_failed(kind, request):
    with _executor(kind, request, retries=2) as ex:
        ex.submit("bad", H.raises, 7)
        for i in range(4):
            ex.submit(i, H.square, i)
        out = {o.key: o for o in ex.results()}
    bad = out.pop("bad")
    assert not bad.ok and bad.attempts == 3 and bad.result is None
    assert bad.errors == ["ValueError: task 7 always fails"] * 3 and bad.error == bad.errors[-1]
    assert "Traceback" in bad.traceback and "always fails" in bad.traceback
    assert {k: (o.ok, o.attempts, o.result["square"]) for k, o in out.items()} == \
        {i: (True, 1, i * i) for i in range(4)}


@pytest.mark.parametrize("kind", ["pool", "ray"])
def test_dead_worker_loses_only_its_task(kind, request, tmp_path):
    """os._exit in the worker: the task that died once succeeds on its retry, the one that always
    dies is recorded as failed with "worker died", and the tasks running beside them finish."""
    with _executor(kind, request, retries=1) as ex:
        ex.submit("once", H.dies, 1, str(tmp_path / "died-once"))
        ex.submit("always", H.dies, 2)
        for i in range(5):
            ex.submit(i, H.square, i)
        out = {o.key: o for o in ex.results()}
    once, always = out.pop("once"), out.pop("always")
    assert once.ok and once.attempts == 2 and once.result["survived"]
    assert len(once.errors) == 1 and once.errors[0].startswith("worker died")
    assert not always.ok and always.attempts == 2
    assert all(e.startswith("worker died") for e in always.errors) and len(always.errors) == 2
    if kind == "pool":
        assert "exit code 13" in always.error
    assert {k: (o.ok, o.attempts, o.result["square"]) for k, o in out.items()} == \
        {i: (True, 1, i * i) for i in range(5)}


@pytest.mark.parametrize("kind", ["inprocess", "pool"])
def test_map_reads_items_lazily(kind, request):
    """A study of a million pairs must not hold a million tasks: map() takes items as workers free up."""
    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i, (i,)

    with _executor(kind, request) as ex:
        it = ex.map(H.square, items())
        first = next(it)
        assert first.ok and len(pulled) <= ex.capacity() + 1
        rest = list(it)
    assert sorted(o.result["square"] for o in [first, *rest]) == [i * i for i in range(50)]


def test_run_task_turns_errors_and_non_dicts_into_text():
    ok, value, tb, _, worker = run_task(H.square, (3,))
    assert ok and value["square"] == 9 and tb is None and ":" in worker
    ok, value, tb, _, _ = run_task(H.not_a_dict, ())
    assert not ok and value == "TypeError: task not_a_dict returned list; tasks return a plain dict"
    ok, value, tb, _, _ = run_task(H.raises, (1,))
    assert not ok and value == "ValueError: task 1 always fails" and "Traceback" in tb


def test_bad_executor_arguments_are_named():
    with pytest.raises(ValueError, match="executor: expected one of inprocess, pool, ray, got 'slurm'"):
        make_executor("slurm")
    with pytest.raises(ValueError, match=r"workers \(--jobs\): expected an integer >= 1, got 0"):
        PoolExecutor(workers=0)
    with pytest.raises(ValueError, match="retries: expected an integer >= 0, got -1"):
        InProcessExecutor(retries=-1)
    with pytest.raises(ValueError, match="context: expected 'spawn' or 'forkserver', got 'fork'"):
        PoolExecutor(workers=1, context="fork")


def test_ray_missing_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r"executor 'ray' needs Ray, which is not installed: pip install"):
        make_executor("ray")
