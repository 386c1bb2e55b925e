"""TIES merging (Yadav et al. 2023), per tensor as in mergekit: trim each task vector to its
`density` largest magnitudes, elect a sign per entry, average the kept entries that agree with it."""
from __future__ import annotations

import torch

from .plumbing import add_scaled, task_vectors
from .registry import TensorContext, register_task_method
from .sparsify import disjoint_merge, magnitude_mask


def check_normalize(options: dict) -> None:
    if not isinstance(options["normalize"], bool):
        raise TypeError(f"normalize: expected True or False, got {options['normalize']!r}")


@register_task_method("ties", uses_density=True, options={"normalize": True}, check=check_normalize)
def ties(base: torch.Tensor, experts: list, ctx: TensorContext) -> torch.Tensor:
    """θ_0 + scale · disjoint mean of the top-density magnitudes of each τ_t (normalize=False: their sum)."""
    tau = task_vectors(base, experts)
    for t in range(len(experts)):
        tau[t].mul_(magnitude_mask(tau[t], ctx.density))
    return add_scaled(base, [disjoint_merge(tau, ctx.options["normalize"])], [ctx.scale])
