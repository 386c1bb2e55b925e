"""hm.align on digits MLPs: planted permutations, agreement with an independent torch+scipy
reference, heterogeneous widths and depths, the size-incompatible case, restarts, activation matching."""

import pytest
import torch

import hetmerge as hm
from hetmerge.maps import permute_state

from helpers_models import digits, ref_weight_matching, same_state, state_copy, trained_mlp


def planted(base, widths_b, seed=0):
    """Target = a permuted subset of the base's hidden units (base wider: the rest is padding).
    Returns (target, expected maps {group: src}) with src[base slot] = target unit or -1."""
    spec = hm.trace_spec(base)
    g = torch.Generator().manual_seed(seed)
    keep, expected = {}, {}
    for grp, nb in zip(["fc0", "fc1"], widths_b):
        na = spec.sizes[grp]
        keep[grp] = torch.randperm(na, generator=g)[:nb]     # target unit j = base unit keep[j]
        src = torch.full((na,), -1, dtype=torch.long)
        src[keep[grp]] = torch.arange(nb)
        expected[grp] = src
    target = hm.models.mlp(64, list(widths_b), 10)
    sd = permute_state(spec, base.state_dict(), {})
    W0, b0 = sd["fc0.weight"][keep["fc0"]], sd["fc0.bias"][keep["fc0"]]
    W1 = sd["fc1.weight"][keep["fc1"]][:, keep["fc0"]]
    b1 = sd["fc1.bias"][keep["fc1"]]
    W2 = sd["head.weight"][:, keep["fc1"]]
    target.load_state_dict({"fc0.weight": W0, "fc0.bias": b0, "fc1.weight": W1, "fc1.bias": b1,
                            "head.weight": W2, "head.bias": sd["head.bias"]})
    return target.eval(), expected


@pytest.mark.parametrize("widths_b", [(96, 64), (80, 40)])
def test_planted_permutation_is_recovered_exactly(widths_b):
    base = trained_mlp((96, 64), 0)
    target, expected = planted(base, widths_b)
    before = state_copy(base), state_copy(target)
    res = hm.align(base, target)
    for grp, src in expected.items():
        assert torch.equal(res.maps[grp], src), grp
    assert same_state(base, before[0]) and same_state(target, before[1])   # inputs untouched
    # with the recovered maps, merging at λ = 1 gives the target's function exactly
    X = digits().X_test
    torch.testing.assert_close(hm.merge(base, target, res, lam=1.0)(X), target(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("widths", [((128, 64), (128, 64)), ((128, 64), (64, 32)), ((48, 32), (64, 16))])
def test_objective_at_least_reference(widths):
    base, target = trained_mlp(widths[0], 0), trained_mlp(widths[1], 1)
    ref_maps, ref_obj, _ = ref_weight_matching(base, target, seed=3)
    res = hm.align(base, target, seed=3)
    assert res.objective >= ref_obj - 1e-5 * abs(ref_obj)
    # same algorithm, same order: the same maps
    assert torch.equal(res.maps["fc0"], ref_maps[0]) and torch.equal(res.maps["fc1"], ref_maps[1])


def test_trace_is_normalized_and_non_decreasing():
    res = hm.align(trained_mlp((128, 64), 0), trained_mlp((64, 32), 1))
    t = torch.tensor(res.trace)
    assert len(t) == res.iterations + 1 and res.converged
    assert (t.abs() <= 1).all() and (t[1:] >= t[:-1] - 1e-9).all()
    assert t[-1] > t[0] + 0.1     # alignment finds much more similar weights than by position
    assert set(res.timings) >= {"cost", "assign", "total"}


def test_cases_and_size_incompatible_alternation():
    # fc1: base [32, 128] vs target [64, 64] -- one dimension larger on each side
    base, target = trained_mlp((128, 32), 0), trained_mlp((64, 64), 1)
    res = hm.align(base, target)
    assert res.cases == {"fc0": "size-compatible", "fc1": "size-incompatible",
                         "head": "size-compatible"}
    assert res.maps["fc0"].shape == (128,) and int((res.maps["fc0"] >= 0).sum()) == 64
    # base narrower on fc1's output: 32 of the 64 target units are kept, the others dropped
    assert res.maps["fc1"].shape == (32,) and bool((res.maps["fc1"] >= 0).all())
    assert len(set(res.maps["fc1"].tolist())) == 32
    assert res.trace[-1] > res.trace[0]


def test_same_size_case():
    res = hm.align(trained_mlp((64, 32), 0), trained_mlp((64, 32), 1))
    assert set(res.cases.values()) == {"same size"}
    for m in res.maps.values():
        assert sorted(m.tolist()) == list(range(len(m)))


def test_l2_and_inner_agree_when_padding_differ_when_dropping():
    wide, narrow = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    a, b = hm.align(wide, narrow), hm.align(wide, narrow, objective="l2")
    assert all(torch.equal(a.maps[k], b.maps[k]) for k in a.maps)
    assert b.objective <= 0 and -1 <= b.trace[-1] <= 0
    c, d = hm.align(narrow, wide), hm.align(narrow, wide, objective="l2")
    assert any(not torch.equal(c.maps[k], d.maps[k]) for k in c.maps)
    # each wins on its own objective
    from hetmerge.methods import WeightMatching
    wm_l2 = WeightMatching(d.pairing, narrow.state_dict(), wide.state_dict(), "l2")
    assert wm_l2.objective(d.maps) >= wm_l2.objective(c.maps) - 1e-6


def test_restarts_keep_the_best():
    base, target = trained_mlp((128, 64, 32), 0), trained_mlp((64, 32, 32), 2)
    res = hm.align(base, target, restarts=4, seed=5)
    assert len(res.restart_objectives) == 4
    assert res.objective == max(res.restart_objectives)
    single = hm.align(base, target, seed=5)
    assert single.objective == res.restart_objectives[0]


def test_depth_mismatch_default_layer_map_and_warning():
    base, target = trained_mlp((128, 64), 0), trained_mlp((64,), 1)
    res = hm.align(base, target)
    # hidden layers shallow to shallow; with different depths the extra layer and the head stay
    # the base's (a hidden layer is never paired with a head: that would map units onto classes)
    assert res.layer_map == {"fc0": "fc0"}
    assert int((res.maps["fc0"] >= 0).sum()) == 64          # 128 base slots, 64 target units
    same_depth = hm.align(trained_mlp((128, 64), 0), trained_mlp((64, 32), 1))
    assert same_depth.layer_map == {"fc0": "fc0", "fc1": "fc1", "head": "head"}
    with pytest.warns(UserWarning, match="deep-to-shallow|deeper target layers"):
        hm.align(base, target, layer_map={"fc0": "head"})
    with pytest.raises(KeyError, match="layer_map: base layer 'nope'"):
        hm.align(base, target, layer_map={"nope": "fc0"})


def test_activation_matching_recovers_planted_and_works_across_widths():
    base = trained_mlp((96, 64), 0)
    target, expected = planted(base, (96, 64), seed=4)
    X = digits().X_train[:512]
    res = hm.align(base, target, method="activation", data=X)
    # dead ReLU units have constant activations (no correlation to go by): check the live ones
    h0 = torch.relu(base.fc0(X))
    live = {"fc0": h0.std(0) > 0, "fc1": torch.relu(base.fc1(h0)).std(0) > 0}
    for g in expected:
        assert live[g].float().mean() > 0.5
        assert torch.equal(res.maps[g][live[g]], expected[g][live[g]]), g
    # every live unit finds its twin with correlation 1
    n_live = sum(int(v.sum()) for v in live.values())
    assert res.method == "activation" and res.objective == pytest.approx(n_live, rel=1e-4)
    # across widths: a better merge than by position
    wide, narrow = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    act = hm.align(wide, narrow, method="activation", data=(X, None))
    d = digits()
    lams = torch.linspace(0, 1, 11)
    aligned = hm.sweep(wide, narrow, act, lams, data=(d.X_test, d.y_test))
    plain = hm.sweep(wide, narrow, None, lams, data=(d.X_test, d.y_test))
    assert aligned.barrier < plain.barrier
    with pytest.raises(ValueError, match="needs data="):
        hm.align(wide, narrow, method="activation")


def test_argument_errors():
    m = trained_mlp((64, 32), 0)
    with pytest.raises(ValueError, match="method"):
        hm.align(m, m, method="magic")
    with pytest.raises(ValueError, match="objective"):
        hm.align(m, m, objective="cosine")
    with pytest.raises(TypeError, match="target"):
        hm.align(m, "model")


def test_callback_reports_every_sweep_of_every_restart():
    base = trained_mlp((64, 32), 0)
    target = trained_mlp((64, 32), 1)
    calls = []
    res = hm.align(base, target, restarts=2, callback=lambda r, it, obj, gain: calls.append((r, it, obj, gain)))
    assert sorted({c[0] for c in calls}) == [0, 1]
    best_run = [c for c in calls if c[0] == res.restart_objectives.index(max(res.restart_objectives))]
    assert [c[1] for c in best_run] == list(range(1, len(best_run) + 1))
    assert [c[2] for c in best_run] == pytest.approx(res.trace[1:])
    assert all(c[3] >= -1e-6 for c in calls)   # coordinate descent never loses objective


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_align_half_precision_models(dtype):
    # hm.align failed on float16/bfloat16 models (cost_matrix rejected half dtypes; LLM checkpoints
    # are bf16). On a well-separated planted permutation the half models must give the maps of the
    # same models upcast to float32, which are the planted ones.
    import copy

    base32 = trained_mlp((96, 64), 0)
    target32, expected = planted(base32, (80, 40))
    base, target = copy.deepcopy(base32).to(dtype), copy.deepcopy(target32).to(dtype)
    before = state_copy(base), state_copy(target)
    res = hm.align(base, target)
    res_up = hm.align(copy.deepcopy(base).float(), copy.deepcopy(target).float())
    for grp, src in expected.items():
        assert torch.equal(res.maps[grp], res_up.maps[grp]), grp
        assert torch.equal(res.maps[grp], src), grp
    assert same_state(base, before[0]) and same_state(target, before[1])
    assert all(p.dtype == dtype for p in base.parameters())
