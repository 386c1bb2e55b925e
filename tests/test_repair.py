"""REPAIR (hetmerge.repair, hm.merge(repair=), hm.sweep(repair=), --repair): after the repair every
paired hidden unit's pre-activation on the data has the interpolated mean and std of the two ends'.
Statistics here are measured with plain forward hooks written in this file, and the repaired
weights of a small MLP are checked against a closed-form numpy computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetmerge as hm
from hetmerge import models
from hetmerge.alignment import Alignment, prepare
from hetmerge.checkpoint import load_state, save_state
from hetmerge.cli import EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_OK, EXIT_USAGE
from hetmerge.repair import RepairError, Repairer
from test_cli_pairing import run   # the CLI in-process: exit code, stdout, stderr, no traceback


# ---------------------------------------------------------------------------------------------
# an independent reference: per-unit population mean/std of module outputs, by plain hooks
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def ref_stats(model, paths, X):
    """{path: (mean, std)} float64 over all samples (and spatial positions for [N, C, ...] outputs)."""
    outs, mods = {}, dict(model.named_modules())
    hs = [mods[p].register_forward_hook(lambda m, i, o, p=p: outs.__setitem__(p, o.detach().double()))
          for p in paths]
    try:
        model.eval()(X)
    finally:
        for h in hs:
            h.remove()
    res = {}
    for p, o in outs.items():
        z = o.transpose(0, 1).reshape(o.shape[1], -1)     # [units, samples·positions]
        res[p] = (z.mean(1), z.std(1, unbiased=False))
    return res


def aligned_target_stats(tstats, src):
    """Target statistics in base slots; padding (-1) is a zero unit."""
    mean, std = tstats
    ok = src >= 0
    return (torch.where(ok, mean[src.clamp(min=0)], torch.zeros(())),
            torch.where(ok, std[src.clamp(min=0)], torch.zeros(())))


def check_postcondition(base, target, res, merged, lam, X, pairs, link_of, rtol=1e-7):
    """pairs: [(base path, target path)] of hidden layers; link_of: base path -> link name."""
    sb = ref_stats(base, [b for b, _ in pairs], X)
    st = ref_stats(target, [t for _, t in pairs], X)
    sm = ref_stats(merged, [b for b, _ in pairs], X)
    for b, t in pairs:
        x = lam[b] if isinstance(lam, dict) else lam
        mt, sdt = aligned_target_stats(st[t], res.maps[link_of[b]])
        goal_m = (1 - x) * sb[b][0] + x * mt
        goal_s = (1 - x) * sb[b][1] + x * sdt
        m, s = sm[b]
        live = s > 1e-9
        assert live.any()
        scale = float(goal_s.max())
        torch.testing.assert_close(m[live], goal_m[live], rtol=rtol, atol=rtol * scale)
        torch.testing.assert_close(s[live], goal_s[live], rtol=rtol, atol=rtol * scale)


def mlp64(widths, seed, in_dim=6, out_dim=3):
    torch.manual_seed(seed)
    return models.mlp(in_dim, widths, out_dim).double().eval()


# ---------------------------------------------------------------------------------------------
# the postcondition
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.3, 0.5, 0.8])
def test_repaired_mlp_units_have_interpolated_statistics(lam):
    # different widths both ways (a size-incompatible layer: padding and dropped units)
    base, target = mlp64([12, 7], 0), mlp64([9, 10], 1)
    X = torch.randn(300, 6, dtype=torch.float64)
    res = hm.align(base, target)
    assert any(bool((m < 0).any()) for m in res.maps.values())   # padding is exercised
    merged = hm.merge(base, target, res, lam, repair=X)
    check_postcondition(base, target, res, merged, lam, X, [("fc0", "fc0"), ("fc1", "fc1")],
                        {"fc0": "fc0", "fc1": "fc1"})
    # the unrepaired merge does not satisfy it (the collapse REPAIR is about)
    plain = hm.merge(base, target, res, lam)
    with pytest.raises(AssertionError):
        check_postcondition(base, target, res, plain, lam, X, [("fc0", "fc0"), ("fc1", "fc1")],
                            {"fc0": "fc0", "fc1": "fc1"})


def test_per_layer_lambda_goals():
    base, target = mlp64([12, 9], 23), mlp64([12, 9], 24)
    X = torch.randn(150, 6, dtype=torch.float64)
    res = hm.align(base, target)
    lam = {"fc0": 0.2, "fc1": 0.7}
    merged = hm.merge(base, target, res, lam, repair=X)
    check_postcondition(base, target, res, merged, lam, X, [("fc0", "fc0"), ("fc1", "fc1")],
                        {"fc0": "fc0", "fc1": "fc1"})


def test_batches_give_the_statistics_of_the_whole_data():
    # an iterable of unequal batches with shifted means: pooled statistics, not an average of per-batch ones
    base, target = mlp64([8, 8], 2), mlp64([8, 8], 3)
    X = torch.cat([torch.randn(100, 6, dtype=torch.float64), 3 + torch.randn(37, 6, dtype=torch.float64)])
    res = hm.align(base, target)
    whole = hm.merge(base, target, res, 0.5, repair=X)
    batched = hm.merge(base, target, res, 0.5, repair=[X[:50], (X[50:100], None), X[100:]])
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[k], v, rtol=1e-10, atol=1e-12)
    with_labels = hm.merge(base, target, res, 0.5, repair=(X, torch.zeros(len(X), dtype=torch.long)))
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(with_labels.state_dict()[k], v, rtol=0, atol=0)


def test_residual_mlp_each_layer_output_is_repaired():
    # the residual stream is one group shared by the stem and each block's last Linear: each of those
    # layers' own outputs gets the goal (not the sum h + block(h))
    torch.manual_seed(22)
    base, target = (models.res_mlp(6, 10, 2, 3, hidden=7).double().eval() for _ in range(2))
    X = torch.randn(200, 6, dtype=torch.float64)
    res = hm.align(base, target)
    merged = hm.merge(base, target, res, 0.5, repair=X)
    layers = ["stem", "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    check_postcondition(base, target, res, merged, 0.5, X, [(n, n) for n in layers],
                        {"stem": "stem", "blocks.0.0": "blocks.0.0", "blocks.0.2": "stem",
                         "blocks.1.0": "blocks.1.0", "blocks.1.2": "stem"})


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_repair_is_a_noop_at_the_ends(lam):
    base, target = mlp64([10, 10], 4), mlp64([10, 10], 5)
    X = torch.randn(200, 6, dtype=torch.float64)
    res = hm.align(base, target)
    plain, fixed = hm.merge(base, target, res, lam), hm.merge(base, target, res, lam, repair=X)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(fixed.state_dict()[k], v, rtol=1e-12, atol=1e-12)


def test_float32_model_postcondition():
    base, target = (m.float() for m in (mlp64([16, 16], 6), mlp64([16, 16], 7)))
    X = torch.randn(500, 6)
    res = hm.align(base, target)
    merged = hm.merge(base, target, res, 0.5, repair=X)
    check_postcondition(base, target, res, merged, 0.5, X, [("fc0", "fc0"), ("fc1", "fc1")],
                        {"fc0": "fc0", "fc1": "fc1"}, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# closed form (numpy): two hidden layers, corrected in order
# ---------------------------------------------------------------------------------------------

def test_repaired_weights_match_numpy_closed_form():
    base, target = mlp64([5, 4], 8, in_dim=3, out_dim=2), mlp64([5, 4], 9, in_dim=3, out_dim=2)
    X = torch.randn(64, 3, dtype=torch.float64)
    pairing = prepare(base, target)[0]
    p0, p1 = np.array([3, 0, 4, 1, 2]), np.array([1, 3, 0, 2])
    maps = {n: torch.arange(l.n_a) for n, l in pairing.links.items()}
    maps["fc0"], maps["fc1"] = torch.as_tensor(p0), torch.as_tensor(p1)
    res = Alignment(pairing, maps)
    lam = 0.4
    got = hm.merge(base, target, res, lam, repair=X).state_dict()

    A = {k: v.numpy() for k, v in base.state_dict().items()}
    B = {k: v.numpy() for k, v in target.state_dict().items()}
    x = X.numpy()
    # the aligned target: rows of fc0 by p0, fc1 rows by p1 and columns by p0, head columns by p1
    Bt = {"fc0.weight": B["fc0.weight"][p0], "fc0.bias": B["fc0.bias"][p0],
          "fc1.weight": B["fc1.weight"][p1][:, p0], "fc1.bias": B["fc1.bias"][p1],
          "head.weight": B["head.weight"][:, p1], "head.bias": B["head.bias"]}
    M = {k: (1 - lam) * A[k] + lam * Bt[k] for k in A}
    relu = lambda z: np.maximum(z, 0)   # noqa: E731
    za0, zb0 = x @ A["fc0.weight"].T + A["fc0.bias"], x @ Bt["fc0.weight"].T + Bt["fc0.bias"]
    za1 = relu(za0) @ A["fc1.weight"].T + A["fc1.bias"]
    zb1 = relu(zb0) @ Bt["fc1.weight"].T + Bt["fc1.bias"]
    want = dict(M)
    h = x
    for layer, za, zb in (("fc0", za0, zb0), ("fc1", za1, zb1)):
        w, b = want[f"{layer}.weight"], want[f"{layer}.bias"]
        zm = h @ w.T + b                                       # after the layers before were corrected
        goal_m = (1 - lam) * za.mean(0) + lam * zb.mean(0)
        goal_s = (1 - lam) * za.std(0) + lam * zb.std(0)
        s = goal_s / zm.std(0)
        want[f"{layer}.weight"] = w * s[:, None]
        want[f"{layer}.bias"] = (b - zm.mean(0)) * s + goal_m
        h = relu(h @ want[f"{layer}.weight"].T + want[f"{layer}.bias"])
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_constant_unit_is_only_shifted():
    # a merged unit with zero weights is constant on X: it is moved to mean_goal, its weights stay 0
    base, target = mlp64([6, 6], 10), mlp64([6, 6], 11)
    with torch.no_grad():
        base.fc0.weight[2] = 0
        target.fc0.weight[2] = 0
    res = Alignment(prepare(base, target)[0], {n: torch.arange(l.n_a) for n, l in
                                                prepare(base, target)[0].links.items()})
    X = torch.randn(100, 6, dtype=torch.float64)
    m = hm.merge(base, target, res, 0.5, repair=X)
    assert torch.equal(m.fc0.weight[2], torch.zeros(6, dtype=torch.float64))
    goal = 0.5 * (base.fc0.bias[2] + target.fc0.bias[2])
    torch.testing.assert_close(m.fc0.bias[2], goal)


# ---------------------------------------------------------------------------------------------
# CNNs: per-channel statistics; BatchNorm
# ---------------------------------------------------------------------------------------------

def small_cnn(channels, seed, bn):
    torch.manual_seed(seed)
    return models.cnn(1, channels, 4, [6, 6], bn=bn).double().eval()


def test_cnn_per_channel_postcondition():
    base, target = small_cnn([4, 6], 12, False), small_cnn([6, 5], 13, False)
    X = torch.randn(40, 1, 6, 6, dtype=torch.float64)
    res = hm.align(base, target)
    merged = hm.merge(base, target, res, 0.5, repair=X)
    check_postcondition(base, target, res, merged, 0.5, X, [("conv0", "conv0"), ("conv1", "conv1")],
                        {"conv0": "conv0", "conv1": "conv1"})


def _with_random_bn(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(0.5 + torch.rand(mod.num_features, generator=g, dtype=torch.float64))
                mod.bias.copy_(torch.randn(mod.num_features, generator=g, dtype=torch.float64))
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g, dtype=torch.float64))
                mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g, dtype=torch.float64))
    return m


def test_cnn_batchnorm_running_statistics_are_reset_on_the_data():
    base, target = _with_random_bn(small_cnn([4, 6], 14, True), 0), _with_random_bn(small_cnn([4, 6], 15, True), 1)
    X = torch.randn(30, 1, 6, 6, dtype=torch.float64)
    res = hm.align(base, target)
    merged = hm.merge(base, target, res, 0.5, repair=X)
    plain = hm.merge(base, target, res, 0.5)
    # conv weights untouched; every BatchNorm's running stats = population stats of its conv on X,
    # measured with the earlier BatchNorms already reset
    for k in ("conv0.weight", "conv0.bias", "conv1.weight", "bn0.weight", "bn1.bias"):
        assert torch.equal(merged.state_dict()[k], plain.state_dict()[k]), k
    s = ref_stats(merged, ["conv0", "conv1", "bn0", "bn1"], X)
    for conv, bn in (("conv0", "bn0"), ("conv1", "bn1")):
        mean, std = s[conv]
        torch.testing.assert_close(merged.get_submodule(bn).running_mean, mean)
        torch.testing.assert_close(merged.get_submodule(bn).running_var, std ** 2)
        b = merged.get_submodule(bn)
        torch.testing.assert_close(s[bn][0], b.bias.detach())   # BatchNorm output: mean β on X
        torch.testing.assert_close(s[bn][1], b.weight.detach().abs() * std / (std ** 2 + b.eps).sqrt())


def test_cnn_batchnorm_repair_mode_corrects_the_batchnorm_output():
    base, target = _with_random_bn(small_cnn([4, 6], 16, True), 2), _with_random_bn(small_cnn([6, 4], 17, True), 3)
    X = torch.randn(30, 1, 6, 6, dtype=torch.float64)
    res = hm.align(base, target)
    plain = hm.merge(base, target, res, 0.6)
    merged = hm.repair(plain, base, target, res, 0.6, X, bn="repair")
    check_postcondition(base, target, res, merged, 0.6, X, [("bn0", "bn0"), ("bn1", "bn1")],
                        {"bn0": "conv0", "bn1": "conv1"})
    for lam in (0.0, 1.0) if base.conv0.out_channels == target.conv0.out_channels else (0.0,):
        p = hm.merge(base, target, res, lam)
        r = hm.repair(p, base, target, res, lam, X, bn="repair")
        for k, v in p.state_dict().items():
            torch.testing.assert_close(r.state_dict()[k], v, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------

def test_sweep_with_repair_equals_repaired_merges():
    base, target = mlp64([10, 8], 18), mlp64([8, 12], 19)
    g = torch.Generator().manual_seed(0)
    Xr = torch.randn(120, 6, generator=g, dtype=torch.float64)
    X, y = torch.randn(90, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (90,), generator=g)
    res = hm.align(base, target)
    lams = [0.0, 0.25, 0.5, 1.0]
    curve = hm.sweep(base, target, res, lams, data=(X, y), target_data=(X[:40], y[:40]), repair=Xr,
                     batch_size=32)
    assert curve.repaired
    for i, lam in enumerate(lams):
        m = hm.merge(base, target, res, lam, repair=Xr)
        with torch.no_grad():
            logits = m(X)
        assert abs(float(curve.loss[i]) - float(F.cross_entropy(logits, y))) < 1e-5
        assert abs(float(curve.acc[i]) - float((logits.argmax(1) == y).double().mean())) < 1e-6
        assert abs(float(curve.target_acc[i]) - float((logits[:40].argmax(1) == y[:40]).double().mean())) < 1e-6
    # the adaptive search repairs every λ it evaluates too: its points equal the repaired merges
    found = hm.sweep(base, target, res, data=(X, y), repair=Xr, search="adaptive", batch_size=32)
    assert found.repaired and found.search == "adaptive"
    for lam, loss in zip(found.lambdas.tolist(), found.loss.tolist()):
        with torch.no_grad():
            want = float(F.cross_entropy(hm.merge(base, target, res, lam, repair=Xr)(X), y))
        assert abs(loss - want) < 1e-5, lam
    # the un-repaired path is the batched one, unchanged
    assert not hm.sweep(base, target, res, lams, data=(X, y)).repaired
    with pytest.raises(ValueError, match="repair= or bn_data="):
        hm.sweep(base, target, res, lams, data=(X, y), repair=Xr, bn_data=(X, y))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_repair_data_is_refused_naming_the_argument():
    base, target = mlp64([8], 20), mlp64([8], 21)
    res = hm.align(base, target)
    with pytest.raises(RepairError, match=r"repair: batch 0 of shape \(10, 5\) does not fit"):
        hm.merge(base, target, res, 0.5, repair=torch.randn(10, 5, dtype=torch.float64))
    with pytest.raises(RepairError, match="repair: the data holds no samples"):
        hm.merge(base, target, res, 0.5, repair=torch.zeros(0, 6, dtype=torch.float64))
    with pytest.raises(RepairError, match="no samples"):
        hm.merge(base, target, res, 0.5, repair=[])
    with pytest.raises(TypeError, match="repair: expected a tensor"):
        hm.merge(base, target, res, 0.5, repair="digits")
    with pytest.raises(TypeError, match="repair: batch 0 is not a floating-point tensor"):
        hm.merge(base, target, res, 0.5, repair=torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(RepairError, match="not finite"):
        hm.merge(base, target, res, 0.5, repair=torch.full((4, 6), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="bn: expected"):
        Repairer(base, target, res, torch.randn(4, 6, dtype=torch.float64), bn="fold")


def test_repair_without_hidden_layers_is_refused():
    torch.manual_seed(0)
    base, target = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(RepairError, match="repair: the models have no paired hidden layer"):
        hm.merge(base, target, None, 0.5, repair=torch.randn(5, 4))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def ckpts(tmp_path):
    torch.manual_seed(0)
    a, b = models.mlp(64, [16, 12], 10), models.mlp(64, [12, 16], 10)
    save_state(a.state_dict(), tmp_path / "a.safetensors")
    save_state(b.state_dict(), tmp_path / "b.safetensors")
    return tmp_path, a.eval(), b.eval()


def test_cli_merge_repair_matches_the_library(ckpts, capsys):
    d, a, b = ckpts
    assert run(capsys, "align", d / "a.safetensors", d / "b.safetensors", "-o", d / "al.json", "-q")[0] == EXIT_OK
    code, out, _ = run(capsys, "merge", d / "a.safetensors", d / "b.safetensors", "--alignment", d / "al.json",
                       "--lam", "0.4", "--repair", "digits", "-o", d / "m.safetensors")
    assert code == EXIT_OK and "REPAIRed on digits" in out
    res = Alignment.load(d / "al.json", base=a, target=b)
    X = hm.data.digits().X_train   # --repair digits: the training part
    want = hm.merge(a, b, res, 0.4, repair=X).state_dict()
    got = load_state(d / "m.safetensors")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got["fc0.weight"], hm.merge(a, b, res, 0.4).state_dict()["fc0.weight"])


def test_cli_sweep_repair(ckpts, capsys):
    d, a, b = ckpts
    code, out, _ = run(capsys, "sweep", d / "a.safetensors", d / "b.safetensors", "--data", "digits",
                       "--repair", "digits", "--lambdas", "0,0.5,1", "-o", d / "sw", "-q")
    assert code == EXIT_OK
    doc = json.loads((d / "sw" / "sweep.json").read_text())
    assert doc["repair"] == "digits"
    Xte, yte = hm.data.digits().test
    Xtr = hm.data.digits().X_train
    res = hm.align(a, b)
    m = hm.merge(a, b, res, 0.5, repair=Xtr)
    assert abs(doc["aligned"]["acc"][1] - models.accuracy(m, Xte, yte)) < 1e-6


def test_cli_rejects_bad_repair_data(ckpts, capsys):
    d, a, b = ckpts
    args = ["merge", d / "a.safetensors", d / "b.safetensors", "-o", d / "m.safetensors", "-q"]
    code, _, err = run(capsys, *args, "--repair", "cifar")
    assert code == EXIT_USAGE and "repair" in err
    code, _, err = run(capsys, *args, "--repair", d / "absent.npz")
    assert code == EXIT_FILE and "absent.npz" in err
    np.savez(d / "wide.npz", X=np.zeros((5, 30), np.float32), y=np.zeros(5, np.int64))
    code, _, err = run(capsys, *args, "--repair", d / "wide.npz")
    assert code == EXIT_INCOMPATIBLE and "repair" in err and "30 features" in err
    np.savez(d / "empty.npz", X=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64))
    code, _, err = run(capsys, *args, "--repair", d / "empty.npz")
    assert code == EXIT_INCOMPATIBLE and "repair: the data holds no samples" in err
    assert not (d / "m.safetensors").exists()


def test_repair_data_reads_the_training_part(tmp_path):
    from hetmerge.data import load_eval_data
    model = models.mlp(4, [3], 2)
    np.savez(tmp_path / "d.npz", X_train=np.ones((3, 4), np.float32), y_train=np.zeros(3, np.int64),
             X_test=np.zeros((2, 4), np.float32), y_test=np.zeros(2, np.int64))
    X, _ = load_eval_data(str(tmp_path / "d.npz"), model, "cpu", "repair", split="train")
    assert X.shape == (3, 4) and bool((X == 1).all())
    X, _ = load_eval_data(str(tmp_path / "d.npz"), model, "cpu")
    assert X.shape == (2, 4)
    Xd, _ = load_eval_data("digits", models.mlp(64, [3], 10), "cpu", "repair", split="train")
    torch.testing.assert_close(Xd, hm.data.digits().X_train)
    with pytest.raises(ValueError, match="split"):
        load_eval_data("digits", model, "cpu", split="val")
