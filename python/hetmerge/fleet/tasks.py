"""What a worker runs: one checkpoint (identity, accuracy alone) or one pair (compatibility,
alignment, λ sweep). Top-level functions of checkpoint paths and plain options, returning plain
dicts, so that any executor can ship them (see executors.py); models are loaded in the worker.

Data: `data` is "digits", "mnist1d" or a .npz. λ* is chosen on a validation split and every number
is also reported on the test split. For digits and MNIST-1D the validation split is the part that
hetmerge.zoo holds out of training (zoo.VAL_SIZES), so models trained by ``hetmerge.zoo.train_zoo``
never saw it; a .npz must hold X_val, y_val next to X_test, y_test (or X, y as the test split).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["load_checkpoint", "load_splits", "check_data", "model_task", "pair_task", "PRELOAD"]

# what a process pool's workers should import once before forking (executors.PoolExecutor preload):
# the tasks themselves, and scikit-learn for the digits data (seconds to import)
PRELOAD = ("hetmerge", "hetmerge.fleet.tasks", "sklearn.datasets")

_SPLITS: dict = {}   # per worker process: (data spec, model input) -> {"val": (X, y), "test": (X, y)}


def load_checkpoint(path: str, arch: Any = "auto", sub_key: str | None = None, key_prefix: str | None = None):
    """(module in eval mode, Arch) of a checkpoint file; the architecture is built from `arch` (a
    description as --arch takes it) with sizes read from the weights."""
    from ..architectures import build, check_weights, parse_arch
    from ..checkpoint import load_state

    state = load_state(path, sub_key=sub_key, key_prefix=key_prefix)
    a = parse_arch(arch)
    model, _ = build(a, state)
    check_weights(model, state, "model", f"weights {Path(path).name}")
    missing = {k: v for k, v in model.state_dict().items() if k not in state}   # integer bookkeeping
    model.load_state_dict({**missing, **state})
    return model.eval(), a


def load_splits(data: str, model) -> dict:
    """{"val": (X, y), "test": (X, y)} shaped for `model` (cached per process)."""
    import numpy as np

    from ..data import DataError, load_eval_data

    # load_eval_data fits data to a model by its first Linear/Conv layer: one entry per such input
    first = next((m for m in model.modules() if hasattr(m, "in_features") or hasattr(m, "in_channels")), None)
    key = (data, type(first).__name__, getattr(first, "in_features", None), getattr(first, "in_channels", None))
    if key in _SPLITS:
        return _SPLITS[key]
    test = load_eval_data(data, model, "cpu")     # the one place that fits data to a model's input
    if data in ("digits", "mnist1d"):
        from ..zoo import cache_dir, load_data
        split = load_data(data, cache_dir() if data == "mnist1d" else None)
        Xv, yv = split.X_val, split.y_val
    else:
        with np.load(data, allow_pickle=False) as z:
            if "X_val" not in z or "y_val" not in z:
                raise DataError(f"data: {data} has no validation split (arrays X_val, y_val; it has "
                                f"{sorted(z.files)}): λ* is chosen on it and reported on the test split")
            Xv, yv = torch.from_numpy(z["X_val"]).float(), torch.from_numpy(z["y_val"]).long()
    if Xv[0].numel() != test[0][0].numel():
        raise DataError(f"data: {data}: validation samples have {Xv[0].numel()} values, test samples "
                        f"{test[0][0].numel()}")
    _SPLITS[key] = {"val": (Xv.reshape(len(Xv), *test[0].shape[1:]), yv), "test": test}
    return _SPLITS[key]


def check_data(data: str) -> None:
    """Refuse, before any worker starts, a .npz without the splits a study needs (DataError)."""
    import numpy as np

    from ..data import DataError

    if data in ("digits", "mnist1d"):
        return
    try:
        with np.load(data, allow_pickle=False) as z:
            have = set(z.files)
    except (ValueError, OSError) as exc:
        raise DataError(f"data: cannot read {data}: {exc}") from None
    missing = [k for k in ("X_val", "y_val") if k not in have]
    if not ({"X_test", "y_test"} <= have or {"X", "y"} <= have):
        missing.append("X_test, y_test (or X, y)")
    if missing:
        raise DataError(f"data: {data} lacks {', '.join(missing)} (it has {sorted(have)}): the zoo study "
                        "chooses λ* on the validation split X_val, y_val and reports the test split")


def _fingerprint(path: str, sub_key, key_prefix) -> dict:
    from ..checkpoint import FINGERPRINT_KIND, scan_weights

    scan = scan_weights(path, sub_key, key_prefix)
    return {"file": str(path), "bytes": Path(path).stat().st_size, "kind": FINGERPRINT_KIND,
            "digest": scan.digest}, [[k, n] for k, n in scan.nonfinite]


@torch.no_grad()
def _score(model, X, y) -> dict:
    logits = model(X)
    return {"loss": float(F.cross_entropy(logits, y)), "acc": float((logits.argmax(-1) == y).float().mean())}


def model_task(path: str, opts: dict) -> dict:
    """One checkpoint: its fingerprint (file, bytes, kind, digest: the one alignment files record),
    non-finite tensors, architecture, parameters, and loss/accuracy alone on validation and test.
    opts: arch, sub_key, key_prefix, data."""
    fp, nonfinite = _fingerprint(path, opts.get("sub_key"), opts.get("key_prefix"))
    model, arch = load_checkpoint(path, opts.get("arch", "auto"), opts.get("sub_key"), opts.get("key_prefix"))
    splits = load_splits(opts["data"], model)
    out = {"fingerprint": fp, "nonfinite": nonfinite, "arch": arch.describe(),
           "params": sum(p.numel() for p in model.parameters())}
    out["val"], out["test"] = _score(model, *splits["val"]), _score(model, *splits["test"])
    return out


def _at(lams: list[float], values, lam: float) -> float:
    return float(values[min(range(len(lams)), key=lambda i: abs(lams[i] - lam))])


def pair_task(base_path: str, target_path: str, opts: dict) -> dict:
    """Align target to base (hm.align) and sweep λ (hm.sweep) on validation and test.

    opts: arch, sub_key, key_prefix, data, lambdas [K], acc_tol, fill, method, objective, restarts,
    max_iter, tol, seed, batch_size, fingerprints {"base": ..., "target": ...} (stored in the
    alignment so that `hetmerge merge --alignment` can check the weights).
    Returns {"status": "ok", "compat", "align", "sweep", "alignment": Alignment.to_dict(), "timings"}
    or {"status": "incompatible", "reason"} when the two cannot be paired (no layer in common, layers
    of different kinds)."""
    import time

    import hetmerge as hm

    from .. import report as R
    from ..alignment import prepare
    from ..merging import memory_estimate
    from ..spec import SpecError

    t0 = time.perf_counter()
    arch, sk, kp = opts.get("arch", "auto"), opts.get("sub_key"), opts.get("key_prefix")
    base, barch = load_checkpoint(base_path, arch, sk, kp)
    target, tarch = load_checkpoint(target_path, arch, sk, kp)
    lambdas = torch.tensor(opts["lambdas"], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pairing = prepare(base, target)[0]
        except SpecError as exc:   # NothingToAlignError included: a property of the pair, not a failure
            return {"status": "incompatible", "reason": str(exc)}
    compat = {"cases": dict(pairing.cases), "layer_map": dict(pairing.layer_map),
              "links": len(pairing.links), "solved_links": sum(l.free for l in pairing.links.values()),
              "memory": memory_estimate(pairing, base.state_dict(), target.state_dict(), len(lambdas)),
              "warnings": [str(w.message) for w in caught]}
    splits = load_splits(opts["data"], base)
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # pairing warnings were kept above
        res = hm.align(base, target, method=opts.get("method", "weight"), data=splits["val"],
                       restarts=opts.get("restarts", 1), max_iter=opts.get("max_iter", 100),
                       tol=opts.get("tol", 1e-9), seed=opts.get("seed", 0), objective=opts.get("objective", "inner"))
        t2 = time.perf_counter()
        # the test split rides along as the sweep's second data set: one interpolation per λ for both
        curve = hm.sweep(base, target, res, lambdas, data=splits["val"], target_data=splits["test"],
                         tol=opts.get("acc_tol", 0.01), fill=opts.get("fill", "zero"),
                         batch_size=opts.get("batch_size"))
    t3 = time.perf_counter()
    lams = curve.lambdas.tolist()
    alignment = res.alignment
    alignment.fingerprints = dict(opts.get("fingerprints") or {})
    alignment.info = {"created_by": "hetmerge zoo", "versions": R.versions(),
                      "arch": {"base": barch.describe(), "target": tarch.describe()}, "method": res.method,
                      "objective": res.objective, "trace": list(res.trace), "iterations": res.iterations,
                      "converged": res.converged, "restart_objectives": list(res.restart_objectives),
                      "options": {k: opts.get(k) for k in ("method", "objective", "restarts", "max_iter", "tol",
                                                           "seed")}}
    sweep = {"lambdas": lams, "val_loss": curve.loss.tolist(), "val_acc": curve.acc.tolist(),
             "test_loss": curve.target_loss.tolist(), "test_acc": curve.target_acc.tolist(),
             "barrier": curve.barrier, "test_barrier": curve.target_barrier, "lam_star": curve.lam_star,
             "val_acc_at_lam_star": _at(lams, curve.acc, curve.lam_star),
             "test_acc_at_lam_star": _at(lams, curve.target_acc, curve.lam_star)}
    return {"status": "ok", "compat": compat,
            "align": {"objective": res.objective, "trace": list(res.trace), "iterations": res.iterations,
                      "converged": res.converged},
            "sweep": sweep, "alignment": R.to_jsonable(alignment.to_dict()),
            "timings": {"load": t1 - t0, "align": t2 - t1, "sweep": t3 - t2}}
