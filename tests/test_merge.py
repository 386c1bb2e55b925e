"""hm.merge: invariances first (λ = 0 is the base; a narrower target merged at λ = 1 with zero fill is
the target, exactly), then per-layer λ, fill="base", and immutability of the inputs."""
import copy

import pytest
import torch

import hetmerge as hm
from hetmerge import models as hmm

from helpers_models import digits, randomize_bn, same_state, state_copy, trained_mlp


def test_lam_zero_is_the_base():
    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    res = hm.align(base, target)
    X = digits().X_test
    assert torch.equal(hm.merge(base, target, res, lam=0.0)(X), base(X))


@pytest.mark.parametrize("kind", ["mlp", "mlp_bn", "cnn_bn", "res_mlp", "res_cnn"])
def test_zero_padding_invariance(kind):
    """A target narrower than the base, merged at λ = 1 with fill="zero", reproduces the target: padded
    units get zero weights in and out (and zero BN scale, shift and statistics)."""
    torch.manual_seed(0)
    if kind == "mlp":
        base, target, x = hmm.mlp(64, [48, 40], 10), hmm.mlp(64, [32, 16], 10), torch.randn(30, 64)
    elif kind == "mlp_bn":
        base, target = hmm.mlp(64, [48, 40], 10, bn=True), hmm.mlp(64, [32, 16], 10, bn=True)
        x = torch.randn(30, 64)
    elif kind == "cnn_bn":
        base, target = hmm.cnn(1, [8, 12], 10, (8, 8), hidden=20), hmm.cnn(1, [6, 5], 10, (8, 8), hidden=9)
        x = torch.randn(6, 1, 8, 8)
    elif kind == "res_mlp":
        base, target = hmm.res_mlp(64, 32, 2, 10, hidden=40), hmm.res_mlp(64, 20, 2, 10, hidden=24)
        x = torch.randn(30, 64)
    else:
        base, target = hmm.res_cnn(1, 8, 2, 10), hmm.res_cnn(1, 5, 2, 10)
        x = torch.randn(4, 1, 8, 8)
    base, target = randomize_bn(base, 1), randomize_bn(target, 2)
    res = hm.align(base, target)
    assert all(int((m >= 0).sum()) == res.pairing.links[g].n_b for g, m in res.maps.items())
    merged = hm.merge(base, target, res, lam=1.0, fill="zero")
    torch.testing.assert_close(merged(x), target(x), rtol=1e-5, atol=1e-5)
    # the same holds for the unaligned baseline (maps by position)
    torch.testing.assert_close(hm.merge(base, target, None, lam=1.0)(x), target(x), rtol=1e-5, atol=1e-5)


def test_merge_is_the_interpolation_of_the_aligned_weights():
    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    res = hm.align(base, target)
    m = hm.merge(base, target, res, lam=0.3)
    src0, src1 = res.maps["fc0"], res.maps["fc1"]
    tw = torch.zeros(64, 128)
    ok0, ok1 = src0 >= 0, src1 >= 0
    tw[torch.nonzero(ok1)[:, 0][:, None], torch.nonzero(ok0)[:, 0][None, :]] = \
        target.fc1.weight.detach()[src1[ok1]][:, src0[ok0]]
    torch.testing.assert_close(m.fc1.weight.detach(), 0.7 * base.fc1.weight.detach() + 0.3 * tw)


def test_per_layer_lam_and_fill_base():
    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    before = state_copy(base), state_copy(target)
    res = hm.align(base, target)
    m = hm.merge(base, target, res, lam={"fc0": 0.5})
    assert torch.equal(m.fc1.weight, base.fc1.weight) and torch.equal(m.head.bias, base.head.bias)
    assert not torch.equal(m.fc0.weight, base.fc0.weight)
    with pytest.raises(KeyError, match="lam: 'fc9'"):
        hm.merge(base, target, res, lam={"fc9": 0.5})
    # fill="base": base units without a partner keep their weights instead of shrinking to zero
    mb = hm.merge(base, target, res, lam=1.0, fill="base")
    free = res.maps["fc0"] < 0
    assert torch.equal(mb.fc0.weight[free], base.fc0.weight[free])
    mz = hm.merge(base, target, res, lam=1.0, fill="zero")
    assert bool((mz.fc0.weight[free] == 0).all())
    with pytest.raises(ValueError, match="fill"):
        hm.merge(base, target, res, lam=0.5, fill="mean")
    assert same_state(base, before[0]) and same_state(target, before[1])
    assert m is not base and mb is not base


def test_merge_rejects_a_foreign_result():
    base = trained_mlp((64, 32), 0)
    with pytest.raises(ValueError, match="res:"):
        hm.merge(base, base, res=object(), lam=0.5)


@pytest.mark.parametrize("kind", ["cnn", "res_mlp", "res_cnn"])
def test_heterogeneous_widths_and_depths_beyond_mlps(kind):
    """CNNs and residual nets that differ in width and depth align, merge and sweep: λ = 0 is the
    base, the merged model keeps the base's architecture, alignment beats position on the objective."""
    torch.manual_seed(0)
    if kind == "cnn":   # 3 conv layers + hidden fc vs 2 conv layers, no hidden fc
        base, target = hmm.cnn(1, [8, 12, 8], 10, (8, 8), hidden=16), hmm.cnn(1, [6, 10], 10, (8, 8))
        x = torch.randn(16, 1, 8, 8)
    elif kind == "res_mlp":   # 2 blocks vs 1 block, wider stream vs narrower
        base, target = hmm.res_mlp(64, 32, 2, 10, hidden=24), hmm.res_mlp(64, 20, 1, 10, hidden=40)
        x = torch.randn(16, 64)
    else:
        base, target = hmm.res_cnn(1, 8, 2, 10), hmm.res_cnn(1, 6, 1, 10)
        x = torch.randn(4, 1, 8, 8)
    base, target = randomize_bn(base, 1), randomize_bn(target, 2)
    before = state_copy(base), state_copy(target)
    with _no_warning():
        res = hm.align(base, target, restarts=2)
    if kind == "cnn":   # the extra conv, the hidden fc and the head (other depth) stay the base's
        assert res.layer_map == {"conv0": "conv0", "conv1": "conv1"}
    # the reported objective is sum_p <A_p, T(B_p)> over the paired tensors, recomputed here in plain
    # torch from the maps; alignment must beat pairing by position on that same number
    pos = res.pairing.position_maps()
    assert res.objective == pytest.approx(_inner_of_aligned(res.pairing, base, target, res.maps), rel=1e-5)
    assert res.objective >= _inner_of_aligned(res.pairing, base, target, pos) - 1e-6
    assert res.trace[-1] >= res.trace[0]
    # planted: the base with its hidden units permuted is recovered exactly, objective = sum_p ||A_p||^2
    planted, _ = _planted_permutation(base, x)
    pres = hm.align(base, planted, restarts=2)
    sa = base.state_dict()
    norm = sum(float(sa[pp.base_key].double().square().sum()) for pp in pres.pairing.params)
    assert pres.objective == pytest.approx(norm, rel=1e-5)
    assert pres.objective == pytest.approx(_inner_of_aligned(pres.pairing, base, planted, pres.maps), rel=1e-5)
    torch.testing.assert_close(hm.merge(base, target, res, lam=0.0)(x), base(x))
    merged = hm.merge(base, target, res, lam=0.4)
    assert type(merged) is type(base) and merged.state_dict().keys() == base.state_dict().keys()
    assert torch.isfinite(merged(x)).all()
    y = torch.randint(0, 10, (x.shape[0],))
    curve = hm.sweep(base, target, res, torch.linspace(0, 1, 5), data=(x, y))
    assert curve.loss.shape == (5,) and torch.isfinite(curve.loss).all()
    assert same_state(base, before[0]) and same_state(target, before[1])


def _inner_of_aligned(pairing, base, target, maps) -> float:
    """sum over paired tensors of <A, B gathered into the base's slots by the maps> (float64, padding
    zero), written with index_select: independent of hetmerge.ops and of WeightMatching."""
    from reference import gather_pad
    sa, sb = base.state_dict(), target.state_dict()
    total = 0.0
    for pp in pairing.params:
        b = sb[pp.target_key].detach().double()
        for d, ln in enumerate(pp.links):
            src, blk = maps[ln], pp.blocks[d]
            entries = torch.stack([torch.where(src >= 0, src * blk + r, -1) for r in range(blk)], 1).reshape(-1)
            b = gather_pad(b, entries.numpy(), d)
        total += float((sa[pp.base_key].detach().double() * b).sum())
    return total


def _planted_permutation(model, x):
    """A copy of `model` with every free hidden group permuted at random (checked: same function)."""
    from hetmerge.maps import permute_state
    spec = hm.trace_spec(model, x)
    g = torch.Generator().manual_seed(3)
    perms = {grp: torch.randperm(n, generator=g) for grp, n in spec.sizes.items()}   # sizes: free groups only
    out = copy.deepcopy(model)
    out.load_state_dict(permute_state(spec, model.state_dict(), perms))
    was = model.training
    out.eval(), model.eval()   # BN: compare with running statistics, which move with the units
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    model.train(was)
    return out, perms


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# λ outside [0, 1]: an error naming the layer and value, or exact extrapolation when asked
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam, needle", [
    (1.5, r"lam = 1.5 is outside \[0, 1\]"),
    (-0.25, r"lam = -0.25 is outside \[0, 1\]"),
    (float("nan"), r"lam = nan is not a finite number"),
    ({"fc0": 0.5, "fc1": 1.01}, r"lam\['fc1'\] = 1.01 is outside \[0, 1\]"),
    ({"fc0": float("nan")}, r"lam\['fc0'\] = nan is not a finite number"),
    ({"#1": -1.0}, r"lam\['#1'\] = -1.0 is outside \[0, 1\]"),
])
def test_merge_accepted_lam_outside_unit_interval_silently(lam, needle):
    base, target = trained_mlp((64, 32), 0), trained_mlp((64, 32), 1)
    res = hm.align(base, target)
    with pytest.raises(ValueError, match=needle):
        hm.merge(base, target, res, lam=lam)
    if "finite" in needle:    # NaN stays an error, extrapolating or not
        with pytest.raises(ValueError, match=needle):
            hm.merge(base, target, res, lam=lam, extrapolate=True)
    else:
        hm.merge(base, target, res, lam=lam, extrapolate=True)


def test_merge_extrapolates_exactly_when_asked():
    base, target = trained_mlp((64, 32), 0), trained_mlp((48, 32), 1)
    res = hm.align(base, target)
    for lam in (1.5, -0.5):
        m = hm.merge(base, target, res, lam=lam, extrapolate=True)
        # independent reference: (1 - λ)·A + λ·B[rows][:, cols], zero where the map pads
        src0, src1 = res.maps["fc0"], res.maps["fc1"]
        tb0 = target.fc0.weight.detach()[src0.clamp(min=0)] * (src0 >= 0)[:, None]
        torch.testing.assert_close(m.fc0.weight, (1 - lam) * base.fc0.weight + lam * tb0)
        tb1 = target.fc1.weight.detach()[src1][:, src0.clamp(min=0)] * (src0 >= 0)[None, :]
        torch.testing.assert_close(m.fc1.weight, (1 - lam) * base.fc1.weight + lam * tb1)
        torch.testing.assert_close(m.head.bias, (1 - lam) * base.head.bias + lam * target.head.bias)
    per_layer = hm.merge(base, target, res, lam={"fc1": 2.0}, extrapolate=True)
    assert torch.equal(per_layer.fc0.weight, base.fc0.weight)
    with pytest.raises(ValueError, match=r"lam\['fc1'\] = 2.0 is outside \[0, 1\]"):
        hm.merge(base, target, res, lam={"fc1": 2.0})


def test_sweep_accepted_lambdas_outside_unit_interval_silently():
    base, target = trained_mlp((64, 32), 0), trained_mlp((64, 32), 1)
    d = digits()
    res = hm.align(base, target)
    for bad, needle in ((1.2, r"lambdas\[1\] = 1.2 is outside \[0, 1\]"),
                        (float("nan"), r"lambdas\[1\] = nan is not a finite number")):
        with pytest.raises(ValueError, match=needle):
            hm.sweep(base, target, res, [0.0, bad], data=(d.X_test, d.y_test))
    curve = hm.sweep(base, target, res, [-0.2, 0.5, 1.2], data=(d.X_test, d.y_test), extrapolate=True)
    for i, lam in enumerate((-0.2, 0.5, 1.2)):
        m = hm.merge(base, target, res, lam=lam, extrapolate=True)
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(m(d.X_test), d.y_test).item()
        assert curve.loss[i].item() == pytest.approx(loss, rel=1e-4, abs=1e-5)
