"""Sweep of the merging factor λ: loss and accuracy per λ, the loss barrier and λ*.

All K factors are evaluated together: one ``ops.interpolate`` per paired tensor gives the K merged
tensors, and one vmapped ``torch.func.functional_call`` runs the K models on each batch. Factors are
processed in chunks so that the K stacked copies of the weights stay under a memory bound.

Why this module is long: it is one engine (template, input mixing, batched Linear, chunked loop)
that the grid sweep and hetmerge.search's adaptive rounds both run through.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from .merging import check_lam, merge_items, merge_tensor, resolve

__all__ = ["SweepResult", "sweep", "barrier", "lam_star", "recompute_bn"]


@dataclass
class SweepResult:
    """lambdas, loss, acc: [K] (base-domain data; loss is the mean per sample, acc in [0, 1]).
    barrier: max_λ [L(λ) - ((1-λ)·L(0) + λ·L(1))] on the base-domain data.
    lam_star: largest λ such that every swept λ' <= λ keeps base-domain accuracy within `tol`
    of the base's (λ = 0).
    target_*: the same on target-domain data, when given.
    bn_reset: whether BatchNorm statistics were re-estimated for each λ.
    repaired: whether each λ's merge was REPAIRed (sweep(repair=...)).
    search: "grid" (every λ asked for) or "adaptive" (hetmerge.search: lambdas are the λ's it
    evaluated); n_evals: merged models evaluated (each on all the data given), endpoints included.
    """
    lambdas: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor
    barrier: float
    lam_star: float
    target_loss: torch.Tensor | None = None
    target_acc: torch.Tensor | None = None
    target_barrier: float | None = None
    bn_reset: bool = False
    tol: float = 0.01
    timings: dict = field(default_factory=dict)
    repaired: bool = False
    search: str = "grid"
    n_evals: int = 0


def barrier(lambdas: torch.Tensor, loss: torch.Tensor, loss0: float, loss1: float) -> float:
    """max_λ [L(λ) - ((1-λ)·L(0) + λ·L(1))]."""
    lam = lambdas.double()
    return float((loss.double() - ((1 - lam) * loss0 + lam * loss1)).max())


def lam_star(lambdas: torch.Tensor, acc: torch.Tensor, acc0: float, tol: float) -> float:
    """Largest λ whose accuracy, and that of every smaller swept λ, stays within tol of acc0."""
    order = torch.argsort(lambdas)
    best = 0.0
    for i in order.tolist():
        if float(acc[i]) < acc0 - tol - 1e-12:
            break
        best = float(lambdas[i])
    return best


def _batches(data, batch_size: int | None):
    """(X, y) tensors, or any iterable of (X, y) batches (a DataLoader)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        X, y = data
        if batch_size is None or batch_size >= len(X):
            yield X, y
        else:
            for i in range(0, len(X), batch_size):
                yield X[i:i + batch_size], y[i:i + batch_size]
    else:
        for batch in data:
            yield batch[0], batch[1]


def _has_bn(m: nn.Module) -> bool:
    return any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


@torch.no_grad()
def _reestimate_bn(template: nn.Module, params_k: dict, bn_data, batch_size) -> dict[str, torch.Tensor]:
    """Running statistics of the model with weights `params_k`, recomputed on `bn_data`
    (cumulative average over the batches, as torch does with momentum=None)."""
    m = copy.deepcopy(template)
    m.load_state_dict(params_k, strict=False)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    for X, _ in _batches(bn_data, batch_size):
        m(X)
    return {k: v for k, v in m.state_dict().items() if "running_" in k}


def recompute_bn(model: nn.Module, data, batch_size: int | None = None) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are re-estimated on `data`."""
    m = copy.deepcopy(model)
    m.load_state_dict(_reestimate_bn(model, model.state_dict(), data, batch_size), strict=False)
    return m.train(model.training)


class _Mix(nn.Module):
    """A Linear/Conv evaluated at merging factor `lam` from its two ends, by linearity:
    f(x; (1-λ)·A + λ·B~) = (1-λ)·f(x; A) + λ·f(x; B~). Under vmap over `lam` with a shared input x,
    the two end calls do not depend on λ and run once for all K factors instead of K times."""

    def __init__(self, mod: nn.Module, a_w, a_b, b_w, b_b):
        super().__init__()
        self.mod = mod
        self.register_buffer("a_w", a_w)
        self.register_buffer("b_w", b_w)
        self.register_buffer("a_b", a_b)
        self.register_buffer("b_b", b_b)
        self.register_buffer("lam", torch.zeros((), dtype=a_w.dtype))

    def _f(self, x, w, b):
        if isinstance(self.mod, nn.Linear):
            return F.linear(x, w, b)
        return self.mod._conv_forward(x, w, b)

    def forward(self, x):
        # one fused pass over the [K, N, out] result (lerp: a + λ·(b - a))
        return torch.lerp(self._f(x, self.a_w, self.a_b), self._f(x, self.b_w, self.b_b), self.lam)


def _input_layers(base: nn.Module, pairing) -> dict[str, list[str]]:
    """Paired Linear/Conv layers that read the model input: {module path: [paired keys]}.
    (Mixing is exact for any layer; it only saves work where the input is shared by all λ.)"""
    mods = dict(base.named_modules())
    out = {}
    for pp in pairing.params:
        path, _, local = pp.base_key.rpartition(".")
        if local != "weight" or len(pp.links) != 2:
            continue
        if not pairing.links[pp.links[1]].base_group.startswith("input"):
            continue
        m = mods.get(path)
        if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            out[path] = [k for k in (f"{path}.weight", f"{path}.bias")
                         if any(q.base_key == k for q in pairing.params)]
    return out


class _BatchedLinearFn(torch.autograd.Function):
    """F.linear whose vmap over stacked weights is one fused torch.baddbmm (bias added in the
    matmul): vmap's own rule for F.linear runs a bmm and then a separate pass adding the bias over
    the whole [K, N, out] result, which costs a sweep ~15% of its time against a per-λ loop."""

    @staticmethod
    def forward(x, w, b):
        return F.linear(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x, w, b):
        xd, wd, bd = in_dims
        K = info.batch_size
        x = x.movedim(xd, 0) if xd is not None else x.unsqueeze(0).expand(K, *x.shape)
        w = w.movedim(wd, 0) if wd is not None else w.unsqueeze(0).expand(K, *w.shape)
        lead = x.shape[1:-1]
        x3 = x.reshape(K, -1, x.shape[-1])
        if b is None:
            out = torch.bmm(x3, w.transpose(1, 2))
        else:
            b = b.movedim(bd, 0).unsqueeze(1) if bd is not None else b
            out = torch.baddbmm(b, x3, w.transpose(1, 2))
        return out.reshape(K, *lead, w.shape[1]), 0


class _BatchedLinear(nn.Module):
    """Stands in for an nn.Linear (same parameter names, tensors shared) in the sweep's template."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = lin.weight
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return _BatchedLinearFn.apply(x, self.weight, self.bias)


def _swap(tpl: nn.Module, owned: set, path: str, make) -> None:
    """Replace the module at `path` by make(old), shallow-copying the ancestors not yet owned."""
    parent = tpl
    for part in path.split(".")[:-1]:
        child = parent._modules[part]
        if id(child) not in owned:
            child = _shallow(child)
            owned.add(id(child))
            parent._modules[part] = child
        parent = child
    name = path.rpartition(".")[2]
    parent._modules[name] = make(parent._modules[name])


def _template(base, mixed, pairing, maps, sa, sb, fill, linears=()) -> nn.Module:
    """The module the K models run through: `base` itself when nothing changes, otherwise a copy of
    its module structure (tensors shared, not copied) in eval mode with the input layers mixed and
    the Linear layers in `linears` (weights differing across λ) batched as one baddbmm."""
    training = any(m.training for m in base.modules())
    if not mixed and not linears and not training:
        return base   # functional_call leaves the module it runs as it was
    if training:
        memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
        tpl = copy.deepcopy(base, memo).eval()
        owned = {id(m) for m in tpl.modules()}
    else:
        # copy-on-write: only the ancestors of replaced layers are (shallowly) copied; a full
        # structural copy costs more than the whole sweep of a small model
        tpl = _shallow(base)
        owned = {id(tpl)}
    for path in linears:
        _swap(tpl, owned, path, _BatchedLinear)
    items = {it.base_key: it for it in merge_items(pairing, maps, 1.0)}   # λ = 1: the target's end
    for path, keys in mixed.items():
        ends = {}
        for k in (f"{path}.weight", f"{path}.bias"):
            if k in keys:
                ends[k] = merge_tensor(items[k], sa, sb, fill=fill)[0]
            else:   # unpaired (or absent) bias: the base's at both ends
                ends[k] = sa.get(k)
        a_b = sa.get(f"{path}.bias")
        _swap(tpl, owned, path, lambda mod: _Mix(mod, sa[f"{path}.weight"], a_b, ends[f"{path}.weight"],
                                                 ends[f"{path}.bias"]))
    return tpl


@torch.no_grad()
def _act_per_sample(template: nn.Module, x1: torch.Tensor) -> int:
    """Largest number of elements any layer produces per sample: the K models' activations of one
    sample take K times that (probed with one sample through the base-weight template)."""
    widest = [x1[0].numel()]

    def hook(mod, inp, out):
        if torch.is_tensor(out) and out.dim() > 0 and out.shape[0] > 0:
            widest.append(out.numel() // out.shape[0])

    handles = [m.register_forward_hook(hook) for m in template.modules() if not m._modules]
    try:
        template(x1)
    finally:
        for h in handles:
            h.remove()
    return max(widest)


def _shallow(m: nn.Module) -> nn.Module:
    """A copy of `m` sharing its tensors and children but owning its dict of children."""
    c = copy.copy(m)
    c._modules = dict(m._modules)
    return c



def sweep(base: nn.Module, target: nn.Module, res=None, lambdas=None, data: Any = None,
          target_data: Any = None, tol: float = 0.01, fill: str = "zero", layer_map=None,
          loss_fn: Callable | None = None, batch_size: int | None = None, bn_data: Any = None,
          max_chunk_bytes: int = 1 << 29, mix_inputs: bool = True, extrapolate: bool = False,
          max_act_bytes: int = 1 << 24, repair: Any = None, search: str = "grid",
          search_options: dict | None = None, _raw: bool = False) -> SweepResult:
    """Evaluate the merge of `target` into `base` at K merging factors at once.

    res: AlignResult, or None for the unaligned baseline (maps by position).
    lambdas: [K] factors in [0, 1] (default 0, 0.05, ..., 1); outside [0, 1] or NaN: ValueError
      naming the value, unless extrapolate=True (then (1 - λ)·base + λ·target past the endpoints).
    data: base-domain (X, y) tensors or an iterable of (X, y) batches; target_data likewise (optional).
    tol: accuracy tolerance of λ* as a fraction (0.01 = 1 point).
    loss_fn: (logits [N, C], y [N]) -> per-sample losses [N]; default cross-entropy.
    bn_data: when given, BatchNorm running statistics are re-estimated on it for each λ (interpolated
      statistics are wrong for the merged weights); otherwise they are interpolated like the weights.
    max_chunk_bytes: bound on the stacked merged weights held at once.
    max_act_bytes: bound on the widest layer output of the K models for one forward call; batches are
      split into rows that fit (default 16 MiB). Small blocks keep the K-fold activations in cache:
      one forward over all samples of K models streams K·N·width floats through memory per
      layer and runs slower than K separate single-model forwards.
    mix_inputs: run the layers that read the model input once at each end of the path and mix
      (f(x; (1-λ)A + λB) = (1-λ) f(x; A) + λ f(x; B) for Linear/Conv): 2 evaluations instead of K.
    repair: data X (tensor, (X, y) or batches): each λ's merge is REPAIRed on it before evaluation,
      the K models one by one instead of batched (cost: repair.sweep_repaired).
    search: "adaptive" (hetmerge.search): the λ* a grid sweep over `lambdas` gives and the barrier
      over [0, 1] from a few small batches of λ's; the result holds the λ's evaluated.
      search_options: hetmerge.search.adaptive_search's batch, coarse, ftol, verify, max_evals.
    _raw: internal (the adaptive search's evaluator): exactly `lambdas` (no endpoints added) ->
      {"loss", "acc", "target_loss", "target_acc"}: [K] float64 instead of a SweepResult.
    """
    if data is None:
        raise ValueError("sweep: data= (base-domain (X, y) or batches) is required")
    if fill not in ("zero", "base"):
        raise ValueError(f"fill: expected 'zero' or 'base', got {fill!r}")
    t_start = time.perf_counter()
    if lambdas is None:
        lambdas = torch.linspace(0, 1, 21)
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    for i, x in enumerate(lambdas.tolist()):   # the same rule as hm.merge's lam
        check_lam(x, f"lambdas[{i}]", extrapolate)
    # λ grids often arrive as float32 (torch.linspace), where 0.1 is 0.10000000149: snap to 1e-6 so
    # λ*, the chosen λ and the report read as written (the change is far below any merge effect)
    lambdas = torch.round(lambdas * 1e6) / 1e6
    if lambdas.numel() == 0:
        raise ValueError("lambdas: must not be empty")
    if search != "grid":   # hetmerge.search, evaluating small batches through the _raw path below
        from types import SimpleNamespace

        from .search import adaptive_sweep
        if res is None:   # pair the layers once (an fx trace), not once per round
            res = SimpleNamespace(**dict(zip(("pairing", "maps"), resolve(base, target, None, layer_map))))
        kw = dict(data=data, target_data=target_data, tol=tol, fill=fill, layer_map=layer_map, loss_fn=loss_fn,
                  batch_size=batch_size, bn_data=bn_data, max_chunk_bytes=max_chunk_bytes,
                  mix_inputs=mix_inputs, max_act_bytes=max_act_bytes, repair=repair)
        found = adaptive_sweep(lambda lam: sweep(base, target, res, lam, _raw=True, **kw), lambdas, tol, search,
                               extrapolate, bn_data is not None and _has_bn(base), **(search_options or {}))
        found.repaired = repair is not None
        return found
    pairing, maps = resolve(base, target, res, layer_map)
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, reduction="none"))

    # the endpoints are needed for the barrier even when not swept
    ends = [] if _raw else [x for x in (0.0, 1.0) if not bool((lambdas == x).any())]
    lam_all = torch.cat([lambdas, torch.tensor(ends, dtype=torch.float64)])
    K = lam_all.numel()

    sa = base.state_dict()
    sb = target.state_dict()
    reset_bn = bn_data is not None and _has_bn(base)
    mixed = {} if reset_bn or not mix_inputs else _input_layers(base, pairing)
    items = {it.base_key: it for it in merge_items(pairing, maps, 1.0)}   # λ per row of lam_all below
    mixed_keys = {k for keys in mixed.values() for k in keys}
    paired = {pp.base_key for pp in pairing.params} - mixed_keys
    linears = [path for path, m in base.named_modules()
               if type(m) is nn.Linear and path not in mixed and f"{path}.weight" in paired]
    template = _template(base, mixed, pairing, maps, sa, sb, fill, linears)
    names = dict(template.named_parameters())
    names.update(dict(template.named_buffers()))
    # float tensors the K models differ in; everything else is shared (in_dims=None)
    fixed = {k: v for k, v in names.items() if k not in paired}
    bytes_per_model = sum(sa[k].numel() * sa[k].element_size() for k in paired) or 1
    chunk = max(1, min(K, max_chunk_bytes // bytes_per_model))

    def model_fn(p, x):
        return functional_call(template, {**fixed, **p}, (x,))

    rows_per_call = None   # samples per forward call, fixed from the first batch (_act_per_sample)
    elem = next((v.element_size() for v in sa.values() if v.is_floating_point()), 4)

    domains = [("base", data)] + ([("target", target_data)] if target_data is not None else [])
    sums = {d: (torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64), [0])
            for d, _ in domains}
    t_interp = t_fwd = 0.0
    if repair is not None:   # one model at a time; the batched loop below is skipped
        from .repair import sweep_repaired
        t_interp, t_fwd = sweep_repaired(base, target, pairing, maps, fill, extrapolate, repair, bn_data, lam_all,
                                         domains, sums, loss_fn, lambda dd: _batches(dd, batch_size))
    with torch.no_grad():
        for s in (range(0, K, chunk) if repair is None else ()):
            lam = lam_all[s:s + chunk]
            t0 = time.perf_counter()
            stacked = {}
            for item in items.values():
                if item.base_key in paired:
                    stacked[item.base_key] = merge_tensor(item, sa, sb, lam, fill)
            for path in mixed:
                stacked[f"{path}.lam"] = lam.to(sa[mixed[path][0]].dtype)
            if reset_bn:
                stats = [_reestimate_bn(template, {k: v[i] for k, v in stacked.items()}, bn_data,
                                        batch_size) for i in range(len(lam))]
                for k in stats[0]:
                    stacked[k] = torch.stack([st[k] for st in stats])
                    fixed.pop(k, None)
            t1 = time.perf_counter()
            t_interp += t1 - t0
            batched = vmap(model_fn, in_dims=(0, None))
            for d, dd in domains:
                loss_sum, correct, count = sums[d]
                n_seen = 0
                for X_all, y_all in _batches(dd, batch_size):
                    if rows_per_call is None and len(X_all):
                        per_sample = _act_per_sample(template, X_all[:1]) * elem
                        rows_per_call = max(1, max_act_bytes // (per_sample * len(lam)))
                    for i in range(0, len(X_all), rows_per_call or 1):
                        X, y = X_all[i:i + rows_per_call], y_all[i:i + rows_per_call]
                        logits = batched(stacked, X)                      # [k, n, C]
                        kk, n = logits.shape[0], logits.shape[1]
                        per = loss_fn(logits.reshape(kk * n, -1), y.repeat(kk)).reshape(kk, n)
                        loss_sum[s:s + kk] += per.sum(1).double().cpu()
                        correct[s:s + kk] += (logits.argmax(-1) == y).sum(1).double().cpu()
                        n_seen += n
                count[0] = n_seen
            t_fwd += time.perf_counter() - t1

    if _raw:
        return {f"{'' if d == 'base' else 'target_'}{k}": v for d, _ in domains
                for k, v in (("loss", sums[d][0] / sums[d][2][0]), ("acc", sums[d][1] / sums[d][2][0]))}
    out = {}
    for d, _ in domains:
        loss_sum, correct, count = sums[d]
        loss, acc = loss_sum / count[0], correct / count[0]
        idx0 = int(torch.nonzero(lam_all == 0.0)[0])
        idx1 = int(torch.nonzero(lam_all == 1.0)[0])
        n_user = lambdas.numel()
        out[d] = (loss[:n_user].float(), acc[:n_user].float(),
                  barrier(lambdas, loss[:n_user], float(loss[idx0]), float(loss[idx1])), float(acc[idx0]))
    loss, acc, bar, acc0 = out["base"]
    res_ = SweepResult(lambdas=lambdas, loss=loss, acc=acc, barrier=bar,
                       lam_star=lam_star(lambdas, acc, acc0, tol), bn_reset=reset_bn, tol=tol, n_evals=K,
                       timings={"interpolate": t_interp, "forward": t_fwd,
                                "total": time.perf_counter() - t_start})
    res_.repaired = repair is not None
    if "target" in out:
        res_.target_loss, res_.target_acc, res_.target_barrier, _ = out["target"]
    return res_
