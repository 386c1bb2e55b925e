"""Activation matching: the cost of a link is the correlation of the hidden activations of both models
on a batch of data -- the same ``ops.cost_matrix`` call, on activations (units × samples).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import ops
from ..pairing import Pairing
from ..spec import PermSpec

__all__ = ["activation_costs"]


def _collect(model: nn.Module, spec: PermSpec, groups: set, X) -> dict[str, torch.Tensor]:
    """Activations [units, samples] entering each group's probe module, on a copy of the model."""
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    acts: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(g, kind):
        def hook(_mod, inp):
            x = inp[0].detach()
            if kind == "conv":
                u = x.transpose(0, 1).reshape(x.shape[1], -1)
            else:
                n = spec.sizes[g]
                u = x.reshape(-1, n, x.shape[-1] // n).permute(1, 0, 2).reshape(n, -1)
            acts[g] = u
        return hook

    for g in groups:
        path, kind = spec.probes[g]
        hooks.append(mods[path].register_forward_pre_hook(hook_for(g, kind)))
    with torch.no_grad():
        m(X)
    for h in hooks:
        h.remove()
    return acts


def _standardize(u: torch.Tensor) -> torch.Tensor:
    u = u - u.mean(1, keepdim=True)
    return u / (u.norm(dim=1, keepdim=True) + 1e-8)


def activation_costs(pairing: Pairing, base: nn.Module, target: nn.Module, bspec: PermSpec,
                     tspec: PermSpec, X) -> dict[str, torch.Tensor]:
    """Correlation cost [n_a, n_b] for every free link whose two groups have probes in their specs
    and whose activations have the same number of samples; other links are left to weight matching."""
    cand = {n: l for n, l in pairing.links.items()
            if l.free and l.base_group in bspec.probes and l.target_group in tspec.probes}
    acts_a = _collect(base, bspec, {l.base_group for l in cand.values()}, X)
    acts_b = _collect(target, tspec, {l.target_group for l in cand.values()}, X)
    out = {}
    for n, l in cand.items():
        ua, ub = acts_a[l.base_group], acts_b[l.target_group]
        if ua.shape[1] != ub.shape[1]:
            continue   # different spatial sizes: no sample-wise correspondence
        out[n] = ops.cost_matrix([(_standardize(ua), _standardize(ub), None, 1)])
    return out
