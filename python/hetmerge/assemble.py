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
    before/after: {"base_acc", "base_loss", "target_acc", "target_loss"} at λ = 0 and at `lam`."""
    model: str
    layer_map: dict[str, str]
    lam: float
    lam_star: float
    barrier: float
    before: dict[str, float]
    after: dict[str, float]
    time: float
    curve: SweepResult | None = field(default=None, repr=False)


@dataclass
class AssemblyResult:
    """The assembled model (base architecture) and one report entry per zoo model.
    Unpacks as (model, report)."""
    model: nn.Module
    report: list[AssemblyStep]

    def __iter__(self):
        return iter((self.model, self.report))


def pick_lam(curve: SweepResult, tol: float) -> int:
    """Index of the λ that maximizes the target-domain accuracy (then lower target loss, then smaller
    λ) among λ <= λ*, i.e. where the base-domain accuracy stays within tol of the base's all the way
    from λ = 0; without target data, λ* itself."""
    from .evaluate import lam_star
    lam = curve.lambdas
    i0 = int(torch.argmin(lam))
    ls = lam_star(lam, curve.acc, float(curve.acc[i0]), tol)
    ok = [i for i in range(lam.numel()) if float(lam[i]) <= ls]
    if curve.target_acc is None or not ok:
        return int(torch.nonzero(lam == ls)[0]) if bool((lam == ls).any()) else i0
    return max(ok, key=lambda i: (float(curve.target_acc[i]), -float(curve.target_loss[i]), -float(lam[i])))


def _metrics(curve: SweepResult, i: int) -> dict[str, float]:
    m = {"base_acc": float(curve.acc[i]), "base_loss": float(curve.loss[i])}
    if curve.target_acc is not None:
        m.update(target_acc=float(curve.target_acc[i]), target_loss=float(curve.target_loss[i]))
    return m


def assemble(base: nn.Module, zoo: Sequence[nn.Module] | Mapping[str, nn.Module], data: Any = None,
             target_data: Any = None, tol: float = 0.01, lambdas=None, objective: Callable | None = None,
             layer_maps: Mapping[str, Any] | Sequence[Any] | None = None, method: str = "weight",
             restarts: int = 4, fill: str = "zero", bn_data: Any = None, seed: int = 0,
             **align_kwargs) -> AssemblyResult:
    """Integrate each zoo model into the base in turn: align it to the current base, sweep λ, take the
    λ that maximizes the target-domain metric while the base-domain accuracy stays within `tol`
    (or `objective(curve) -> index into lambdas`), merge, continue.

    zoo: list of modules or {name: module}. data: base-domain (X, y). target_data: one (X, y) for all
    zoo models, or a list / {name: (X, y)} per model (None: λ = λ*). layer_maps: per zoo model, as for
    hm.align. Returns AssemblyResult(model, report); base and zoo are not modified.
    """
    if data is None:
        raise ValueError("assemble: data= (base-domain (X, y)) is required")
    items = list(zoo.items()) if isinstance(zoo, Mapping) else [(str(i), m) for i, m in enumerate(zoo)]
    if not items:
        raise ValueError("assemble: zoo is empty")
    if lambdas is None:
        lambdas = torch.linspace(0, 1, 21)

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
        lmap = per_model(layer_maps, i, name, "layer_maps") if layer_maps is not None else None
        res = align(current, model, method=method, layer_map=lmap, data=data, restarts=restarts,
                    seed=seed, **align_kwargs)
        curve = sweep(current, model, res, lambdas, data=data, target_data=tdata, tol=tol, fill=fill,
                      bn_data=bn_data)
        idx = objective(curve) if objective is not None else pick_lam(curve, tol)
        lam = float(curve.lambdas[idx])
        i0 = int(torch.argmin(curve.lambdas))
        if lam != 0.0:
            current = merge(current, model, res, lam=lam, fill=fill)
            if bn_data is not None:   # the sweep judged λ with re-estimated statistics; keep them
                current = recompute_bn(current, bn_data)
        report.append(AssemblyStep(model=name, layer_map=res.layer_map, lam=lam, lam_star=curve.lam_star,
                                   barrier=curve.barrier, before=_metrics(curve, i0),
                                   after=_metrics(curve, idx), time=time.perf_counter() - t0,
                                   curve=curve))
    if current is base:
        import copy
        current = copy.deepcopy(base)   # the result is always a new module
    return AssemblyResult(current, report)
