"""Transfer of a source's task update into the target's basis, and its LoRA factorization.

For every target block i, its matched source block j and every linear role r both have:

    ΔW_t[i, r] = M_out ΔW_s[j, r] M_in          (maps from basis.fit_map on calibration activations)

Roles the target lacks (e.g. a Llama source's gate into GPT-2) and norm/bias updates are dropped
(LoRA adapts linear weights only). A target module made of several roles (GPT-2's c_attn = q | k | v)
gets its roles' rows stacked, zero where a role received nothing. Each module's update is then
truncated to rank r by SVD: ΔW ≈ B A with B = U_r S_r: [out, r], A = V_rᵀ: [r, in], written with
lora_alpha = r (scaling 1) so that PEFT adds exactly B A x.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .basis import fit_map, record_inputs
from .topology import LINEAR_ROLES, FusionError, Topology

__all__ = ["role_deltas", "transfer_deltas", "module_deltas", "lora_factors"]


def role_deltas(base: nn.Module, ft: nn.Module, topo: Topology, what: str) -> dict[tuple, torch.Tensor]:
    """{(block, role): ΔW = W_ft − W_base [out, in] float64} for every linear role; ft must have the
    base's architecture (same modules and shapes)."""
    out = {}
    for b, roles in enumerate(topo.blocks):
        for r, p in roles.items():
            if r not in LINEAR_ROLES:
                continue
            try:
                w_ft = p.weight(ft)
            except AttributeError as exc:
                raise FusionError(f"fuse: {what}: fine-tuned model has no module {p.module} of its base") from exc
            w_b = p.weight(base)
            if w_ft.shape != w_b.shape:
                raise FusionError(f"fuse: {what}: {p.module} is {tuple(w_ft.shape)} in the fine-tuned model "
                                  f"but {tuple(w_b.shape)} in its base")
            out[(b, r)] = w_ft.detach().double() - w_b.detach().double()
    return out


@dataclass
class MapCache:
    """Calibration activations per model (paired rows, calib.Plan) and fitted maps per (target proj,
    source proj), so that sources sharing a base (or the target) reuse them.

    plans: {id(model): Plan}; outputs: also record each block's residual update (for blocks="cka")."""
    plans: dict
    basis: str
    ridge: float
    outputs: bool = False
    acts: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)

    def inputs(self, model: nn.Module, topo: Topology) -> dict:
        """{module name (or "<module>:out"): activations [N, width]}, row n paired across models."""
        if id(model) not in self.acts:
            plan = self.plans[id(model)]
            x = record_inputs(model, topo, plan.batches, outputs=self.outputs)
            self.acts[id(model)] = (model, {k: plan.rows(v) for k, v in x.items()})   # model kept: id stays unique
        return self.acts[id(model)][1]

    def block_updates(self, model: nn.Module, topo: Topology) -> list[torch.Tensor]:
        """[per block: its residual update, attention output + MLP output, [N, d_model]]."""
        x = self.inputs(model, topo)
        return [x[_need(roles, "o", topo).module + ":out"] + x[_need(roles, "down", topo).module + ":out"]
                for roles in topo.blocks]

    def space(self, model, topo: Topology, block: int, role: str, side: str) -> torch.Tensor:
        """Activations [N, dim] spanning one space of a role (basis.py's table)."""
        x = self.inputs(model, topo)
        roles = topo.blocks[block]
        if side == "in":
            return x[roles[role].module]
        if role in ("o", "down"):
            return x[_need(roles, "norm2", topo).module]
        if role in ("gate", "up"):
            return x[_need(roles, "down", topo).module]
        return x[_need(roles, "norm1", topo).module] @ roles[role].weight(model).detach().double().T

    def pair(self, target, t_topo, i: int, source, s_topo, j: int, role: str):
        """(M_in [in_s, in_t], M_out [out_t, out_s]) for role `role` of target block i, source block j."""
        key = (id(target), i, id(source), j, role)
        if key not in self.maps:
            m_in = fit_map(self.space(target, t_topo, i, role, "in"), self.space(source, s_topo, j, role, "in"),
                           self.basis, self.ridge)
            m_out = fit_map(self.space(source, s_topo, j, role, "out"), self.space(target, t_topo, i, role, "out"),
                            self.basis, self.ridge)
            self.maps[key] = (m_in, m_out)
        return self.maps[key]


def _need(roles: dict, role: str, topo: Topology):
    if role not in roles:
        raise FusionError(f"fuse: a {topo.family} block has no {role!r} module, needed for a basis map")
    return roles[role]


def transfer_deltas(target, t_topo: Topology, source, s_topo: Topology, deltas: dict, pairs: dict,
                    cache: MapCache) -> dict[tuple, torch.Tensor]:
    """{(target block, role): ΔW_t [out_t, in_t]} for the source's role deltas under block `pairs`."""
    out = {}
    for i, j in pairs.items():
        for r, tp in t_topo.blocks[i].items():
            d = deltas.get((j, r))
            if d is None or r not in s_topo.blocks[j] or not torch.any(d):
                continue
            m_in, m_out = cache.pair(target, t_topo, i, source, s_topo, j, r)
            out[(i, r)] = m_out @ d @ m_in
    return out


def module_deltas(target: nn.Module, t_topo: Topology, deltas: dict) -> dict[str, torch.Tensor]:
    """{target module name: ΔW [out, in]} with a fused module's role rows stacked (zeros where a role
    got nothing)."""
    out: dict[str, torch.Tensor] = {}
    for (b, r), d in deltas.items():
        p = t_topo.blocks[b][r]
        if p.module not in out:
            w = target.get_submodule(p.module).weight
            shape = tuple(w.t().shape) if p.conv1d else tuple(w.shape)
            out[p.module] = torch.zeros(shape, dtype=torch.float64)
        if p.rows is None:
            out[p.module] += d
        else:
            out[p.module][p.rows[0]:p.rows[1]] += d
    return out


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [rank columns: out, rank]) with B A the best rank-`rank` approximation of
    delta [out, in] (Eckart–Young); zero columns/rows pad when min(out, in) < rank."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype)
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype)
    a[:k] = vh[:k]
    b[:, :k] = u[:, :k] * s[:k]
    return a, b
