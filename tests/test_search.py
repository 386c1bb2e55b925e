"""hm.sweep(search="adaptive") / hetmerge.search: the λ* a grid sweep would give and the barrier
over [0, 1] from far fewer evaluations. Synthetic curves (a stub evaluator with known accuracy and
loss) check the search logic exactly; trained digits MLPs check it against a plain-torch reference
(hm.merge at each λ, a plain forward loop) on a 101-point grid."""
import math

import pytest
import torch
import torch.nn.functional as F

import hetmerge as hm
from hetmerge.evaluate import lam_star
from hetmerge.search import adaptive_search

from helpers_models import digits, trained_mlp

G25 = torch.linspace(0, 1, 25, dtype=torch.float64)


class Stub:
    """Evaluator of known curves: acc(λ) and the loss L(λ) = (1-λ)·L0 + λ·L1 + bump(λ).
    Records every call so the tests can count evaluations and check batch sizes."""

    def __init__(self, acc, bump, l0=0.3, l1=0.5):
        self.acc, self.bump, self.l0, self.l1 = acc, bump, l0, l1
        self.calls = []

    def __call__(self, lams):
        xs = lams.tolist()
        self.calls.append(xs)
        return {"loss": torch.tensor([(1 - x) * self.l0 + x * self.l1 + self.bump(x) for x in xs],
                                     dtype=torch.float64),
                "acc": torch.tensor([self.acc(x) for x in xs], dtype=torch.float64)}

    @property
    def evaluated(self):
        return sorted(x for c in self.calls for x in c)


def grid_lam_star(acc, grid=G25, tol=0.01):
    lams = torch.round(grid * 1e6) / 1e6
    return lam_star(lams, torch.tensor([acc(float(x)) for x in lams]), acc(0.0), tol)


def check_invariants(stub, r, grid=G25, tol=0.01, batch=3):
    """What the search promises whatever the curves: each λ evaluated once, batches bounded, λ* an
    evaluated grid point, everything evaluated up to it within tol, the next grid point above it
    evaluated and out of tol, and the barrier the largest evaluated value."""
    ev = stub.evaluated
    assert len(ev) == len(set(ev)) == r.n_evals
    assert all(len(c) <= batch for c in stub.calls[1:])
    assert 0.0 in ev and 1.0 in ev
    thresh = stub.acc(0.0) - tol
    g = [round(float(x) * 1e6) / 1e6 for x in grid]
    assert r.lam_star in ev and r.lam_star in g
    assert all(stub.acc(x) >= thresh - 1e-12 for x in ev if x <= r.lam_star)
    above = [x for x in g if x > r.lam_star]
    if above:
        nxt = above[0]
        assert any(r.lam_star < x <= nxt and stub.acc(x) < thresh for x in ev), "λ* is not bracketed"
    l0, l1 = stub.l0, stub.l1
    assert r.barrier == pytest.approx(max(stub.bump(x) for x in ev), abs=1e-12)
    assert r.lambdas.tolist() == ev


def test_monotone_accuracy_gives_the_grid_lam_star():
    for cross in (0.03, 0.2, 0.39, 0.5, 0.77, 0.96):
        acc = lambda x, c=cross: 0.9 - 2.0 * max(0.0, x - c)         # within tol up to c + 0.005
        stub = Stub(acc, lambda x: 0.4 * math.sin(math.pi * x))
        r = adaptive_search(stub, G25, tol=0.01)
        assert r.lam_star == pytest.approx(grid_lam_star(acc), abs=1e-9), cross
        check_invariants(stub, r)
        assert r.n_evals <= 12, (cross, stub.calls)


def test_everything_within_tol_gives_lam_star_one():
    stub = Stub(lambda x: 0.9 - 0.001 * x, lambda x: 0.1 * math.sin(math.pi * x))
    r = adaptive_search(stub, G25, tol=0.01)
    assert r.lam_star == 1.0
    check_invariants(stub, r)


def test_nonmonotone_dip_one_step_below_the_bracket_is_verified():
    # within tol except at the grid point 5/24 and past 0.26: the bracket closes at 6/24, and the
    # point just below it is evaluated before 6/24 is accepted; the grid's λ* is 4/24
    def acc(x):
        return 0.8 if abs(x - 5 / 24) < 1e-6 or x > 0.26 else 0.9
    stub = Stub(acc, lambda x: 0.2 * x * (1 - x))
    r = adaptive_search(stub, G25, tol=0.01)
    assert r.lam_star == pytest.approx(4 / 24, abs=1e-6) == grid_lam_star(acc)
    check_invariants(stub, r)


def test_nonmonotone_dip_wider_than_the_coarse_spacing_is_found():
    # out of tol on [0.3, 0.45] (holds the coarse point 1/3), back within tol until 0.8: the grid
    # stops before the dip, and so does the search, though the accuracy recovers after it
    acc = lambda x: 0.8 if 0.3 <= x <= 0.45 or x > 0.8 else 0.9
    stub = Stub(acc, lambda x: 0.3 * math.sin(math.pi * x) ** 2)
    r = adaptive_search(stub, G25, tol=0.01)
    assert r.lam_star == pytest.approx(grid_lam_star(acc)) == pytest.approx(7 / 24, abs=1e-6)
    check_invariants(stub, r)


@pytest.mark.parametrize("peak", [0.18, 1 / 3, 0.5, 0.62, 0.85])
def test_barrier_maximum_of_a_known_bump(peak):
    # g(λ) = h·(λ/p)^a·((1-λ)/(1-p))^b, maximum h at λ = a/(a+b) = p; a, b >= 2 keep it smooth
    # at the ends, as loss curves are
    h = 0.7
    a, b = (2.0 * peak / (1 - peak), 2.0) if peak >= 0.5 else (2.0, 2.0 * (1 - peak) / peak)
    bump = lambda x: 0.0 if x in (0.0, 1.0) else h * (x / peak) ** a * ((1 - x) / (1 - peak)) ** b
    stub = Stub(lambda x: 0.9, bump)
    r = adaptive_search(stub, G25, tol=0.01)
    assert r.barrier == pytest.approx(h, abs=2e-4)
    assert r.barrier <= h + 1e-12            # a value actually evaluated, never extrapolated
    check_invariants(stub, r)
    assert r.n_evals <= 10, stub.calls


def test_no_bump_barrier_is_zero_at_the_ends():
    stub = Stub(lambda x: 0.9, lambda x: -0.3 * x * (1 - x))     # convex: below the line everywhere
    r = adaptive_search(stub, G25, tol=0.01)
    assert r.barrier == 0.0
    # the first call shows there is nothing to refine; λ* = 1 is final once 23/24 is verified
    assert r.n_evals == 5 and 23 / 24 == pytest.approx(r.lambdas[-2].item(), abs=1e-6)


def test_batch_one_evaluates_one_lambda_per_call():
    acc = lambda x: 0.9 - 2.0 * max(0.0, x - 0.4)
    stub = Stub(acc, lambda x: 0.4 * math.sin(math.pi * x))
    r = adaptive_search(stub, G25, tol=0.01, batch=1)
    assert [len(c) for c in stub.calls[1:]] == [1] * (len(stub.calls) - 1)
    assert r.lam_star == pytest.approx(grid_lam_star(acc))
    check_invariants(stub, r, batch=1)


def test_bad_arguments_are_named():
    stub = Stub(lambda x: 0.9, lambda x: 0.0)
    with pytest.raises(ValueError, match="grid"):
        adaptive_search(stub, [0.0, 1.5])
    with pytest.raises(ValueError, match="batch"):
        adaptive_search(stub, G25, batch=0)
    base, target = trained_mlp((64,), 0), trained_mlp((32,), 1)
    d = digits()
    with pytest.raises(ValueError, match="search"):
        hm.sweep(base, target, None, data=(d.X_test, d.y_test), search="golden")
    with pytest.raises(ValueError, match="extrapolate"):
        hm.sweep(base, target, None, [0.0, 1.2], data=(d.X_test, d.y_test), search="adaptive", extrapolate=True)


# --- trained models against a plain-torch reference ----------------------------------------------

def plain_curve(base, target, res, lams, X, y):
    """hm.merge at each λ and a plain forward: loss and accuracy per λ (no hm.sweep code)."""
    loss, acc = [], []
    for lam in lams:
        m = hm.merge(base, target, res, lam=float(lam)).eval()
        with torch.no_grad():
            out = m(X)
        loss.append(F.cross_entropy(out, y).item())
        acc.append((out.argmax(-1) == y).float().mean().item())
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(acc, dtype=torch.float64)


PAIRS = [((128, 64), (64, 32), True), ((64,), (128,), True), ((64, 64), (32, 32), False),
         ((128, 64), (256, 128), True)]


@pytest.mark.parametrize("bw,tw,aligned", PAIRS)
def test_adaptive_matches_fine_grid_reference_with_fewer_evaluations(bw, tw, aligned):
    base, target = trained_mlp(bw, 0), trained_mlp(tw, 1)
    d = digits()
    X, y = d.X_test, d.y_test
    res = hm.align(base, target) if aligned else None
    rows = []

    def counting_ce(logits, yy):   # counts merged models evaluated: rows seen / samples per model
        rows.append(len(yy))
        return F.cross_entropy(logits, yy, reduction="none")

    a = hm.sweep(base, target, res, G25, data=(X, y), search="adaptive", loss_fn=counting_ce)
    n_models = sum(rows) / len(y)
    assert n_models == a.n_evals == a.lambdas.numel()

    l101, a101 = plain_curve(base, target, res, torch.linspace(0, 1, 101).tolist(), X, y)
    lam101 = torch.linspace(0, 1, 101, dtype=torch.float64)
    ref_barrier = float((l101 - ((1 - lam101) * l101[0] + lam101 * l101[-1])).max())
    assert a.barrier == pytest.approx(ref_barrier, abs=1e-3)

    g = (torch.round(G25 * 1e6) / 1e6).tolist()
    l25, a25 = plain_curve(base, target, res, g, X, y)
    ref_star = lam_star(torch.tensor(g, dtype=torch.float64), a25, float(a25[0]), 0.01)
    step = 1 / 24
    assert a.lam_star == pytest.approx(ref_star, abs=1e-9) or (
        ref_star - step - 1e-9 <= a.lam_star < ref_star), (a.lam_star, ref_star)

    # the curve holds the evaluated λ's, sorted, with the plain loop's numbers at them
    lp, ap = plain_curve(base, target, res, a.lambdas.tolist(), X, y)
    torch.testing.assert_close(a.loss.double(), lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.acc.double(), ap)
    assert a.lambdas.tolist() == sorted(a.lambdas.tolist()) and a.search == "adaptive"
    # several times fewer models than the 25-point grid (which counts 25 the same way)
    rows.clear()
    grid = hm.sweep(base, target, res, G25, data=(X, y), loss_fn=counting_ce)
    assert sum(rows) / len(y) == grid.n_evals == 25
    assert a.n_evals <= 12, a.timings


def test_adaptive_with_target_data_carries_target_curves():
    base, target = trained_mlp((64,), 0), trained_mlp((128,), 1)
    d = digits()
    res = hm.align(base, target)
    a = hm.sweep(base, target, res, data=(d.X_test, d.y_test), target_data=(d.X_test[:200], d.y_test[:200]),
                 search="adaptive")
    lp, ap = plain_curve(base, target, res, a.lambdas.tolist(), d.X_test[:200], d.y_test[:200])
    torch.testing.assert_close(a.target_loss.double(), lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.target_acc.double(), ap)
    lam = a.lambdas
    assert a.target_barrier == pytest.approx(float((lp - ((1 - lam) * lp[0] + lam * lp[-1])).max()), abs=1e-6)


def test_bump_next_to_an_end_below_every_coarse_point_is_found():
    # the loss dips below the line, then rises a little above it before λ = 1 (a curve seen on
    # digits: 64 <- 256 units): 1/3 and 2/3 are both below the line, the maximum sits near 0.88
    bump = lambda x: x * (1 - x) * (-0.3 + 0.4 * x)
    xs = torch.linspace(0, 1, 100001, dtype=torch.float64)
    true_max = float((xs * (1 - xs) * (-0.3 + 0.4 * xs)).max())
    assert bump(1 / 3) < 0 and bump(2 / 3) < 0 and true_max > 4e-3
    stub = Stub(lambda x: 0.9, bump)
    r = adaptive_search(stub, G25, tol=0.01)
    assert r.barrier == pytest.approx(true_max, abs=1e-4)
    check_invariants(stub, r)


def test_assemble_adaptive_takes_the_grids_lambda():
    # without target data hm.assemble takes the largest λ within tol below 1: the adaptive search
    # must land on the same grid point, from fewer evaluations
    d = digits()
    val, test = (d.X_test[:225], d.y_test[:225]), (d.X_test[225:], d.y_test[225:])
    zoo = {"a": trained_mlp((64,), 1), "b": trained_mlp((128, 32), 2)}
    base = trained_mlp((128, 64), 0)
    g = hm.assemble(base, zoo, data=val, eval_data=test, restarts=1)
    a = hm.assemble(base, zoo, data=val, eval_data=test, restarts=1, search="adaptive")
    assert [s.lam for s in a.report] == [s.lam for s in g.report]
    assert all(sa.curve.n_evals < sg.curve.n_evals for sa, sg in zip(a.report, g.report))
    for k, v in g.model.state_dict().items():
        torch.testing.assert_close(a.model.state_dict()[k], v)


def test_adaptive_with_bn_reestimation_equals_the_grid_at_its_lambdas():
    # each round's models get their BatchNorm statistics re-estimated exactly as the grid's do
    from helpers_models import trained_cnn
    d = digits(image=True)
    base, target = trained_cnn((8, 16), 0), trained_cnn((16, 8), 1)
    res = hm.align(base, target)
    kw = dict(data=(d.X_test, d.y_test), bn_data=(d.X_train[:256], d.y_train[:256]))
    a = hm.sweep(base, target, res, G25, search="adaptive", **kw)
    g = hm.sweep(base, target, res, a.lambdas, **kw)
    assert a.bn_reset and g.bn_reset
    torch.testing.assert_close(a.loss, g.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.acc, g.acc)
    assert a.barrier == pytest.approx(g.barrier, abs=1e-6)
