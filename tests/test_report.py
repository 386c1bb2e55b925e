"""The demo's evidence: strict JSON, the barrier tally (worse pairs counted and named), the λ = 1
endpoint compared with the target model itself, and the data splits' validation part."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hetmerge as hm
from hetmerge import data as hd
from hetmerge import report as R
from hetmerge.demo import _counts, _eval_pair, barrier_counts
from hetmerge.zoo import ZooModel, zoo_layer_map

from helpers_models import digits, trained_mlp


def _strict_load(text):
    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_strict_json_with_null_for_nan_and_infinity(tmp_path):
    doc = {"nan": float("nan"), "inf": float("-inf"), "t": torch.tensor([1.0, float("inf")]),
           "np": np.float32("nan"), "arr": np.array([0.5, np.nan]), "ok": 1.25, "n": 3, "s": "x"}
    R.write_json(doc, tmp_path / "r.json")
    back = _strict_load((tmp_path / "r.json").read_text())
    assert back == {"nan": None, "inf": None, "t": [1.0, None], "np": None, "arr": [0.5, None], "ok": 1.25,
                    "n": 3, "s": "x"}
    json.dumps(R.to_jsonable(doc), allow_nan=False)   # raises on NaN/Infinity


def test_barrier_counts_name_the_pairs_alignment_made_worse():
    res = {("64x2", "64x2"): (1.2, 0.1), ("64x4", "64x4"): (1.35, 1.67), ("64x2", "64x4"): (0.0, 0.0),
           ("64x4", "64x2"): (0.5, 0.2), ("32x2", "64x4"): (0.0, 2.5e-5)}
    results = {k: {"unaligned": {"barrier": u}, "aligned": {"barrier": a}} for k, (u, a) in res.items()}
    c = barrier_counts(results)
    # independent tally
    assert c["pairs_aligned_lower"] == sum(a < u for u, a in res.values()) == 2
    assert c["pairs_equal"] == 1 and c["pairs_aligned_worse"] == 2 and c["pairs"] == 5
    assert _counts(c) == ("aligned lower in 2/5 pairs, equal in 1, worse in 2: 64x4<-64x4 (1.350 -> 1.670), "
                          "32x2<-64x4 (0 -> 2.5e-05)")


def _zm(widths, seed):
    m = trained_mlp(tuple(widths), seed)
    return ZooModel(f"digits/{widths}/s{seed}", "digits", "x".join(map(str, widths)), list(widths), seed, m)


@pytest.mark.parametrize("target_widths,is_target", [((64, 32), True), ((64, 32, 32), False), ((160, 32), False)])
def test_lam_one_is_compared_with_the_target_model_itself(target_widths, is_target):
    """λ = 1 reproduces the target only when the target is no wider and equally deep; the pair report
    says which, next to the target's own test loss computed here in plain torch."""
    d = digits()
    test = (d.X_test, d.y_test)
    b, t = _zm((128, 64), 0), _zm(target_widths, 1)
    r = _eval_pair(hm, b, t, test, torch.linspace(0, 1, 3), restarts=1, seed=0, tol=0.01)
    with torch.no_grad():
        own = F.cross_entropy(t.model(d.X_test), d.y_test).item()
    assert r["target_loss"] == pytest.approx(own, rel=1e-6)
    assert r["lam1_is_target"] is is_target
    assert (r["lam1_loss"] == pytest.approx(own, rel=1e-4)) is is_target
    assert zoo_layer_map(b.widths, t.widths).get("head") == ("head" if len(target_widths) == 2 else None)
    # the objective is reported in the trace's unit (cosine): it is the largest value of the trace
    assert r["aligned"]["objective"] == pytest.approx(max(r["aligned"]["trace"]), rel=1e-6)
    assert -1.0 <= r["aligned"]["objective"] <= 1.0


def test_splits_hold_out_a_disjoint_validation_part_with_a_fixed_seed():
    full, s = hd.digits(), hd.digits(val_size=300)
    assert len(s.y_val) == 300 and len(s.y_train) == len(full.y_train) - 300
    torch.testing.assert_close(s.X_test, full.X_test)
    # train and val partition the old training set (rows are unique digits images)
    rows = lambda X: {tuple(x) for x in X.tolist()}   # noqa: E731
    assert rows(s.X_train) | rows(s.X_val) == rows(full.X_train)
    assert not rows(s.X_train) & rows(s.X_val) and not rows(s.X_val) & rows(s.X_test)
    again = hd.digits(val_size=300)
    assert torch.equal(again.X_val, s.X_val)   # fixed seed
    Xtr, ytr, Xte, yte = s                       # still unpacks as (train, test)
    assert torch.equal(Xtr, s.X_train) and len(full.y_val) == 0
    with pytest.raises(ValueError, match="val_size"):
        hd.digits(val_size=5000)
    assert math.isclose(len(hd.digits(val_size=300, image=True).X_val[0].flatten()), 64)
