"""Offline datasets for tests and demos: scikit-learn's bundled digits and MNIST-1D (generated
procedurally from its templates by the `mnist1d` package). Nothing is downloaded."""
from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["digits", "mnist1d", "Split"]


class Split(tuple):
    """(X_train, y_train, X_test, y_test) with attribute access."""
    __slots__ = ()

    def __new__(cls, Xtr, ytr, Xte, yte):
        return super().__new__(cls, (Xtr, ytr, Xte, yte))

    X_train = property(lambda s: s[0])
    y_train = property(lambda s: s[1])
    X_test = property(lambda s: s[2])
    y_test = property(lambda s: s[3])


@functools.lru_cache(maxsize=4)
def _digits_np(seed: int, test_size: int):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    X = X[perm].astype(np.float32) / 16.0   # pixel values are 0..16
    y = y[perm].astype(np.int64)
    return X[test_size:], y[test_size:], X[:test_size], y[:test_size]


def digits(seed: int = 0, test_size: int = 450, image: bool = False) -> Split:
    """sklearn digits (1797 8×8 images, 10 classes), shuffled with `seed`; test set of `test_size`.

    X: [N, 64] float32 in [0, 1], or [N, 1, 8, 8] when image=True; y: [N] int64.
    """
    Xtr, ytr, Xte, yte = (torch.from_numpy(a) for a in _digits_np(seed, test_size))
    if image:
        Xtr, Xte = Xtr.view(-1, 1, 8, 8), Xte.view(-1, 1, 8, 8)
    return Split(Xtr, ytr, Xte, yte)


@functools.lru_cache(maxsize=2)
def _mnist1d_np(seed: int):
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)   # ~3 s: generated from templates, no download
    return (d["x"].astype(np.float32), d["y"].astype(np.int64),
            d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))


def mnist1d(seed: int = 42, channels: bool = False) -> Split:
    """MNIST-1D (4000 train / 1000 test sequences of length 40, 10 classes).

    X: [N, 40] float32, or [N, 1, 40] when channels=True (for Conv1d); y: [N] int64.
    """
    Xtr, ytr, Xte, yte = (torch.from_numpy(a) for a in _mnist1d_np(seed))
    if channels:
        Xtr, Xte = Xtr[:, None], Xte[:, None]
    return Split(Xtr, ytr, Xte, yte)
