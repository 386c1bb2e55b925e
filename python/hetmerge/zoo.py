"""The demo's model zoo: small heterogeneous MLPs trained (seeded) on offline real data, cached.

Models and generated datasets are cached under the user's cache folder (``$HETMERGE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/hetmerge``, else ``~/.cache/hetmerge``), keyed by everything that changes
the weights (data set, widths, seed, recipe, torch version), so a rerun loads instead of training.
Cache files are safetensors, written atomically: a killed run leaves no half-written model.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_state, save_state

__all__ = ["cache_dir", "Recipe", "ZooModel", "ARCHS", "QUICK_ARCHS", "load_data", "arch_name",
           "train_zoo", "zoo_layer_map"]

# Bump when the training recipe or builders change in a way the key does not capture.
ZOO_VERSION = 2   # 2: training sets exclude the validation part (VAL_SIZES)

# hidden widths per architecture: widths 32-256, depths 2-4, one tapered net so that some pairs
# are size-incompatible (one side wider on a layer's input, the other on its output)
ARCHS: dict[str, list[int]] = {
    "32x2": [32, 32], "64x2": [64, 64], "128x2": [128, 128], "256x2": [256, 256],
    "128x3": [128, 128, 128], "64x4": [64, 64, 64, 64], "256-64": [256, 64],
}
QUICK_ARCHS: dict[str, list[int]] = {"64x2": [64, 64], "128x2": [128, 128], "64x3": [64, 64, 64],
                                     "128-32": [128, 32]}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        p = Path(override)
    elif os.environ.get("HETMERGE_CACHE_DIR"):
        p = Path(os.environ["HETMERGE_CACHE_DIR"])
    else:
        p = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetmerge"
    p.mkdir(parents=True, exist_ok=True)
    return p


@dataclass(frozen=True)
class Recipe:
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 128


# validation samples held out of each training set (fixed seed): the demo chooses λ on them and
# reports on the test set
VAL_SIZES = {"digits": 300, "mnist1d": 500}

# epochs: enough for a stable test accuracy; the whole zoo trains in about a minute on two cores
RECIPES = {"digits": Recipe(epochs=30), "mnist1d": Recipe(epochs=20)}
QUICK_RECIPES = {"digits": Recipe(epochs=12), "mnist1d": Recipe(epochs=8)}


def load_data(name: str, cache: Path | None = None):
    """Split (X_train, y_train, X_test, y_test, + X_val, y_val of VAL_SIZES[name] samples held out of
    training) of 'digits' or 'mnist1d' via hetmerge.data, the generated MNIST-1D arrays cached
    (generating them takes seconds)."""
    from . import data

    if name not in VAL_SIZES:
        raise ValueError(f"data: expected 'digits' or 'mnist1d', got {name!r}")
    if name == "digits":
        return data.digits(val_size=VAL_SIZES[name])
    if cache is None:
        return data.mnist1d(val_size=VAL_SIZES[name])
    f = cache / "data" / f"mnist1d-seed42-val{VAL_SIZES[name]}.safetensors"
    keys = ("X_train", "y_train", "X_test", "y_test", "X_val", "y_val")
    if f.exists():
        try:
            s = load_state(f, mmap=False)
            return data.Split(*(s[k] for k in keys))
        except (CheckpointError, KeyError):
            pass   # corrupt cache entry: regenerate
    split = data.mnist1d(val_size=VAL_SIZES[name])
    f.parent.mkdir(parents=True, exist_ok=True)
    save_state(dict(zip(keys, (*split, split.X_val, split.y_val))), f)
    return split


def arch_name(widths: Sequence[int]) -> str:
    ws = list(widths)
    return f"{ws[0]}x{len(ws)}" if len(set(ws)) == 1 else "-".join(map(str, ws))


@dataclass
class ZooModel:
    name: str            # "<dataset>/<arch>/s<seed>"
    dataset: str
    arch: str
    widths: list[int]
    seed: int
    model: nn.Module = field(repr=False)
    acc: float = 0.0     # test accuracy
    train_s: float = 0.0  # seconds spent training (0 when loaded from the cache)
    cached: bool = False
    path: Path | None = None


def _key(dataset: str, widths, seed: int, recipe: Recipe, in_dim: int) -> str:
    spec = json.dumps({"v": ZOO_VERSION, "data": dataset, "val": VAL_SIZES.get(dataset, 0), "in": in_dim,
                       "widths": list(widths), "seed": seed,
                       "recipe": recipe.__dict__, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def train_zoo(datasets: Sequence[str], archs: dict[str, list[int]], seeds: Sequence[int],
              recipes: dict[str, Recipe], cache: Path, device: str = "cpu", retrain: bool = False,
              progress: Callable | None = None, log: Callable[[str], None] = lambda s: None
              ) -> tuple[dict[str, ZooModel], dict[str, object]]:
    """Train (or load) every (dataset, arch, seed); returns ({name: ZooModel}, {dataset: Split})."""
    from . import models

    splits, zoo = {}, {}
    jobs = [(d, a, s) for d in datasets for a in archs for s in seeds]
    bar = progress(total=len(jobs), desc="zoo", unit="model") if progress else None
    for d in datasets:
        t0 = time.perf_counter()
        splits[d] = load_data(d, cache)
        log(f"data {d}: {len(splits[d][1])} train / {len(splits[d].y_val)} validation / "
            f"{len(splits[d][3])} test samples "
            f"({time.perf_counter() - t0:.1f} s)")
    threads = torch.get_num_threads()
    try:
        # one thread is faster than several for these tiny matmuls (measured: ~4x per step on 2 cores)
        torch.set_num_threads(1)
        for d, a, s in jobs:
            Xtr, ytr, Xte, yte = splits[d]
            widths, recipe = archs[a], recipes[d]
            in_dim, out_dim = int(Xtr.shape[1]), int(ytr.max()) + 1
            f = cache / "zoo" / d / f"{a}-s{s}-{_key(d, widths, s, recipe, in_dim)}.safetensors"
            torch.manual_seed(s)   # initialization
            m = models.mlp(in_dim, widths, out_dim)
            cached, train_s = False, 0.0
            if f.exists() and not retrain:
                try:
                    m.load_state_dict(load_state(f, mmap=False))
                    cached = True
                except (CheckpointError, RuntimeError) as exc:
                    log(f"cache entry {f} unusable ({exc}); retraining")
            if not cached:
                t0 = time.perf_counter()
                models.train(m, Xtr, ytr, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                             seed=s)
                train_s = time.perf_counter() - t0
                f.parent.mkdir(parents=True, exist_ok=True)
                save_state(m.state_dict(), f, metadata={"dataset": d, "widths": json.dumps(widths),
                                                        "seed": str(s), "recipe": json.dumps(recipe.__dict__)})
            m = m.to(device).eval()
            acc = models.accuracy(m, Xte.to(device), yte.to(device))
            name = f"{d}/{a}/s{s}"
            zoo[name] = ZooModel(name, d, a, list(widths), s, m, acc, train_s, cached, f)
            if bar is not None:
                bar.set_postfix_str(f"{name} acc {100 * acc:.1f}%" + (" (cached)" if cached else ""))
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    return zoo, splits


def zoo_layer_map(base_widths: Sequence[int], target_widths: Sequence[int]) -> dict[str, str]:
    """Hidden layers shallow to shallow; heads paired only when the depths agree.

    With different depths the paper merges shallow layers and leaves the rest of the base alone:
    pairing the base's head with a target hidden layer (plain zip order) would merge a classifier
    with a feature layer.
    """
    nb, nt = len(base_widths), len(target_widths)
    m = {f"fc{i}": f"fc{i}" for i in range(min(nb, nt))}
    if nb == nt:
        m["head"] = "head"
    return m
