"""Shared fixtures for the Python-layer tests: small models trained on offline digits (cached per
session) and a plain torch+scipy reference of weight matching for MLPs, written independently of
the library (bench/bench_align.py uses it too)."""
from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import scipy.optimize
import torch
import torch.nn as nn

from hetmerge import data as hd
from hetmerge import models as hmm



@contextlib.contextmanager
def one_thread():
    """Tiny models train faster on one thread on shared 2-core machines (more threads only add
    contention); restored afterwards so other tests see the process's settings."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def digits(image: bool = False):
    return hd.digits(seed=0, image=image)


@functools.lru_cache(maxsize=None)
def trained_mlp(widths: tuple, seed: int, epochs: int = 20, flip: bool = False) -> nn.Module:
    """MLP 64 -> widths -> 10 trained on digits (flip=True: on left-right mirrored digits)."""
    d = digits()
    X = flipped(d.X_train) if flip else d.X_train
    torch.manual_seed(seed)
    m = hmm.mlp(64, list(widths), 10)
    with one_thread():
        return hmm.train(m, X, d.y_train, epochs=epochs, lr=3e-3, batch_size=64, seed=seed)


@functools.lru_cache(maxsize=None)
def trained_cnn(channels: tuple, seed: int, epochs: int = 4) -> nn.Module:
    d = digits(image=True)
    torch.manual_seed(seed)
    m = hmm.cnn(1, list(channels), 10, (8, 8), bn=True)
    with one_thread():
        return hmm.train(m, d.X_train, d.y_train, epochs=epochs, lr=3e-3, batch_size=128, seed=seed)


def flipped(X: torch.Tensor) -> torch.Tensor:
    """The target domain of the assembly tests: digits mirrored left-right."""
    return X.view(-1, 8, 8).flip(-1).reshape(X.shape)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters (fresh ones are 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# Reference weight matching for plain MLPs (Linear stacks): torch + scipy, no hetmerge code.
# Same algorithm as hm.align(method="weight"): hidden layers solved in the order
# np.random.default_rng(seed).permutation(L - 1) each sweep, maps start by position, stop when a sweep
# gains less than tol (relative) or after max_iter sweeps; maps index target units (-1 = padding).
# ---------------------------------------------------------------------------------------------

def _pad_rows(W: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """W[src] with zero rows where src == -1 (materialized, as a plain implementation would)."""
    out = W[src.clamp(min=0)]
    return out * (src >= 0).to(W.dtype).view(-1, *([1] * (W.dim() - 1)))


def _pad_cols(W: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return _pad_rows(W.T, src).T


def mlp_layers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight.detach(), m.bias.detach()) for m in model.modules() if isinstance(m, nn.Linear)]


def ref_objective(la, lb, maps) -> float:
    total = 0.0
    L = len(la)
    for i, ((Wa, ba), (Wb, bb)) in enumerate(zip(la, lb)):
        rows = maps[i] if i < L - 1 else _position(Wa.shape[0], Wb.shape[0])
        cols = maps[i - 1] if i > 0 else _position(Wa.shape[1], Wb.shape[1])
        total += float((Wa * _pad_cols(_pad_rows(Wb, rows), cols)).sum())
        total += float((ba * _pad_rows(bb, rows)).sum())
    return total


def _position(n_a: int, n_b: int) -> torch.Tensor:
    m = torch.arange(n_a)
    m[n_b:] = -1
    return m


def ref_weight_matching(base: nn.Module, target: nn.Module, max_iter: int = 100, tol: float = 1e-9,
                        seed: int = 0):
    """Returns (maps per hidden layer, objective, seconds)."""
    t0 = time.perf_counter()
    la, lb = mlp_layers(base), mlp_layers(target)
    L = len(la)
    maps = [_position(la[i][0].shape[0], lb[i][0].shape[0]) for i in range(L - 1)]
    rng = np.random.default_rng(seed)
    obj = ref_objective(la, lb, maps)
    for _ in range(max_iter):
        for i in rng.permutation(L - 1):
            (Wa, ba), (Wb, bb) = la[i], lb[i]
            (Wn_a, _), (Wn_b, _) = la[i + 1], lb[i + 1]
            prev = maps[i - 1] if i > 0 else _position(Wa.shape[1], Wb.shape[1])
            nxt = maps[i + 1] if i + 1 < L - 1 else _position(Wn_a.shape[0], Wn_b.shape[0])
            C = Wa @ _pad_cols(Wb, prev).T + ba[:, None] * bb[None, :] + Wn_a.T @ _pad_rows(Wn_b, nxt)
            r, c = scipy.optimize.linear_sum_assignment(C.numpy(), maximize=True)
            new = torch.full((Wa.shape[0],), -1, dtype=torch.long)
            new[torch.from_numpy(r)] = torch.from_numpy(c).long()
            maps[i] = new
        new_obj = ref_objective(la, lb, maps)
        gain, obj = new_obj - obj, new_obj
        if gain <= tol * abs(obj):
            break
    return maps, obj, time.perf_counter() - t0


@functools.lru_cache(maxsize=None)
def mnist1d():
    return hd.mnist1d()


@functools.lru_cache(maxsize=None)
def trained_mnist1d_mlp(widths: tuple, seed: int, epochs: int = 15) -> nn.Module:
    d = mnist1d()
    torch.manual_seed(seed)
    m = hmm.mlp(40, list(widths), 10)
    with one_thread():
        return hmm.train(m, d.X_train, d.y_train, epochs=epochs, lr=3e-3, batch_size=128, seed=seed)
