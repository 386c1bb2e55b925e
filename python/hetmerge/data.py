"""Offline datasets for tests and demos: scikit-learn's bundled digits and MNIST-1D (generated
procedurally from its templates by the `mnist1d` package). Nothing is downloaded."""
from __future__ import annotations

import functools

from pathlib import Path

import numpy as np
import torch

__all__ = ["digits", "mnist1d", "Split"]


class Split(tuple):
    """(X_train, y_train, X_test, y_test) with attribute access, plus a validation part X_val, y_val
    (held out from training, disjoint from the test set; empty when val_size=0). It unpacks as the
    4-tuple so that code written before the validation part existed keeps working; choose
    hyperparameters (such as the merging factor λ) on the validation part and report on the test set."""

    def __new__(cls, Xtr, ytr, Xte, yte, Xval=None, yval=None):
        self = super().__new__(cls, (Xtr, ytr, Xte, yte))
        self.X_val = Xtr[:0] if Xval is None else Xval
        self.y_val = ytr[:0] if yval is None else yval
        return self

    X_train = property(lambda s: s[0])
    y_train = property(lambda s: s[1])
    X_test = property(lambda s: s[2])
    y_test = property(lambda s: s[3])

    @property
    def val(self):
        return self.X_val, self.y_val

    @property
    def test(self):
        return self.X_test, self.y_test


def _carve_val(X, y, val_size: int, seed: int):
    """(X_train, y_train, X_val, y_val): `val_size` training samples picked with a fixed seed.
    val_size=0 leaves the training set exactly as it was (same order)."""
    if not 0 <= val_size < len(y):
        raise ValueError(f"val_size: must be in [0, {len(y)}), got {val_size}")
    if val_size == 0:
        return X, y, X[:0], y[:0]
    perm = np.random.default_rng(seed).permutation(len(y))
    v, t = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    return X[t], y[t], X[v], y[v]


@functools.lru_cache(maxsize=4)
def _digits_np(seed: int, test_size: int):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    X = X[perm].astype(np.float32) / 16.0   # pixel values are 0..16
    y = y[perm].astype(np.int64)
    return X[test_size:], y[test_size:], X[:test_size], y[:test_size]


def digits(seed: int = 0, test_size: int = 450, image: bool = False, val_size: int = 0) -> Split:
    """sklearn digits (1797 8×8 images, 10 classes), shuffled with `seed`; test set of `test_size`;
    validation part of `val_size` samples taken out of the training set (fixed seed `seed`).

    X: [N, 64] float32 in [0, 1], or [N, 1, 8, 8] when image=True; y: [N] int64.
    """
    Xtr, ytr, Xte, yte = _digits_np(seed, test_size)
    Xtr, ytr, Xv, yv = _carve_val(Xtr, ytr, val_size, seed)
    Xtr, ytr, Xte, yte, Xv, yv = (torch.from_numpy(np.ascontiguousarray(a)) for a in (Xtr, ytr, Xte, yte, Xv, yv))
    if image:
        Xtr, Xte, Xv = Xtr.view(-1, 1, 8, 8), Xte.view(-1, 1, 8, 8), Xv.view(-1, 1, 8, 8)
    return Split(Xtr, ytr, Xte, yte, Xv, yv)


@functools.lru_cache(maxsize=2)
def _mnist1d_np(seed: int):
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)   # ~3 s: generated from templates, no download
    return (d["x"].astype(np.float32), d["y"].astype(np.int64),
            d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))


def mnist1d(seed: int = 42, channels: bool = False, val_size: int = 0) -> Split:
    """MNIST-1D (4000 train / 1000 test sequences of length 40, 10 classes); validation part of
    `val_size` sequences taken out of the training set (fixed seed `seed`).

    X: [N, 40] float32, or [N, 1, 40] when channels=True (for Conv1d); y: [N] int64.
    """
    Xtr, ytr, Xte, yte = _mnist1d_np(seed)
    Xtr, ytr, Xv, yv = _carve_val(Xtr, ytr, val_size, seed)
    Xtr, ytr, Xte, yte, Xv, yv = (torch.from_numpy(np.ascontiguousarray(a)) for a in (Xtr, ytr, Xte, yte, Xv, yv))
    if channels:
        Xtr, Xte, Xv = Xtr[:, None], Xte[:, None], Xv[:, None]
    return Split(Xtr, ytr, Xte, yte, Xv, yv)


class DataError(ValueError):
    """Evaluation data that does not fit the model (features, layout) or cannot be read."""


def load_eval_data(spec: str | None, example_model, device: str, what: str = "data", split: str = "test"):
    """(X, y) test tensors for 'digits', 'mnist1d' or a .npz (X_test/y_test if present, else X/y),
    reshaped to the model's input when only the layout differs (flat digits for an 8x8 CNN).
    split="train": the training part instead (X_train/y_train of a .npz if present, else X/y), for
    data that fits something to the models (REPAIR statistics) rather than evaluating them."""

    if spec is None:
        return None
    if split not in ("test", "train"):
        raise ValueError(f"split: expected 'test' or 'train', got {split!r}")
    if spec in ("digits", "mnist1d"):
        parts = digits() if spec == "digits" else mnist1d()
        X, y = (parts.X_test, parts.y_test) if split == "test" else (parts.X_train, parts.y_train)
    else:
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"{what}: {p}: no such file")
        try:
            with np.load(p, allow_pickle=False) as z:   # no pickles from data files either
                xk, yk = (f"X_{split}", f"y_{split}") if f"X_{split}" in z else ("X", "y")
                if xk not in z or yk not in z:
                    raise DataError(f"{what}: {p} needs arrays X and y (or X_{split} and y_{split}); "
                                            f"it has {sorted(z.files)}")
                X, y = torch.from_numpy(z[xk]).float(), torch.from_numpy(z[yk]).long()
        except (ValueError, OSError) as exc:
            raise DataError(f"{what}: cannot read {p}: {exc}") from None
    first = next((m for m in example_model.modules() if hasattr(m, "in_features") or hasattr(m, "in_channels")),
                 None)
    if first is not None and hasattr(first, "in_channels") and X.dim() == 2:
        # conv model, flat data: (N, C*H*W) -> (N, C, H, W) when the sizes allow a square image
        c = first.in_channels
        side = int(round((X.shape[1] / c) ** 0.5))
        if c * side * side == X.shape[1] and isinstance(first, torch.nn.Conv2d):
            X = X.view(-1, c, side, side)
        elif isinstance(first, torch.nn.Conv1d) and X.shape[1] % c == 0:
            X = X.view(-1, c, X.shape[1] // c)
    elif first is not None and hasattr(first, "in_features") and X.dim() > 2:
        X = X.reshape(len(X), -1)
    if first is not None and hasattr(first, "in_features") and X.shape[1] != first.in_features:
        raise DataError(f"{what}: {spec} has {X.shape[1]} features per sample but the base model "
                                f"takes {first.in_features}; use data the models were trained on")
    return X.to(device), y.to(device)
