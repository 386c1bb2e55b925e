"""hm.assemble: iterative integration of a zoo into a base, on digits (base domain) and mirrored
digits (target domain). λ is chosen on a validation split and reported on a disjoint test split;
the numbers are checked against a plain-torch reference of the whole loop and against a planted
case whose optimum is known."""
import copy

import pytest
import torch
import torch.nn.functional as F

import hetmerge as hm
from hetmerge import models as hmm
from hetmerge.assemble import pick_lam

from helpers_models import digits, flipped, one_thread, same_state, state_copy, trained_mlp


def acc(model, X, y):
    with torch.no_grad():
        return (model(X).argmax(-1) == y).float().mean().item()


def _val_test():
    """The 450 held-out digits (never trained on by the fixtures), half to choose λ, half to report."""
    d = digits()
    return (d.X_test[:225], d.y_test[:225]), (d.X_test[225:], d.y_test[225:])


def _aligned_target_state(base_state, target, maps, depth):
    """The target's weights moved into the base's slots by the index maps, in plain torch:
    slot i of hidden layer l takes target unit maps[fc_l][i], zero where it is -1."""
    t = {k: v.detach() for k, v in target.state_dict().items()}

    def gather(w, idx, dim):
        picked = w.index_select(dim, idx.clamp(min=0))
        keep = (idx >= 0).to(w.dtype)
        return picked * (keep[:, None] if dim == 0 and w.dim() == 2 else keep if dim == 0 else keep[None, :])

    out = {}
    for l in range(depth):
        rows = maps[f"fc{l}"]
        w = gather(t[f"fc{l}.weight"], rows, 0)
        out[f"fc{l}.weight"] = gather(w, maps[f"fc{l - 1}"], 1) if l > 0 else w
        out[f"fc{l}.bias"] = gather(t[f"fc{l}.bias"], rows, 0)
    out["head.weight"] = gather(t["head.weight"], maps[f"fc{depth - 1}"], 1)
    out["head.bias"] = t["head.bias"]
    assert out.keys() == base_state.keys()
    return out


def _reference_assembly(base, zoo, val, tval, test, ttest, tol, lambdas, restarts, cap):
    """hm.assemble's loop written out: align (hm.align, tested on its own), then merge and evaluate
    every λ in plain torch, keep the best target accuracy among λ <= min(λ*, cap)."""
    model = copy.deepcopy(base)
    depth = sum(1 for n, _ in model.named_children() if n.startswith("fc"))
    out = []
    for name, m in zoo.items():
        cur = {k: v.detach().clone() for k, v in model.state_dict().items()}
        res = hm.align(model, m, restarts=restarts)
        T = _aligned_target_state(cur, m, res.maps, depth)
        rows = []
        for lam in lambdas.tolist():
            model.load_state_dict({k: (1 - lam) * cur[k] + lam * T[k] for k in cur})
            with torch.no_grad():
                lo, lt = model(val[0]), model(tval[0])
            rows.append((lam, (lo.argmax(-1) == val[1]).float().mean().item(),
                         (lt.argmax(-1) == tval[1]).float().mean().item(), F.cross_entropy(lt, tval[1]).item()))
        star = 0.0
        for lam, a, _, _ in rows:   # largest λ whose accuracy and every smaller λ's stay within tol
            if a < rows[0][1] - tol - 1e-12:
                break
            star = lam
        ok = [r for r in rows if r[0] <= min(star, cap)]
        lam, a, ta, _ = max(ok, key=lambda r: (r[2], -r[3], -r[0]))
        model.load_state_dict({k: (1 - lam) * cur[k] + lam * T[k] for k in cur})
        out.append({"model": name, "lam": lam, "val_acc": a, "val_target_acc": ta,
                    "test_acc": acc(model, *test), "test_target_acc": acc(model, *ttest)})
    return model, out


def test_assembly_matches_a_plain_torch_reference_chosen_on_validation_reported_on_test():
    val, test = _val_test()
    tval, ttest = (flipped(val[0]), val[1]), (flipped(test[0]), test[1])
    base = trained_mlp((128, 64), 0)
    zoo = {"mirror64": trained_mlp((64, 32), 1, flip=True), "mirror96": trained_mlp((96, 64), 2, flip=True)}
    before = [state_copy(base)] + [state_copy(m) for m in zoo.values()]
    tol, lambdas = 0.02, torch.linspace(0, 1, 21)
    model, report = hm.assemble(base, zoo, data=val, target_data=tval, eval_data=test, target_eval_data=ttest,
                                tol=tol, lambdas=lambdas, restarts=2)
    ref_model, ref = _reference_assembly(base, zoo, val, tval, test, ttest, tol, lambdas, 2, cap=0.95)
    print("assembly:", [(s.model, s.lam, s.after, s.eval_after) for s in report], "reference:", ref)
    assert [s.model for s in report] == [r["model"] for r in ref] == ["mirror64", "mirror96"]
    for s, r in zip(report, ref):
        assert s.layer_map == {"fc0": "fc0", "fc1": "fc1", "head": "head"}
        assert s.lam == pytest.approx(r["lam"], abs=1e-6) and 0 < s.lam < 1 and not s.replaced
        # selection metrics on the validation split, held-out metrics on the test split
        assert s.after["base_acc"] == pytest.approx(r["val_acc"], abs=1e-6)
        assert s.after["target_acc"] == pytest.approx(r["val_target_acc"], abs=1e-6)
        assert s.eval_after["base_acc"] == pytest.approx(r["test_acc"], abs=1e-6)
        assert s.eval_after["target_acc"] == pytest.approx(r["test_target_acc"], abs=1e-6)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # each step starts from the previous step's model, on both splits
    assert report[1].before["base_acc"] == pytest.approx(report[0].after["base_acc"])
    assert report[1].eval_before == pytest.approx(report[0].eval_after)
    assert report[0].eval_before["base_acc"] == pytest.approx(acc(base, *test))
    # knowledge came in, measured on the test split that did not choose λ
    assert report[-1].eval_after["target_acc"] > acc(base, *ttest) + 0.02
    assert all(same_state(m, s) for m, s in zip([base, *zoo.values()], before))
    assert model is not base


def _planted():
    """base: an MLP after 1 epoch; target: the same run trained 15 epochs more, hidden units then
    permuted by a planted permutation. The alignment optimum is the inverse permutation, and the
    best merge of the two is the straight line to the longer-trained model."""
    d = digits()
    torch.manual_seed(7)
    with one_thread():
        base = hmm.train(hmm.mlp(64, [48, 24], 10), d.X_train, d.y_train, epochs=1, lr=1e-3, seed=7)
        longer = hmm.train(copy.deepcopy(base), d.X_train, d.y_train, epochs=15, lr=3e-3, seed=8)
    g = torch.Generator().manual_seed(0)
    p0, p1 = torch.randperm(48, generator=g), torch.randperm(24, generator=g)
    s = {k: v.detach().clone() for k, v in longer.state_dict().items()}
    planted = copy.deepcopy(longer)
    planted.load_state_dict({"fc0.weight": s["fc0.weight"][p0], "fc0.bias": s["fc0.bias"][p0],
                             "fc1.weight": s["fc1.weight"][p1][:, p0], "fc1.bias": s["fc1.bias"][p1],
                             "head.weight": s["head.weight"][:, p1], "head.bias": s["head.bias"]})
    return base, longer, planted


def test_assembly_of_a_longer_trained_planted_copy_takes_a_positive_lam_below_one_and_gains():
    val, test = _val_test()
    base, longer, planted = _planted()
    X = val[0]
    torch.testing.assert_close(planted(X), longer(X), rtol=1e-5, atol=1e-5)   # same function
    gain_possible = acc(longer, *val) - acc(base, *val)
    assert gain_possible > 0.1, "setup: the longer run must be clearly better"
    lambdas = torch.linspace(0, 1, 21)
    model, (step,) = hm.assemble(base, {"longer": planted}, data=val, eval_data=test, tol=0.01,
                                 lambdas=lambdas, restarts=2)
    # the optimum is known: the planted permutation undone, λ = the largest below 1 (accuracy rises
    # along the line), i.e. 0.05·base + 0.95·longer in plain torch
    ref = copy.deepcopy(base)
    sb, sl = base.state_dict(), longer.state_dict()
    ref.load_state_dict({k: 0.05 * sb[k] + 0.95 * sl[k] for k in sb})
    assert step.lam == pytest.approx(0.95) and not step.replaced
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert step.after["base_acc"] == pytest.approx(acc(ref, *val), abs=1e-6)
    assert step.eval_after["base_acc"] == pytest.approx(acc(ref, *test), abs=1e-6)
    assert step.after["base_acc"] - step.before["base_acc"] >= 0.8 * gain_possible
    assert step.eval_after["base_acc"] - step.eval_before["base_acc"] >= 0.8 * (acc(longer, *test) - acc(base, *test))


def test_a_step_at_lam_one_is_a_replacement_only_when_allowed():
    val, test = _val_test()
    base, longer, planted = _planted()
    model, (step,) = hm.assemble(base, {"longer": planted}, data=val, eval_data=test, restarts=2,
                                 allow_replace=True)
    assert step.lam == 1.0 and step.replaced
    torch.testing.assert_close(model(test[0]), longer(test[0]), rtol=1e-5, atol=1e-5)   # it IS the target
    assert step.eval_after["base_acc"] == pytest.approx(acc(longer, *test), abs=1e-6)
    _, (capped,) = hm.assemble(base, {"longer": planted}, data=val, restarts=2, lam_max=0.5)
    assert capped.lam == pytest.approx(0.5) and not capped.replaced and capped.eval_after is None
    with pytest.raises(ValueError, match="objective: picked λ = 1.0 above lam_max"):
        hm.assemble(base, {"longer": planted}, data=val, restarts=1, objective=lambda c: len(c.lambdas) - 1)
    with pytest.raises(ValueError, match="lam_max: must be in"):
        hm.assemble(base, {"longer": planted}, data=val, lam_max=1.5)
    with pytest.raises(ValueError, match="eval_data: is the data λ is chosen on"):
        hm.assemble(base, {"longer": planted}, data=val, eval_data=val)
    with pytest.raises(ValueError, match="target_eval_data: needs eval_data"):
        hm.assemble(base, {"longer": planted}, data=val, target_eval_data=test)


def test_assembly_without_target_data_takes_the_largest_lam_within_tol_and_custom_objective():
    val, _ = _val_test()
    base = trained_mlp((64, 32), 0)
    zoo = [trained_mlp((64, 32), 3)]
    out = hm.assemble(base, zoo, data=val, restarts=1)
    assert out.report[0].lam == min(out.report[0].lam_star, 0.95) and out.report[0].model == "0"
    first = hm.assemble(base, zoo, data=val, restarts=1, objective=lambda c: 1)
    assert first.report[0].lam == pytest.approx(0.05)
    with pytest.raises(ValueError, match="zoo is empty"):
        hm.assemble(base, [], data=val)
    with pytest.raises(KeyError, match="target_data: no entry for zoo model 'b'"):
        hm.assemble(base, {"b": zoo[0]}, data=val, target_data={"a": None})


def test_pick_lam_prefers_target_accuracy_within_tolerance_and_below_the_cap():
    from hetmerge.evaluate import SweepResult
    c = SweepResult(lambdas=torch.tensor([0.0, 0.5, 1.0]), loss=torch.zeros(3),
                    acc=torch.tensor([0.9, 0.895, 0.5]), barrier=0.0, lam_star=0.5,
                    target_loss=torch.tensor([2.0, 1.0, 0.1]), target_acc=torch.tensor([0.2, 0.6, 0.95]))
    assert pick_lam(c, 0.01) == 1
    assert pick_lam(c, 0.5) == 2
    assert pick_lam(c, 0.5, lam_max=0.5) == 1
    assert pick_lam(c, 0.5, lam_max=0.2) == 0
