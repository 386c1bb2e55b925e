"""MERGE3: the IRT estimator against synthetic 2PL data with known parameters, and the evolutionary
search against references computed here (the merged weights by a plain formula, the fitness by plain
accuracy loops)."""
from __future__ import annotations

import concurrent.futures

import pytest
import torch
import torch.nn as nn

import hetmerge as hm
from hetmerge.tasks.irt import ItemModel, ability, estimate_accuracy, fit_2pl, select_items

pytest.importorskip("cma")


def _synthetic(models=40, items=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(models, generator=g)
    a = 0.5 + torch.rand(items, generator=g) * 1.5
    b = torch.randn(items, generator=g)
    p = torch.sigmoid(a * (theta[:, None] - b))
    return (torch.rand(models, items, generator=g) < p).float(), theta, a, b


def test_2pl_fit_recovers_abilities_and_difficulties():
    R, theta, _, b = _synthetic()
    items, th = fit_2pl(R)
    assert torch.corrcoef(torch.stack([th, theta]))[0, 1] > 0.95
    assert torch.corrcoef(torch.stack([items.b, b]))[0, 1] > 0.8


def test_irt_estimate_beats_the_plain_subset_accuracy():
    """Fit on 30 reference models, then 10 new ones answer 20 of 300 items: the IRT estimate of their
    accuracy on all 300 is closer to the truth than the accuracy on the 20 alone."""
    R, *_ = _synthetic(models=40)
    items, _ = fit_2pl(R[:30])
    groups = torch.zeros(R.shape[1], dtype=torch.long)
    subset = select_items(items, groups, 20)
    assert len(subset) == 20 and len(subset.unique()) == 20
    err_irt, err_subset = [], []
    for r in R[30:]:
        truth = r.mean()
        err_irt.append(abs(float(estimate_accuracy(items, groups, subset, r[subset])[0]) - float(truth)))
        err_subset.append(abs(float(r[subset].mean()) - float(truth)))
    assert sum(err_irt) < sum(err_subset), (err_irt, err_subset)


def test_selected_items_span_the_difficulty_range_per_group():
    items = ItemModel(torch.ones(10), torch.arange(10.0))
    groups = torch.tensor([0] * 5 + [1] * 5)
    assert select_items(items, groups, 3).tolist() == [0, 2, 4, 5, 7, 9]


def test_ability_is_monotone_in_the_answers():
    items = ItemModel(torch.ones(6), torch.linspace(-2, 2, 6))
    idx = torch.arange(6)
    levels = [ability(items, idx, torch.tensor([1.0] * k + [0.0] * (6 - k))) for k in range(7)]
    assert levels == sorted(levels) and levels[0] < 0 < levels[-1]


# ---- the search ----------------------------------------------------------------------------------

def _tasks(T=3, n=60, seed=0):
    """A linear base and T experts, each the base plus a task vector that makes its own task work."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(8, 4)
    with torch.no_grad():
        base.weight.normal_(0, 0.1, generator=g)
        base.bias.zero_()
    experts, data = [], []
    for t in range(T):
        W = torch.randn(4, 8, generator=g)
        X = torch.randn(n, 8, generator=g)
        y = (X @ W.T).argmax(1)
        e = nn.Linear(8, 4)
        e.load_state_dict({"weight": base.weight + W, "bias": base.bias.clone()})
        experts.append(e)
        data.append((X, y))
    return base, experts, data


def _accuracy(model, data):
    with torch.no_grad():
        return [float((model(X).argmax(1) == y).float().mean()) for X, y in data]


@pytest.mark.parametrize("estimator", ["irt", "subset", "full"])
def test_merge3_returns_the_plain_formula_of_its_coefficients(estimator):
    base, experts, data = _tasks()
    m = hm.merge_tasks(base, experts, "merge3", data=data, generations=4, popsize=6, items=10,
                       estimator=estimator, seed=3)
    r = m.merge3
    c = r.coefficients
    assert len(c) == 3 and all(0.0 <= v <= 1.5 for v in c)
    sb = base.state_dict()
    for k, v in m.state_dict().items():
        want = sb[k] + sum(ct * (e.state_dict()[k] - sb[k]) for ct, e in zip(c, experts))
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6)
    assert r.full_accuracy == pytest.approx(_accuracy(m, data))
    assert len(r.history) == 4 and r.history == sorted(r.history)
    n = sum(len(y) for _, y in data)
    if estimator == "full":
        assert r.subset_size == n and r.item_evaluations == r.candidates * n + n
    else:
        assert r.subset_size == 30
        assert r.item_evaluations == (3 + 1 + 6) * n + r.candidates * 30 + n
    # the search beats the unmerged base and task arithmetic at its starting point
    start = hm.merge_tasks(base, experts, "task_arithmetic", scale=0.3)
    assert sum(r.full_accuracy) / 3 >= sum(_accuracy(start, data)) / 3 - 0.05
    assert sum(r.full_accuracy) / 3 > sum(_accuracy(base, data)) / 3


def test_merge3_executor_gives_the_same_result_as_in_process():
    base, experts, data = _tasks(seed=1)
    kw = dict(data=data, generations=3, popsize=4, items=8, seed=5)
    a = hm.merge_tasks(base, experts, "merge3", **kw).merge3
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        b = hm.merge_tasks(base, experts, "merge3", executor=pool, **kw).merge3
    assert a.coefficients == b.coefficients and a.history == b.history


def test_merge3_heads_and_bad_arguments():
    base, experts, data = _tasks(T=2)
    heads = [nn.Identity(), nn.Identity()]
    m = hm.merge_tasks(base, experts, "merge3", data=data, heads=heads, generations=2, popsize=3, seed=0)
    assert len(m.merge3.coefficients) == 2
    with pytest.raises(ValueError, match="data: merge3 needs"):
        hm.merge_tasks(base, experts, "merge3")
    with pytest.raises(ValueError, match="data: 1 \\(X, y\\) pairs for 2 experts"):
        hm.merge_tasks(base, experts, "merge3", data=data[:1])
    with pytest.raises(ValueError, match="estimator"):
        hm.merge_tasks(base, experts, "merge3", data=data, estimator="bayes")
    with pytest.raises(ValueError, match="popsize"):
        hm.merge_tasks(base, experts, "merge3", data=data, popsize=1)
    with pytest.raises(ValueError, match="heads"):
        hm.merge_tasks(base, experts, "merge3", data=data, heads=[nn.Identity()])
    with pytest.raises(ValueError, match="scale: merge3 searches"):
        hm.merge_tasks(base, experts, "merge3", data=data, scale=0.5)
    with pytest.raises(ValueError, match="executor"):
        hm.merge_tasks(base, experts, "merge3", data=data, executor=object())


def test_merge3_runs_on_the_zoo_executors():
    """MERGE3's candidates through hetmerge.fleet's executors (in-process and a 2-worker pool): the
    same search as this process's."""
    from hetmerge.fleet.executors import make_executor

    base, experts, data = _tasks(seed=2)
    kw = dict(data=data, generations=2, popsize=4, items=8, seed=1)
    a = hm.merge_tasks(base, experts, "merge3", **kw).merge3
    for kind in ("inprocess", "pool"):
        with make_executor(kind, workers=2, threads=1) as ex:
            b = hm.merge_tasks(base, experts, "merge3", executor=ex, **kw).merge3
        assert a.coefficients == b.coefficients and a.history == b.history, kind
