"""hm.sweep: the batched sweep equals the obvious per-λ loop; barrier and λ* follow their
definitions; and the evidence on digits (450 test samples) that alignment pays off."""

import pytest
import torch
import torch.nn.functional as F

import hetmerge as hm
from hetmerge.evaluate import barrier, lam_star

from helpers_models import digits, trained_cnn, trained_mlp

LAMS = torch.linspace(0, 1, 11)


def loop_sweep(base, target, res, lambdas, X, y, bn_data=None):
    """The obvious loop: build the merged model and run it once per λ."""
    loss, acc = [], []
    for lam in lambdas.tolist():
        m = hm.merge(base, target, res, lam=lam).eval()
        if bn_data is not None:
            for mod in m.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            with torch.no_grad():
                m(bn_data[0])
            m.eval()
        with torch.no_grad():
            out = m(X)
        loss.append(F.cross_entropy(out, y).item())
        acc.append((out.argmax(-1) == y).float().mean().item())
    return torch.tensor(loss), torch.tensor(acc)


def test_batched_sweep_equals_loop():
    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    d = digits()
    res = hm.align(base, target)
    curve = hm.sweep(base, target, res, LAMS, data=(d.X_test, d.y_test))
    loss, acc = loop_sweep(base, target, res, LAMS, d.X_test, d.y_test)
    torch.testing.assert_close(curve.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(curve.acc, acc)
    assert curve.barrier == pytest.approx(barrier(LAMS, loss, float(loss[0]), float(loss[-1])), abs=1e-5)
    # chunked (one λ at a time) and batched data give the same numbers
    small = hm.sweep(base, target, res, LAMS, data=(d.X_test, d.y_test), max_chunk_bytes=1, batch_size=100)
    torch.testing.assert_close(small.loss, curve.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small.acc, curve.acc)
    # a DataLoader works too
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(d.X_test, d.y_test), batch_size=128)
    torch.testing.assert_close(hm.sweep(base, target, res, LAMS, data=dl).loss, curve.loss,
                               rtol=1e-5, atol=1e-6)


def test_unaligned_baseline_is_position_maps():
    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    d = digits()
    curve = hm.sweep(base, target, None, LAMS, data=(d.X_test, d.y_test))
    loss, _ = loop_sweep(base, target, None, LAMS, d.X_test, d.y_test)
    torch.testing.assert_close(curve.loss, loss, rtol=1e-5, atol=1e-6)


def test_barrier_and_lam_star_definitions():
    lams = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    loss = torch.tensor([1.0, 1.5, 2.0, 1.5, 2.0])
    assert barrier(lams, loss, 1.0, 2.0) == pytest.approx(0.5)      # at λ = 0.5: 2 - 1.5
    acc = torch.tensor([0.90, 0.895, 0.85, 0.9, 0.9])
    # λ = 0.75 is within tol again, but λ* is a threshold: everything up to it must stay within tol
    assert lam_star(lams, acc, 0.90, 0.01) == 0.25
    assert lam_star(lams, acc, 0.90, 0.10) == 1.0


def test_endpoints_are_evaluated_when_not_swept_and_target_domain():
    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    d = digits()
    res = hm.align(base, target)
    full = hm.sweep(base, target, res, LAMS, data=(d.X_test, d.y_test), target_data=(d.X_test[:200],
                                                                                     d.y_test[:200]))
    inner = hm.sweep(base, target, res, LAMS[1:-1], data=(d.X_test, d.y_test))
    assert inner.barrier == pytest.approx(full.barrier, abs=1e-6)   # the max is inside (0, 1) here
    assert full.target_acc.shape == (11,) and full.target_barrier is not None
    assert float(full.target_acc[-1]) == pytest.approx(
        (target(d.X_test[:200]).argmax(-1) == d.y_test[:200]).float().mean().item(), abs=0.02)


def test_batchnorm_reestimation_matches_loop():
    base, target = trained_cnn((8, 16), 0), trained_cnn((8, 8), 1)
    d = digits(image=True)
    res = hm.align(base, target)
    bn = (d.X_train[:256], d.y_train[:256])
    lams = torch.tensor([0.0, 0.5, 1.0])
    curve = hm.sweep(base, target, res, lams, data=(d.X_test, d.y_test), bn_data=bn)
    assert curve.bn_reset
    loss, acc = loop_sweep(base, target, res, lams, d.X_test, d.y_test, bn_data=bn)
    torch.testing.assert_close(curve.loss, loss, rtol=1e-4, atol=1e-5)
    plain = hm.sweep(base, target, res, lams, data=(d.X_test, d.y_test))
    assert not plain.bn_reset
    # interpolated statistics are wrong for the merged weights; re-estimated ones help mid-path
    assert float(curve.loss[1]) < float(plain.loss[1])


# ---- evidence on digits (450 test samples) ------------------------------------------------------

def test_alignment_halves_the_barrier_same_architecture():
    d = digits()
    data = (d.X_test, d.y_test)
    aligned, unaligned = [], []
    for s in range(3):
        base, target = trained_mlp((128, 64), 2 * s), trained_mlp((128, 64), 2 * s + 1)
        res = hm.align(base, target, restarts=2, seed=s)
        aligned.append(hm.sweep(base, target, res, LAMS, data=data).barrier)
        unaligned.append(hm.sweep(base, target, None, LAMS, data=data).barrier)
    a, u = sum(aligned) / 3, sum(unaligned) / 3
    print(f"mean barrier aligned {a:.3f} unaligned {u:.3f}")
    assert a < 0.5 * u


@pytest.mark.parametrize("widths", [((128,), (64,)), ((128, 64), (64, 32)), ((128, 64, 64), (64, 32))],
                         ids=["128v64", "128-64v64-32", "depth3v2"])
def test_heterogeneous_merge_keeps_base_accuracy(widths):
    d = digits()
    data = (d.X_test, d.y_test)
    base, target = trained_mlp(widths[0], 0), trained_mlp(widths[1], 1)
    res = hm.align(base, target, restarts=4)
    lams = torch.linspace(0, 1, 21)
    aligned = hm.sweep(base, target, res, lams, data=data)
    unaligned = hm.sweep(base, target, None, lams, data=data)
    print(f"{widths}: λ* aligned {aligned.lam_star:.2f} unaligned {unaligned.lam_star:.2f}; "
          f"acc(0) {aligned.acc[0]:.3f} acc(0.1) {aligned.acc[2]:.3f}; barrier {aligned.barrier:.3f} "
          f"vs {unaligned.barrier:.3f}")
    assert aligned.lam_star >= unaligned.lam_star
    assert float(aligned.acc[2]) >= float(aligned.acc[0]) - 0.02     # λ = 0.1 within 2 points


def test_mnist1d_depth4_heterogeneous_alignment_with_restarts():
    """MNIST-1D (1000 test sequences): a depth-4 base vs a narrower depth-4 target. Restarts keep the
    best objective, and the aligned merge beats the unaligned one on barrier and λ*."""
    from helpers_models import mnist1d, trained_mnist1d_mlp
    d = mnist1d()
    base, target = trained_mnist1d_mlp((128, 128, 128), 0), trained_mnist1d_mlp((64, 64, 96), 1)
    one = hm.align(base, target, seed=0)
    best = hm.align(base, target, seed=0, restarts=4)
    assert best.objective >= one.objective and best.restart_objectives[0] == one.objective
    lams = torch.linspace(0, 1, 11)
    aligned = hm.sweep(base, target, best, lams, data=(d.X_test, d.y_test))
    unaligned = hm.sweep(base, target, None, lams, data=(d.X_test, d.y_test))
    print(f"mnist1d: acc(0) {aligned.acc[0]:.3f} barrier aligned {aligned.barrier:.3f} unaligned "
          f"{unaligned.barrier:.3f}; λ* {aligned.lam_star:.2f} vs {unaligned.lam_star:.2f}; "
          f"restart objectives {[round(o, 2) for o in best.restart_objectives]}")
    assert aligned.barrier < unaligned.barrier
    assert aligned.lam_star >= unaligned.lam_star


def test_sweep_splits_batches_to_bound_activations_same_numbers():
    """The K-fold activations are evaluated in row blocks of at most max_act_bytes (the unsplit
    [K, N, width] forward ran slower than a per-λ loop); block size must not change the numbers."""
    from hetmerge.evaluate import _act_per_sample

    base, target = trained_mlp((128, 64), 0), trained_mlp((64, 32), 1)
    d = digits()
    res = hm.align(base, target)
    assert _act_per_sample(base, d.X_test[:1]) == 128           # widest layer output per sample
    whole = hm.sweep(base, target, res, LAMS, data=(d.X_test, d.y_test), max_act_bytes=1 << 40)
    rows1 = hm.sweep(base, target, res, LAMS, data=(d.X_test, d.y_test), max_act_bytes=1)
    loss, acc = loop_sweep(base, target, res, LAMS, d.X_test, d.y_test)
    for c in (whole, rows1):
        torch.testing.assert_close(c.loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.acc, acc)
