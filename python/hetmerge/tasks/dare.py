"""DARE (Yu et al. 2024): drop each task-vector entry with probability 1 − density, rescale the
survivors; then sum them ("dare") or run the TIES election on them ("dare_ties")."""
from __future__ import annotations

import torch

from .plumbing import add_scaled, task_vectors
from .registry import TensorContext, register_task_method
from .sparsify import dare_mask, disjoint_merge

RESCALES = ("density", "l1", "none")


def check_options(options: dict) -> None:
    if options["rescale"] not in RESCALES:
        raise ValueError(f"rescale: expected one of {RESCALES}, got {options['rescale']!r}")
    if "normalize" in options and not isinstance(options["normalize"], bool):
        raise TypeError(f"normalize: expected True or False, got {options['normalize']!r}")


def dropped(base: torch.Tensor, experts: list, ctx: TensorContext) -> torch.Tensor:
    """[T, *shape]: each τ_t with entries dropped (seeded per tensor and expert) and the survivors
    rescaled: by 1/density (the DARE paper), "l1": to τ_t's L1 norm (mergekit's rescale), "none"."""
    tau = task_vectors(base, experts)
    d, how = ctx.density, ctx.options["rescale"]
    for t in range(len(experts)):
        x = tau[t]
        before = x.abs().sum() if how == "l1" else None
        x.mul_(dare_mask(x.shape, d, ctx.seed, ctx.key, t, x.device))
        if how == "density":
            x.div_(d)
        elif how == "l1":
            after = x.abs().sum()
            if before > 1e-7 and after > 1e-7:   # mergekit's guard against an all-zero survivor set
                x.mul_(before / after)
    return tau


@register_task_method("dare", uses_density=True, options={"rescale": "density"}, check=check_options)
def dare(base: torch.Tensor, experts: list, ctx: TensorContext) -> torch.Tensor:
    """θ_0 + scale · Σ_t drop(τ_t)/density."""
    tau = dropped(base, experts, ctx)
    return add_scaled(base, list(tau), [ctx.scale] * len(experts))


@register_task_method("dare_ties", uses_density=True, options={"rescale": "density", "normalize": True},
                      check=check_options)
def dare_ties(base: torch.Tensor, experts: list, ctx: TensorContext) -> torch.Tensor:
    """θ_0 + scale · TIES election over drop(τ_t)/density (normalize=False: sum, mergekit's default)."""
    return add_scaled(base, [disjoint_merge(dropped(base, experts, ctx), ctx.options["normalize"])], [ctx.scale])
