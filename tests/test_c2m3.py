"""hm.align_many / hm.merge_many (C2M3): cycle consistency by construction, planted permutations
recovered, heterogeneous widths padded as hm.align pads, objectives against a plain torch reference
of pairwise weight matching, the merge against a plain torch average, and clear errors."""
import copy
import itertools

import numpy as np
import pytest
import torch

import hetmerge as hm
from hetmerge import models as hmm
from hetmerge.many.c2m3 import Problem, _quartic, perm_matrix

from helpers_models import one_thread


def mlp(widths, seed, in_dim=16, out_dim=5):
    torch.manual_seed(seed)
    return hmm.mlp(in_dim, list(widths), out_dim)


def permuted(model, perms):
    """Copy of an MLP with hidden layer l's units reordered: new unit i = old unit perms[l][i]
    (plain torch indexing, no hetmerge code)."""
    m = copy.deepcopy(model)
    layers = [mod for mod in m if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for l, p in enumerate(perms):
            layers[l].weight.copy_(layers[l].weight[p])
            layers[l].bias.copy_(layers[l].bias[p])
            layers[l + 1].weight.copy_(layers[l + 1].weight[:, p])
    return m


def noisy_copies(n, widths=(12, 10), noise=0.3, seed=0):
    """n models that share structure up to a hidden permutation, plus noise (so the problem has a
    real optimum but no exact one)."""
    base = mlp(widths, seed)
    g = torch.Generator().manual_seed(seed + 100)
    out = []
    for k in range(n):
        perms = [torch.randperm(w, generator=g) for w in widths]
        m = permuted(base, perms)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g) * p.std())
        out.append(m)
    return out


def linears(model):
    return [mod for mod in model if isinstance(mod, torch.nn.Linear)]


def transformed(target, maps, hidden_names):
    """Target MLP's (weight, bias) per layer in the base's frame: T(B)[r, c] = B[src_r[r], src_c[c]],
    zero where a map is -1 (plain torch reference of hetmerge's padding)."""
    out = []
    ls = linears(target)
    n_layers = len(ls)
    for l, lin in enumerate(ls):
        W, b = lin.weight.detach().double(), lin.bias.detach().double()
        rows = maps[hidden_names[l]] if l < n_layers - 1 else torch.arange(W.shape[0])
        cols = maps[hidden_names[l - 1]] if l > 0 else torch.arange(W.shape[1])
        TW = torch.zeros(len(rows), len(cols), dtype=torch.float64)
        tb = torch.zeros(len(rows), dtype=torch.float64)
        r_ok, c_ok = rows >= 0, cols >= 0
        TW[torch.nonzero(r_ok)[:, 0][:, None], torch.nonzero(c_ok)[:, 0][None, :]] = W[rows[r_ok]][:, cols[c_ok]]
        tb[r_ok] = b[rows[r_ok]]
        out.append((TW, tb))
    return out


def pair_objective(base, target, maps):
    """Weight-matching objective sum_p <A_p, T(B_p)> of one pair (reference)."""
    names = [f"fc{l}" for l in range(len(linears(base)) - 1)]
    total = 0.0
    for lin, (TW, tb) in zip(linears(base), transformed(target, maps, names)):
        total += float((lin.weight.detach().double() * TW).sum() + (lin.bias.detach().double() * tb).sum())
    return total


# -- cycle consistency ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,seed", [(3, 0), (3, 1), (4, 2)])
def test_cycle_consistency_is_exact_for_equal_widths(n, seed):
    models = [mlp((10, 8), seed * 10 + k) for k in range(n)]
    with one_thread():
        res = hm.align_many(models, seed=seed)
    pair = {(i, j): res.pair(i, j).maps for i in range(n) for j in range(n)}
    for i, j, k in itertools.permutations(range(n), 3):
        for link in pair[(i, k)]:
            assert torch.equal(pair[(i, k)][link], pair[(j, k)][link][pair[(i, j)][link]]), (i, j, k, link)
    for i, j in itertools.permutations(range(n), 2):
        for link, m in pair[(i, j)].items():
            assert torch.equal(pair[(j, i)][link][m], torch.arange(len(m)))    # pair(j, i) inverts pair(i, j)
            assert torch.equal(pair[(i, i)][link], torch.arange(len(m)))


def test_pairwise_alignment_is_not_cycle_consistent_but_c2m3_is():
    """The problem C2M3 solves exists: three independent pairwise alignments do not compose."""
    models = [mlp((24, 20), k) for k in range(3)]
    with one_thread():
        p01, p12, p02 = (hm.align(models[i], models[j]).maps for i, j in ((0, 1), (1, 2), (0, 2)))
        res = hm.align_many(models)
    broken = sum(int((p02[g] != p12[g][p01[g]]).sum()) for g in ("fc0", "fc1"))
    assert broken > 0
    a01, a12, a02 = (res.pair(i, j).maps for i, j in ((0, 1), (1, 2), (0, 2)))
    assert all(torch.equal(a02[g], a12[g][a01[g]]) for g in a02)


# -- planted permutations -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["c2m3", "reference"])
def test_planted_permutations_are_recovered(method):
    base = mlp((16, 12), 7)
    g = torch.Generator().manual_seed(3)
    perms = [[torch.randperm(16, generator=g), torch.randperm(12, generator=g)] for _ in range(3)]
    models = [base] + [permuted(base, p) for p in perms]
    with one_thread():
        res = hm.align_many(models, method=method)
    for j, p in enumerate(perms, start=1):
        # base unit a is copy j's unit x with p[x] = a
        assert torch.equal(res.pair(0, j).maps["fc0"], torch.argsort(p[0]))
        assert torch.equal(res.pair(0, j).maps["fc1"], torch.argsort(p[1]))
    merged = hm.merge_many(models, res)
    for a, b in zip(merged.parameters(), base.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    x = torch.randn(20, 16)
    torch.testing.assert_close(merged(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cnn", "res_mlp"])
def test_planted_permutations_in_convs_and_residual_streams(kind):
    """Permuted copies of a CNN (conv kernels, BN, a flatten) and of a residual MLP (one group for
    the whole residual stream): the uniform merge computes what the original computes."""
    from hetmerge.maps import permute_state
    torch.manual_seed(0)
    if kind == "cnn":
        base, x = hmm.cnn(1, [6, 5], 4, (6, 6), hidden=7), torch.randn(5, 1, 6, 6)
    else:
        base, x = hmm.res_mlp(12, 8, 2, 4, hidden=10), torch.randn(9, 12)
    base.eval()
    spec = hm.trace_spec(base)
    g = torch.Generator().manual_seed(1)
    models = [base]
    for _ in range(2):
        perms = {grp: torch.randperm(spec.sizes[grp], generator=g) for grp in spec.free_groups}
        m = copy.deepcopy(base)
        m.load_state_dict(permute_state(spec, base.state_dict(), perms))
        models.append(m.eval())
    with one_thread():
        res = hm.align_many(models)
    torch.testing.assert_close(hm.merge_many(models, res)(x), base(x), rtol=1e-4, atol=1e-5)


# -- heterogeneous widths -----------------------------------------------------------------------------

def test_heterogeneous_widths_give_valid_nested_maps():
    widths = [(12, 10), (8, 14), (12, 6), (8, 10)]
    models = [mlp(w, k) for k, w in enumerate(widths)]
    with one_thread():
        res = hm.align_many(models)
    assert res.size == {"fc0": 12, "fc1": 14}
    x = torch.randn(7, 16)
    for i, j in itertools.product(range(4), repeat=2):
        al = res.pair(i, j)
        for l, link in enumerate(("fc0", "fc1")):
            m, n_i, n_j = al.maps[link], widths[i][l], widths[j][l]
            assert len(m) == n_i
            valid = m[m >= 0]
            assert valid.unique().numel() == valid.numel() and int(valid.max()) < n_j
            assert int((m < 0).sum()) == max(0, n_i - n_j)     # all of a narrower model is used
        merged = hm.merge(models[i], models[j], al, lam=1.0)
        if all(widths[j][l] <= widths[i][l] for l in range(2)):
            # zero padding is exact: the merged model at λ = 1 computes model j
            torch.testing.assert_close(merged(x), models[j](x), rtol=1e-5, atol=1e-5)
    # nested universe: composition holds whenever the middle model is at least as wide as the first
    for i, j, k in itertools.permutations(range(4), 3):
        for l, link in enumerate(("fc0", "fc1")):
            if widths[j][l] >= widths[i][l]:
                assert torch.equal(res.pair(i, k).maps[link],
                                   res.pair(j, k).maps[link][res.pair(i, j).maps[link]]), (i, j, k, link)


def test_universe_maps_place_every_unit_once():
    widths = [(12, 10), (8, 14)]
    models = [mlp(w, k) for k, w in enumerate(widths)]
    with one_thread():
        res = hm.align_many(models)
    for i in range(2):
        for l, (g, m) in enumerate(res.universe_maps(i).items()):
            assert len(m) == res.size[g]
            assert torch.equal(torch.sort(m[m >= 0]).values, torch.arange(widths[i][l]))
            assert bool((m[:widths[i][l]] >= 0).all())    # model i fills the first n_i slots


# -- objectives -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("widths", [[(12, 10)] * 4, [(12, 10), (9, 13), (12, 7)]])
def test_objective_is_the_sum_of_pairwise_objectives(widths):
    models = noisy_copies(len(widths), widths[0], seed=4) if len(set(widths)) == 1 else \
        [mlp(w, k) for k, w in enumerate(widths)]
    with one_thread():
        res = hm.align_many(models)
        ref = hm.align_many(models, method="reference")
    n = len(models)
    for r in (res, ref):
        want = sum(pair_objective(models[i], models[j], r.pair(i, j).maps)
                   for i in range(n) for j in range(i + 1, n))
        assert r.objective == pytest.approx(want, rel=1e-9)
    # C2M3 starts from the reference solution and only keeps improvements; the line search never
    # loses ground (trace: relaxed steps, then rounded, then refined)
    assert res.objective >= ref.objective - 1e-9
    fw = res.trace[:-2]
    assert fw[0] == pytest.approx(ref.trace[0], rel=1e-12)
    assert all(b >= a - 1e-12 for a, b in zip(fw, fw[1:]))
    assert res.trace[-1] >= res.trace[-2] - 1e-12


@pytest.mark.parametrize("kind", ["independent", "noisy copies"])
def test_c2m3_beats_reference_and_nears_independent_pairwise_sum(kind):
    models = [mlp((16, 12), k) for k in range(4)] if kind == "independent" else \
        noisy_copies(4, (16, 12), noise=1.5, seed=5)
    with one_thread():
        res = hm.align_many(models)
        ref = hm.align_many(models, method="reference")
        indep = sum(hm.align(models[i], models[j]).objective for i in range(4) for j in range(i + 1, 4))
    # measured: c2m3 / reference = 1.28 (independent), 1.31 (noisy copies)
    assert res.objective > 1.15 * ref.objective
    # independent pairwise alignments are not cycle-consistent, so their sum is out of reach of one
    # universe; measured: c2m3 / independent = 0.84 (independent), 0.90 (noisy copies)
    assert 0.8 * indep <= res.objective <= indep


def test_reference_method_is_hm_align_to_model_0():
    models = [mlp((10, 8), k) for k in range(3)]
    with one_thread():
        ref = hm.align_many(models, method="reference")
        for j in (1, 2):
            direct = hm.align(models[0], models[j]).maps
            assert all(torch.equal(ref.pair(0, j).maps[g], direct[g]) for g in direct)


def test_line_search_polynomial_matches_the_objective():
    """F along P + η(D − P) is the quartic the line search maximizes, for relaxed P."""
    models = [mlp((6, 5), k) for k in range(3)]
    res = hm.align_many(models, method="reference")
    prob = Problem(res.universe)
    g = torch.Generator().manual_seed(0)

    def rand_ds(n):   # a doubly stochastic matrix: a mix of permutation matrices
        return sum(w * perm_matrix(torch.randperm(n, generator=g)) for w in (0.5, 0.3, 0.2))
    P = {grp: [rand_ds(n) for n in ns] for grp, ns in res.widths.items()}
    D = {grp: [perm_matrix(torch.randperm(n, generator=g)) for n in ns] for grp, ns in res.widths.items()}

    def at(eta):
        return {grp: [p + eta * (d - p) for p, d in zip(P[grp], D[grp])] for grp in P}
    poly = _quartic(*prob.forward(at(0.0)), *prob.forward(at(0.5)), *prob.forward(at(1.0)))
    for eta in (0.1, 0.37, 0.8, 1.3):
        want = prob.objective(*prob.forward(at(eta)))
        assert np.polyval(poly[::-1], eta) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_identity_method_is_the_unaligned_baseline():
    """method="identity": units by position, as hm.merge(..., res=None) pads and crops."""
    models = [mlp((12, 10), 0), mlp((8, 14), 1), mlp((12, 6), 2)]
    res = hm.align_many(models, method="identity")
    x = torch.randn(4, 16)
    for i, j in itertools.permutations(range(3), 2):
        a = hm.merge(models[i], models[j], res.pair(i, j), lam=0.4)
        b = hm.merge(models[i], models[j], None, lam=0.4)
        assert torch.equal(a(x), b(x))


# -- merge_many ------------------------------------------------------------------------------------------

def test_merge_many_is_the_weighted_average_in_model_0s_frame():
    widths = [(12, 10), (8, 14), (12, 6)]
    models = [mlp(w, k) for k, w in enumerate(widths)]
    res = hm.align_many(models, method="reference")
    w = [0.5, 0.3, 0.2]
    merged = hm.merge_many(models, res, weights=[5, 3, 2])     # normalized
    names = ["fc0", "fc1"]
    parts = [[(l.weight.detach().double(), l.bias.detach().double()) for l in linears(models[0])]]
    parts += [transformed(models[j], res.pair(0, j).maps, names) for j in (1, 2)]
    for l, lin in enumerate(linears(merged)):
        W = sum(w[j] * parts[j][l][0] for j in range(3))
        b = sum(w[j] * parts[j][l][1] for j in range(3))
        torch.testing.assert_close(lin.weight.detach().double(), W, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lin.bias.detach().double(), b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fill", ["zero", "base"])
def test_merge_many_with_one_hot_weights_is_the_aligned_model(fill):
    widths = [(12, 10), (8, 14), (12, 6)]
    models = [mlp(w, k) for k, w in enumerate(widths)]
    res = hm.align_many(models)
    x = torch.randn(5, 16)
    assert torch.equal(hm.merge_many(models, res, weights=[1, 0, 0], fill=fill)(x), models[0](x))
    for j in (1, 2):
        one_hot = [float(k == j) for k in range(3)]
        got = hm.merge_many(models, res, weights=one_hot, fill=fill)
        want = hm.merge(models[0], models[j], res.pair(0, j), lam=1.0, fill=fill)
        for a, b in zip(got.state_dict().values(), want.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_inputs_are_left_untouched():
    models = [mlp((8, 6), k) for k in range(3)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    res = hm.align_many(models)
    hm.merge_many(models, res)
    for m, sd in zip(models, before):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


# -- errors ---------------------------------------------------------------------------------------------

def test_fewer_than_two_models_is_an_error():
    with pytest.raises(ValueError, match="at least 2 models"):
        hm.align_many([mlp((4,), 0)])
    with pytest.raises(TypeError, match="models"):
        hm.align_many(mlp((4,), 0))
    with pytest.raises(TypeError, match=r"models\[1\]"):
        hm.align_many([mlp((4,), 0), "not a model"])


def test_models_of_different_depths_name_the_model_and_layers():
    models = [mlp((8, 6), 0), mlp((8, 6), 1), mlp((8, 6, 5), 2)]
    with pytest.raises(ValueError, match=r"models\[2\] pairs with model 0 on layers .*layer_maps"):
        hm.align_many(models)


def test_layer_maps_pair_models_onto_a_common_structure():
    models = [mlp((8, 6), 0), mlp((8, 6, 5), 1), mlp((8, 6), 2)]
    lm = [None, {"fc0": "fc0", "fc1": "fc1"}, {"fc0": "fc0", "fc1": "fc1"}]
    res = hm.align_many(models, layer_maps=lm)
    assert set(res.pair(1, 2).maps) >= {"fc0", "fc1"}
    a01, a12, a02 = (res.pair(i, j).maps for i, j in ((0, 1), (1, 2), (0, 2)))
    assert torch.equal(a02["fc0"], a12["fc0"][a01["fc0"]])
    with pytest.raises(ValueError, match="layer_maps"):
        hm.align_many(models, layer_maps=lm[:2])
    with pytest.raises(ValueError, match=r"layer_maps\[0\]"):
        hm.align_many(models, layer_maps=[{"fc0": "fc0"}] + lm[1:])


@pytest.mark.parametrize("weights,err,match", [
    ([1, 1], ValueError, "expected 3 numbers"),
    ([1, -1, 1], ValueError, r"weights\[1\] = -1.0"),
    ([1, float("nan"), 1], ValueError, r"weights\[1\]"),
    ([0, 0, 0], ValueError, "sum to 0"),
    ("abc", TypeError, "weights"),
    ([1, "x", 1], TypeError, r"weights\[1\]"),
])
def test_bad_weights_are_rejected(weights, err, match):
    models = [mlp((6,), k) for k in range(3)]
    res = hm.align_many(models, method="reference")
    with pytest.raises(err, match=match):
        hm.merge_many(models, res, weights=weights)


def test_other_bad_inputs():
    models = [mlp((6,), k) for k in range(3)]
    with pytest.raises(ValueError, match="method"):
        hm.align_many(models, method="pairwise")
    with pytest.raises(ValueError, match="max_iter"):
        hm.align_many(models, max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        hm.align_many(models, tol=float("nan"))
    res = hm.align_many(models, method="reference")
    with pytest.raises(IndexError, match="j = 3"):
        res.pair(0, 3)
    with pytest.raises(ValueError, match="res aligns 3 models, got 2"):
        hm.merge_many(models[:2], res)
    with pytest.raises(ValueError, match=r"models\[1\]: 'fc0.weight' has shape"):
        hm.merge_many([models[0], mlp((7,), 1), models[2]], res)
    with pytest.raises(TypeError, match="res"):
        hm.merge_many(models, hm.align(models[0], models[1]))
    with pytest.raises(ValueError, match="fill"):
        hm.merge_many(models, res, fill="mean")
