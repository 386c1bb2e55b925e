"""hm.assemble: iterative integration of a zoo into a base, on digits (base domain) and mirrored
digits (target domain)."""
import pytest
import torch

import hetmerge as hm
from hetmerge.assemble import pick_lam

from helpers_models import digits, flipped, same_state, state_copy, trained_mlp


def acc(model, X, y):
    with torch.no_grad():
        return (model(X).argmax(-1) == y).float().mean().item()


def test_assembly_transfers_within_tolerance():
    d = digits()
    base = trained_mlp((128, 64), 0)
    zoo = {"mirror64": trained_mlp((64, 32), 1, flip=True), "mirror96": trained_mlp((96, 64), 2, flip=True)}
    before = [state_copy(base)] + [state_copy(m) for m in zoo.values()]
    base_data = (d.X_test, d.y_test)
    target_data = (flipped(d.X_test), d.y_test)
    tol = 0.02
    out = hm.assemble(base, zoo, data=base_data, target_data=target_data, tol=tol, restarts=2)
    model, report = out
    assert [s.model for s in report] == ["mirror64", "mirror96"]
    for s in report:
        assert s.layer_map == {"fc0": "fc0", "fc1": "fc1", "head": "head"}
        assert s.after["base_acc"] >= s.before["base_acc"] - tol - 1e-9
        assert s.after["target_acc"] >= s.before["target_acc"]
        assert 0.0 <= s.lam <= 1.0 and s.time > 0
    # each step starts from the previous step's model
    assert report[1].before["base_acc"] == pytest.approx(report[0].after["base_acc"])
    # the report's numbers are the returned model's
    assert acc(model, *base_data) == pytest.approx(report[-1].after["base_acc"], abs=1e-6)
    assert acc(model, *target_data) == pytest.approx(report[-1].after["target_acc"], abs=1e-6)
    base_acc0 = acc(base, *base_data)
    assert acc(model, *base_data) >= base_acc0 - 2 * tol
    assert acc(model, *target_data) > acc(base, *target_data) + 0.02   # knowledge came in
    print("assembly:", [(s.model, s.lam, s.before, s.after) for s in report])
    assert all(same_state(m, s) for m, s in zip([base, *zoo.values()], before))
    assert model is not base


def test_assembly_without_target_data_uses_lam_star_and_custom_objective():
    d = digits()
    base = trained_mlp((64, 32), 0)
    zoo = [trained_mlp((64, 32), 3)]
    out = hm.assemble(base, zoo, data=(d.X_test, d.y_test), restarts=1)
    assert out.report[0].lam == out.report[0].lam_star and out.report[0].model == "0"
    first = hm.assemble(base, zoo, data=(d.X_test, d.y_test), restarts=1, objective=lambda c: 1)
    assert first.report[0].lam == pytest.approx(0.05)
    with pytest.raises(ValueError, match="zoo is empty"):
        hm.assemble(base, [], data=(d.X_test, d.y_test))
    with pytest.raises(KeyError, match="target_data: no entry for zoo model 'b'"):
        hm.assemble(base, {"b": zoo[0]}, data=(d.X_test, d.y_test), target_data={"a": None})


def test_pick_lam_prefers_target_accuracy_within_tolerance():
    from hetmerge.evaluate import SweepResult
    c = SweepResult(lambdas=torch.tensor([0.0, 0.5, 1.0]), loss=torch.zeros(3),
                    acc=torch.tensor([0.9, 0.895, 0.5]), barrier=0.0, lam_star=0.5,
                    target_loss=torch.tensor([2.0, 1.0, 0.1]), target_acc=torch.tensor([0.2, 0.6, 0.95]))
    assert pick_lam(c, 0.01) == 1
    assert pick_lam(c, 0.5) == 2
