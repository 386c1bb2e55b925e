"""Model assembly: the paper's iterative integration of a model zoo into a base model."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .alignment import align
from .evaluate import SweepResult, recompute_bn, sweep
from .merging import merge

__all__ = ["AssemblyStep", "AssemblyResult", "assemble", "pick_lam"]


@dataclass
class AssemblyStep:
    """One zoo model merged into the current base.

    before/after: metrics on the selection data (`data=` / `target_data=` of hm.assemble, the split λ
    was chosen on) at λ = 0 and at `lam`: {"base_acc", "base_loss", "target_acc", "target_loss"}.
    eval_before/eval_after: the same metrics of the model before and after this step on the held-out
    `eval_data=` / `target_eval_data=` (None when not given). Only these are unbiased: `after` is the
    maximum the selection found on the very data it searched.
    replaced: lam == 1, i.e. the step replaced the base by the aligned zoo model (in the base's
    architecture) instead of merging it in.
    """
    model: str
    layer_map: dict[str, str]
    lam: float
    lam_star: float
    barrier: float
    before: dict[str, float]
    after: dict[str, float]
    time: float
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    replaced: bool = False
    curve: SweepResult | None = field(default=None, repr=False)


@dataclass
class AssemblyResult:
    """The assembled model (base architecture) and one report entry per zoo model.
    Unpacks as (model, report)."""
    model: nn.Module
    report: list[AssemblyStep]

    def __iter__(self):
        return iter((self.model, self.report))


def pick_lam(curve: SweepResult, tol: float, lam_max: float = 1.0) -> int:
    """Index of the λ that maximizes the target-domain accuracy (then lower target loss, then smaller
    λ) among λ <= min(λ*, lam_max), i.e. where the base-domain accuracy stays within tol of the
    base's all the way from λ = 0; without target data, the largest such λ."""
    from .evaluate import lam_star
    lam = curve.lambdas
    i0 = int(torch.argmin(lam))
    ls = min(lam_star(lam, curve.acc, float(curve.acc[i0]), tol), lam_max)
    ok = [i for i in range(lam.numel()) if float(lam[i]) <= ls]
    if not ok:
        return i0
    if curve.target_acc is None:
        return max(ok, key=lambda i: float(lam[i]))
    return max(ok, key=lambda i: (float(curve.target_acc[i]), -float(curve.target_loss[i]), -float(lam[i])))


def _eval(model: nn.Module, data, target_data) -> dict[str, float] | None:
    """Accuracy and mean cross-entropy of `model` on held-out (X, y) pairs (None without data)."""
    if data is None:
        return None
    out = {}
    was = model.training
    model.eval()
    with torch.no_grad():
        for prefix, d in (("base", data), ("target", target_data)):
            if d is None:
                continue
            X, y = d
            logits = model(X)
            out[f"{prefix}_acc"] = float((logits.argmax(-1) == y).float().mean())
            out[f"{prefix}_loss"] = float(torch.nn.functional.cross_entropy(logits, y))
    model.train(was)
    return out


def _metrics(curve: SweepResult, i: int) -> dict[str, float]:
    m = {"base_acc": float(curve.acc[i]), "base_loss": float(curve.loss[i])}
    if curve.target_acc is not None:
        m.update(target_acc=float(curve.target_acc[i]), target_loss=float(curve.target_loss[i]))
    return m


def assemble(base: nn.Module, zoo: Sequence[nn.Module] | Mapping[str, nn.Module], data: Any = None,
             target_data: Any = None, tol: float = 0.01, lambdas=None, objective: Callable | None = None,
             layer_maps: Mapping[str, Any] | Sequence[Any] | None = None, method: str = "weight",
             restarts: int = 4, fill: str = "zero", bn_data: Any = None, seed: int = 0,
             eval_data: Any = None, target_eval_data: Any = None, lam_max: float | None = None,
             allow_replace: bool = False, search: str = "grid", **align_kwargs) -> AssemblyResult:
    """Integrate each zoo model into the base in turn: align it to the current base, sweep λ, take the
    λ that maximizes the target-domain metric while the base-domain accuracy stays within `tol`
    (or `objective(curve) -> index into lambdas`), merge, continue.

    zoo: list of modules or {name: module}.
    data: base-domain (X, y) the λ is chosen on: a validation split, never the split you report.
    target_data: target-domain selection (X, y), one for all zoo models or a list / {name: (X, y)} per
      model (None: the largest λ within tol).
    eval_data: held-out base-domain (X, y), and target_eval_data: held-out target-domain (X, y) (forms
      as for target_data; needs eval_data), on which each step's model is evaluated before and after
      the step (AssemblyStep.eval_before / eval_after); report these, not `after`, which is measured
      on the data λ was picked on. Without eval_data only those selection metrics exist.
    lam_max: largest λ a step may take. Default: below 1 (the largest grid value < 1), because λ = 1
      replaces the base by the aligned zoo model rather than assembling it; pass allow_replace=True
      (or lam_max=1) to allow that, and such steps are flagged AssemblyStep.replaced.
    layer_maps: per zoo model, as for hm.align. Returns AssemblyResult(model, report); base and zoo
    are not modified.
    search: "grid" sweeps every λ in `lambdas`; "adaptive" (hm.sweep's) evaluates a few and picks
      among them: λ* over the grid points up to the cap below (so the step's lam_star is capped
      there), the barrier over [0, 1]; without target data the same λ as the grid.
    """
    if data is None:
        raise ValueError("assemble: data= (base-domain (X, y) to choose λ on, a validation split) is required")
    items = list(zoo.items()) if isinstance(zoo, Mapping) else [(str(i), m) for i, m in enumerate(zoo)]
    if not items:
        raise ValueError("assemble: zoo is empty")
    if lambdas is None:
        lambdas = torch.linspace(0, 1, 21)
    if eval_data is not None and (eval_data is data or (isinstance(eval_data, (tuple, list)) and
                                                        isinstance(data, (tuple, list)) and
                                                        eval_data[0] is data[0])):
        raise ValueError("eval_data: is the data λ is chosen on (data=); pass a held-out split")
    if target_eval_data is not None and eval_data is None:
        raise ValueError("target_eval_data: needs eval_data= (held-out base-domain (X, y)) as well")
    if lam_max is not None and not 0.0 <= lam_max <= 1.0:
        raise ValueError(f"lam_max: must be in [0, 1], got {lam_max}")

    def per_model(x, i, name, what):
        if x is None:
            return None
        if isinstance(x, Mapping):
            if name not in x:
                raise KeyError(f"{what}: no entry for zoo model {name!r}")
            return x[name]
        if isinstance(x, (list,)) and len(x) == len(items) and not torch.is_tensor(x[0]):
            return x[i]
        return x

    current = base
    report = []
    for i, (name, model) in enumerate(items):
        t0 = time.perf_counter()
        tdata = per_model(target_data, i, name, "target_data")
        tevdata = per_model(target_eval_data, i, name, "target_eval_data")
        lmap = per_model(layer_maps, i, name, "layer_maps") if layer_maps is not None else None
        res = align(current, model, method=method, layer_map=lmap, data=data, restarts=restarts,
                    seed=seed, **align_kwargs)
        grid = torch.round(torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1) * 1e6) / 1e6
        if lam_max is not None:
            cap = lam_max
        elif allow_replace:
            cap = 1.0
        else:   # the largest swept λ below 1
            below = grid[grid < 1]
            cap = float(below.max()) if below.numel() else 0.0
        # adaptive: λ* only over grid points a step may take, so that the one picked is evaluated
        curve = sweep(current, model, res, grid if search == "grid" else grid[grid <= cap], data=data,
                      target_data=tdata, tol=tol, fill=fill, bn_data=bn_data, search=search)
        idx = objective(curve) if objective is not None else pick_lam(curve, tol, cap)
        lam = float(curve.lambdas[idx])
        if lam > cap:
            raise ValueError(f"objective: picked λ = {lam} above lam_max = {cap}; λ = 1 replaces the base "
                             "(pass allow_replace=True or lam_max= to allow it)")
        i0 = int(torch.argmin(curve.lambdas))
        ev_before = _eval(current, eval_data, tevdata)
        if lam != 0.0:
            current = merge(current, model, res, lam=lam, fill=fill)
            if bn_data is not None:   # the sweep judged λ with re-estimated statistics; keep them
                current = recompute_bn(current, bn_data)
        report.append(AssemblyStep(model=name, layer_map=res.layer_map, lam=lam, lam_star=curve.lam_star,
                                   barrier=curve.barrier, before=_metrics(curve, i0),
                                   after=_metrics(curve, idx), time=time.perf_counter() - t0,
                                   eval_before=ev_before, eval_after=_eval(current, eval_data, tevdata),
                                   replaced=lam >= 1.0, curve=curve))
    if current is base:
        import copy
        current = copy.deepcopy(base)   # the result is always a new module
    return AssemblyResult(current, report)
