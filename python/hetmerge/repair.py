"""REPAIR (Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Interpolating two aligned networks shrinks the variance of their hidden units: averaging two
weight rows that are not perfectly correlated gives a unit whose pre-activation varies less than
either end's, and the collapse compounds layer after layer. REPAIR measures, on data X, the
per-unit mean and standard deviation of every hidden pre-activation of the two ends and of the
merge, and rescales and shifts each merged unit so that

    mean_goal = (1 - λ)·mean_base + λ·mean_target~,    std_goal = (1 - λ)·std_base + λ·std_target~

(target~: the target's unit in the base slot it was aligned to). The correction is folded into the
layer's own weight and bias, so the repaired model has the base's architecture:

    w' = w·s,   b' = (b - mean_merged)·s + mean_goal,   s = std_goal / std_merged   (per output unit)

Layers are corrected shallow to deep, each measured after the layers before it were corrected.

What counts as a hidden unit: an output unit of a paired Linear/Conv layer whose output axis is a
permutation group (not the model's output), measured at the layer's output: per unit over the
batch for Linear (and every leading position of a [N, ..., C] input), per channel over the batch
and the spatial positions for Conv. Statistics are population statistics (divide by the count)
over all of X, accumulated in float64 batch by batch (Chan's parallel update).

Cases:
- A base slot that is padding in the alignment (src = -1) has no target unit: with fill="zero" the
  target's side is a zero unit (mean 0, std 0), so the goal is (1 - λ)·base's; with fill="base" the
  slot keeps the base's unit at both ends, so the goal is the base's statistics.
- A merged unit whose std is ~0 on X (below 1e-6 of its layer's largest std: a constant unit) is
  only shifted to mean_goal; rescaling it would amplify rounding noise.
- A layer without a bias gets only the scale (there is no bias to shift; the mean is then s·mean).
- A layer followed by BatchNorm (with running statistics), bn="reset" (the default, the paper's
  RESET): the layer is not rescaled; the BatchNorm's running mean and variance are set to the merged
  layer's population statistics on X. BatchNorm divides each channel by its statistics, so a rescale
  of the layer before it would be undone exactly; after the reset the BatchNorm output on X has mean
  β and std |γ|·σ/sqrt(σ² + eps), β and γ being the interpolated affine parameters. This is not a
  no-op at λ = 0 or 1: the running averages from training are replaced by X's statistics.
  bn="repair": the BatchNorm's output (the pre-activation before the nonlinearity) is the unit
  measured and corrected, the correction folded into γ and β (both ends' BatchNorms are used as
  they are); a no-op at λ = 0 and 1 like the BatchNorm-free case.
- Layers the pairing leaves out (different depths) keep their weights and statistics; λ = 0 layers of
  a per-layer λ are corrected toward the base's statistics like any paired layer. A BatchNorm is
  recognised through the pairing (its running statistics paired with the layer's), so one that only
  the base has is left alone and its layer is treated as BatchNorm-free.
- Extrapolated λ (outside [0, 1]) can make std_goal negative: it is clamped at 0.

Cost: one forward of X through each end, and one (stopped at the layer) per corrected layer of the
merge. ``Repairer`` measures the ends once and repairs any number of merges of the same pair.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from .data import DataError
from .merging import layer_lams, resolve

__all__ = ["RepairError", "Repairer", "repair", "unit_stats", "sweep_repaired"]


class RepairError(DataError):
    """REPAIR cannot run: its data does not fit the models or holds no samples, or the models have
    no hidden layer to correct. (A DataError: the CLI reports it with exit code 4.)"""

_CONST = 1e-6   # a unit whose std is below this fraction of its layer's largest std is constant


@dataclass(frozen=True)
class _Hidden:
    """One hidden layer to correct: the base module whose output is measured and corrected (a
    Linear/Conv, or with bn="repair" the BatchNorm after it), the target's module paired with it, the
    link of their output units, and the BatchNorm whose running statistics are reset (bn="reset")."""
    layer: str
    base_path: str
    target_path: str
    link: str
    bn_path: str | None


def _batches(data, what: str) -> list[torch.Tensor]:
    """The input tensors of `data`: a tensor X, (X, y), or an iterable of batches (tensors or
    (X, y, ...) tuples). Kept as a list: REPAIR reads the data once per corrected layer."""
    if data is None or isinstance(data, (str, bytes, Mapping)):
        raise TypeError(f"{what}: expected a tensor X, (X, y), or an iterable of batches, got "
                        f"{type(data).__name__}")
    if torch.is_tensor(data):
        xs = [data]
    elif (isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0])
          and torch.is_tensor(data[1]) and data[1].dim() == 1 and len(data[1]) == len(data[0])):
        xs = [data[0]]   # (X, y): labels are not used
    else:
        try:
            items = list(data)
        except TypeError:
            raise TypeError(f"{what}: expected a tensor X, (X, y), or an iterable of batches, got "
                            f"{type(data).__name__}") from None
        xs = [b if torch.is_tensor(b) else b[0] if isinstance(b, (tuple, list)) and b else b for b in items]
    for i, x in enumerate(xs):
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"{what}: batch {i} is not a floating-point tensor "
                            f"({getattr(x, 'dtype', type(x).__name__)})")
    xs = [x for x in xs if len(x)]
    if not xs:
        raise RepairError(f"{what}: the data holds no samples")
    return xs


class _Stop(Exception):
    """Raised by a hook to end a forward once the layer it measures has run."""


class _Acc:
    """Per-unit mean and M2 (sum of squared deviations) over rows, merged batch by batch (Chan)."""

    def __init__(self):
        self.n, self.mean, self.m2, self.calls = 0, None, None, 0

    def add(self, out: torch.Tensor, channels_first: bool) -> None:
        # units on axis 1 for Conv/BatchNorm outputs [N, C, *spatial], on the last axis for Linear
        c = out.shape[1] if channels_first else out.shape[-1]
        x = (out.movedim(1, -1) if channels_first else out).reshape(-1, c).double()
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        d, tot = mean - self.mean, self.n + n
        self.mean = self.mean + d * (n / tot)
        self.m2 = self.m2 + m2 + d * d * (self.n * n / tot)
        self.n = tot

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, (self.m2 / self.n).sqrt()


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


@torch.no_grad()
def unit_stats(model: nn.Module, paths: list[str], data, what: str = "data",
               stop: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (mean [C], std [C])} of the outputs of the Linear/Conv modules at `paths` on
    `data` (float64; per channel over batch and spatial positions for Conv), the model in eval
    mode. stop=True ends each forward after the last listed module has run (one path)."""
    mods = dict(model.named_modules())
    accs = {p: _Acc() for p in paths}
    was = [(m, m.training) for m in model.modules()]
    handles = []

    def hook(path):
        def f(mod, inp, out):
            accs[path].add(out, _is_conv(mod) or isinstance(mod, nn.modules.batchnorm._BatchNorm))
            accs[path].calls += 1
            if stop:
                raise _Stop
        return f

    try:
        model.eval()
        handles = [mods[p].register_forward_hook(hook(p)) for p in paths]
        dev = next((t.device for t in model.parameters()), None)
        for i, x in enumerate(_batches(data, what)):
            before = {p: a.calls for p, a in accs.items()}
            try:
                model(x if dev is None else x.to(dev))
            except _Stop:
                pass
            except (RuntimeError, ValueError, TypeError) as exc:
                raise RepairError(f"{what}: batch {i} of shape {tuple(x.shape)} does not fit the model: "
                                  f"{str(exc).splitlines()[0]}") from None
            runs = {p: a.calls - before[p] for p, a in accs.items()}
            bad = [p for p, n in runs.items() if n != 1]
            if bad:
                raise RepairError(f"{what}: module {bad[0]!r} ran {runs[bad[0]]} times in one forward; "
                                  "REPAIR needs exactly one output per layer")
    finally:
        for h in handles:
            h.remove()
        for m, t in was:
            m.training = t
    out = {}
    for p, a in accs.items():
        mean, std = a.result()
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise RepairError(f"{what}: the outputs of layer {p!r} on this data are not finite (NaN/inf)")
        out[p] = (mean, std)
    return out


def _hidden_layers(base: nn.Module, target: nn.Module, pairing, bn: str) -> list[_Hidden]:
    """Paired Linear/Conv layers whose output link is solved (a hidden group, not the model's
    output), shallow to deep, read from the pairing alone (hand-written specs work too)."""
    bmods, tmods = dict(base.named_modules()), dict(target.named_modules())
    by_key = {pp.base_key: pp for pp in pairing.params}
    out = []
    for name in pairing.base_layers or list(pairing.layer_map):
        pp = by_key.get(f"{name}.weight")
        if name not in pairing.layer_map or pp is None or not pairing.links[pp.links[0]].free:
            continue   # unpaired, or writes the model's output: no hidden units
        path, tpath = name, pp.target_key.rpartition(".")[0]
        for side, p, mod in (("base", path, bmods.get(path)), ("target", tpath, tmods.get(tpath))):
            if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or \
                    isinstance(mod, nn.modules.conv._ConvTransposeNd):
                raise RepairError(f"repair: {side} layer {p!r} is a {type(mod).__name__}; REPAIR corrects "
                                  "Linear and Conv layers only (merge without repair=)")
        # a BatchNorm after the layer: its running statistics are paired with the layer's
        norms = [q.base_key.rpartition(".")[0] for q in pairing.params if q.layer == name and
                 q.base_key.endswith(".running_mean") and
                 isinstance(bmods.get(q.base_key.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)]
        if not norms:
            out.append(_Hidden(name, path, tpath, pp.links[0], None))
        elif bn == "reset":
            out.append(_Hidden(name, path, tpath, pp.links[0], norms[0]))
        else:   # bn="repair": the BatchNorm's output is the pre-activation; fold into γ, β
            tw = by_key.get(f"{norms[0]}.weight")
            if tw is None:
                raise RepairError(f"repair: bn='repair' needs an affine BatchNorm {norms[0]!r} in the base "
                                  "paired with one in the target; use bn='reset'")
            out.append(_Hidden(name, norms[0], tw.target_key.rpartition(".")[0], tw.links[0], None))
    return out


class Repairer:
    """The end statistics of one (base, target, alignment) pair on data X, applied to merges of it.

    Repairer(base, target, res, data, fill, layer_map)(merged, lam) corrects `merged` (a merge of
    this pair at `lam`, base architecture) in place and returns it. The ends are measured once here,
    so a sweep pays one forward per end in all, plus one per corrected layer per λ.
    data: a tensor X, (X, y) (labels unused), or an iterable of batches.
    """

    def __init__(self, base: nn.Module, target: nn.Module, res=None, data: Any = None, fill: str = "zero",
                 layer_map=None, bn: str = "reset"):
        if fill not in ("zero", "base"):
            raise ValueError(f"fill: expected 'zero' or 'base', got {fill!r}")
        if bn not in ("reset", "repair"):
            raise ValueError(f"bn: expected 'reset' or 'repair', got {bn!r}")
        self.batches = _batches(data, "repair")
        self.pairing, self.maps = resolve(base, target, res, layer_map)
        self.layers = _hidden_layers(base, target, self.pairing, bn)
        bmods = dict(base.named_modules())
        self.types = {h.base_path: type(bmods[h.base_path]) for h in self.layers}
        if not self.layers:
            raise RepairError("repair: the models have no paired hidden layer (every paired layer writes the "
                              f"model's output; paired layers: {list(self.pairing.layer_map)}), so there are no "
                              "hidden units whose statistics REPAIR could restore")
        sb = unit_stats(base, [h.base_path for h in self.layers], self.batches, "repair")
        st = unit_stats(target, sorted({h.target_path for h in self.layers}), self.batches, "repair")
        self.ends: dict[str, tuple] = {}
        for h in self.layers:
            mb, sdb = sb[h.base_path]
            mt, sdt = st[h.target_path]
            src = self.maps[h.link].to(mb.device)
            ok = src >= 0
            # target~ in base slots; padding: a zero unit (fill="zero") or the base's own unit
            pad_m, pad_s = (mb, sdb) if fill == "base" else (torch.zeros_like(mb), torch.zeros_like(sdb))
            idx = src.clamp(min=0)
            self.ends[h.layer] = (mb, sdb, torch.where(ok, mt[idx], pad_m), torch.where(ok, sdt[idx], pad_s))

    def goals(self, lam, extrapolate: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (mean_goal [C], std_goal [C])} at merging factor `lam` (float or {layer: λ})."""
        lams = layer_lams(self.pairing, lam, extrapolate)
        out = {}
        for h in self.layers:
            mb, sdb, mt, sdt = self.ends[h.layer]
            x = lams.get(h.layer, 0.0)
            out[h.layer] = ((1 - x) * mb + x * mt, ((1 - x) * sdb + x * sdt).clamp(min=0))
        return out

    @torch.no_grad()
    def __call__(self, merged: nn.Module, lam=0.5, extrapolate: bool = False) -> nn.Module:
        goals = self.goals(lam, extrapolate)
        mods = dict(merged.named_modules())
        for h in self.layers:
            mod = mods.get(h.base_path)
            if type(mod) is not self.types[h.base_path]:
                raise RepairError(f"repair: the merged model has no {self.types[h.base_path].__name__} "
                                  f"{h.base_path!r} like the base's; pass a merge of this pair (base architecture)")
            mean_m, std_m = unit_stats(merged, [h.base_path], self.batches, "repair", stop=True)[h.base_path]
            if h.bn_path is not None:
                bn = mods[h.bn_path]
                bn.running_mean.copy_(mean_m.to(bn.running_mean.dtype))
                bn.running_var.copy_((std_m ** 2).to(bn.running_var.dtype))
                continue
            mean_g, std_g = goals[h.layer]
            const = std_m <= _CONST * max(float(std_m.max()), 1e-300)
            s = torch.where(const, torch.ones_like(std_m), std_g / torch.where(const, torch.ones_like(std_m), std_m))
            w = mod.weight
            shape = (-1,) + (1,) * (w.dim() - 1)
            w.copy_((w.double() * s.view(shape)).to(w.dtype))
            if mod.bias is not None:
                mod.bias.copy_(((mod.bias.double() - mean_m) * s + mean_g).to(mod.bias.dtype))
        return merged


def repair(merged: nn.Module, base: nn.Module, target: nn.Module, res=None, lam=0.5, data: Any = None,
           fill: str = "zero", layer_map=None, extrapolate: bool = False, bn: str = "reset") -> nn.Module:
    """A copy of `merged` (the merge of `target` into `base` at `lam` with alignment `res`, `fill`)
    whose hidden units have, on `data`, the interpolated mean and std of the ends' (module
    docstring). hm.merge(..., repair=X) does this with bn="reset"."""
    return Repairer(base, target, res, data, fill, layer_map, bn)(copy.deepcopy(merged), lam, extrapolate)


@torch.no_grad()
def sweep_repaired(base, target, pairing, maps, fill, extrapolate, data, bn_data, lambdas, domains, sums,
                   loss_fn, batches) -> tuple[float, float]:
    """hm.sweep(repair=X): merge, REPAIR and evaluate each λ of `lambdas` in turn, adding each domain's
    loss sum and correct count into sweep's `sums` ({domain: (loss [K], correct [K], [count])});
    `batches(data)` yields (X, y). Returns (seconds merging + repairing, seconds evaluating).
    Cost: one forward of X per end, then per λ a merge, one forward of X per hidden layer (stopped
    at that layer) and the evaluation, against the batched sweep's one vmapped pass for all λ."""
    import time

    from .alignment import Alignment
    from .merging import merge

    if bn_data is not None:
        raise ValueError("sweep: give repair= or bn_data=, not both (REPAIR resets BatchNorm statistics on "
                         "its own data)")
    t0 = time.perf_counter()
    res = Alignment(pairing, maps)   # resolved once by the sweep (res=None: maps by position)
    fix = Repairer(base, target, res, data, fill)
    t_merge, t_fwd = time.perf_counter() - t0, 0.0
    for k, lam in enumerate(lambdas.tolist()):
        t0 = time.perf_counter()
        m = fix(merge(base, target, res, lam, fill, extrapolate=extrapolate), lam, extrapolate).eval()
        t1 = time.perf_counter()
        for d, dd in domains:
            loss_sum, correct, count = sums[d]
            count[0] = 0
            for X, y in batches(dd):
                logits = m(X)
                loss_sum[k] += float(loss_fn(logits, y).double().sum())
                correct[k] += float((logits.argmax(-1) == y).sum())
                count[0] += len(y)
        t_merge, t_fwd = t_merge + t1 - t0, t_fwd + time.perf_counter() - t1
    return t_merge, t_fwd
