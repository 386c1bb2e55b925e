"""Latent-basis maps between a source's and a target's spaces, in closed form from calibration
activations of both base models on the same tokens.

For a matched role (one projection W: [out, in] per model) each of its two spaces is fitted from
activations that span it (recorded by forward hooks, all positions of the calibration tokens):

    input of every role        its own inputs X: [N, in]
    output of q, k, v          Y = H Wᵀ with H the block's input hidden state (the input of its
                               first norm), no bias: a norm's output X can miss a direction
                               (LayerNorm with zero bias is ⟂ 1), and Y = X Wᵀ would miss its image
    output of o and down       the residual stream: the input of the block's second norm (one
                               residual map per matched block; o's own outputs span only the
                               attention values' subspace)
    output of gate and up      the MLP units: down's inputs (the nonlinearity makes them span the
                               whole width, which up's outputs X Wᵀ, of rank ≤ in, do not)

Two maps per role:

    M_in:  [in_s, in_t]   target input  -> source input,  X_s ≈ X_t M_inᵀ
    M_out: [out_t, out_s] source output -> target output, Y_t ≈ Y_s M_outᵀ

so that a source update ΔW_s maps to ΔW_t = M_out ΔW_s M_in: its effect on the target's input,
read in the source's basis, then written back in the target's (docs/fusion.md).

Kinds: "lstsq" (ridge least squares, any dims), "procrustes" (orthogonal; semi-orthogonal when
dims differ), "permutation" (a generalized permutation from hm.ops.linear_assignment on the
correlation of units: rectangular allowed, unmatched units get zero — hetmerge's zero padding).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .. import ops
from .topology import LINEAR_ROLES, FusionError, Topology

__all__ = ["BASES", "record_inputs", "fit_map"]

BASES = ("lstsq", "procrustes", "permutation")
# ridge of the least squares, relative to the mean eigenvalue of XᵀX: defines the solve for rank-
# deficient X; small, so that directions the data barely excites (GQA heads that attend alike) survive
RIDGE = 1e-8


@contextmanager
def _hooks(model: nn.Module, modules: list[str], outputs: list[str], store: dict):
    """Record (float64, positions flattened) the inputs of `modules` and, under "<name>:out", the
    outputs of `outputs`."""
    hs = []
    for name in modules:
        def hook(mod, args, name=name):
            store.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        hs.append(model.get_submodule(name).register_forward_pre_hook(hook))
    for name in outputs:
        def out_hook(mod, args, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            store.setdefault(name + ":out", []).append(out.detach().reshape(-1, out.shape[-1]).double())
        hs.append(model.get_submodule(name).register_forward_hook(out_hook))
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def record_inputs(model: nn.Module, topo: Topology, ids, batch: int = 8,
                  outputs: bool = False) -> dict[str, torch.Tensor]:
    """{module name: X [P, in] float64}: the inputs of every linear role's module and of each block's
    norms (the residual stream entering the block and between attention and MLP) at every position
    of the calibration tokens. ids: [B, T] (run `batch` rows at a time) or a list of id batches
    [b, T_i] run in order (P = all their positions). outputs=True also records each block's residual
    update: "<o module>:out" and "<down module>:out" (the attention and MLP outputs)."""
    names = sorted({p.module for blk in topo.blocks for r, p in blk.items()
                    if r in LINEAR_ROLES or r in ("norm1", "norm2")})
    outs = sorted({blk[r].module for blk in topo.blocks for r in ("o", "down") if r in blk}) if outputs else []
    batches = [ids[i:i + batch] for i in range(0, ids.shape[0], batch)] if torch.is_tensor(ids) else list(ids)
    store: dict = {}
    with _hooks(model, names, outs, store), torch.no_grad():
        for b in batches:
            model(input_ids=b)
    return {k: torch.cat(v) for k, v in store.items()}


def _lstsq(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_Z |a Z − b|² + ridge·mean eig(aᵀa)·|Z|²: a [N, p], b [N, q] -> Z [p, q] (float64)."""
    g = a.T @ a
    lam = ridge * max(float(g.diagonal().mean()), 1e-30)
    return torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), a.T @ b)


def fit_map(src: torch.Tensor, dst: torch.Tensor, kind: str, ridge: float = RIDGE) -> torch.Tensor:
    """M: [d_dst, d_src] with dst ≈ src Mᵀ, from paired activations src: [N, d_src], dst: [N, d_dst]."""
    if src.shape[0] != dst.shape[0]:
        raise FusionError(f"fit_map: {src.shape[0]} source rows vs {dst.shape[0]} target rows")
    if kind == "lstsq":
        return _lstsq(src, dst, ridge).T
    if kind == "procrustes":
        u, _, vh = torch.linalg.svd(dst.T @ src, full_matrices=False)   # [d_dst, d_src]
        return u @ vh
    if kind == "permutation":
        # correlation of units (centered, unit norm), then the best one-to-one pairing
        def unit(x):
            x = x - x.mean(0)
            return x / x.norm(dim=0).clamp_min(1e-30)
        corr = (unit(dst).T @ unit(src)).float()   # [d_dst, d_src]
        rows, cols = ops.linear_assignment(corr, maximize=True)
        m = torch.zeros(dst.shape[1], src.shape[1], dtype=torch.float64)
        m[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
        return m
    raise FusionError(f"fuse: basis must be one of {BASES}, got {kind!r}")
