"""Multi-task merging: several experts fine-tuned from one pretrained base into one model.

    hm.merge_tasks(base, experts, "ties", scale=1.0, density=0.2)   # new module, base's architecture
    hm.compress_tasks(base, experts, k)                              # TSV-C: low-rank task vectors

Methods are registered handlers (one file each): task_arithmetic, ties, dare, dare_ties, tsv, and the
input-dependent mass (routing) and neulig (per-sample coefficients), which return a module that
routes or mixes per input. Add one with ``@register_task_method(name)``; see registry.py for the
handler's contract.
"""
from __future__ import annotations

from typing import Any

from . import dare, mass, merge3, neulig, task_arithmetic, ties, tsv  # noqa: F401  (each file registers its method)
from .compress import CompressedTasks, compress_tasks
from .stream import merge_tasks_hf
from .plumbing import check_finite as _check_finite
from .plumbing import check_inputs, check_density, check_scale, check_seed, merge_states, new_module
from .registry import ModuleContext, TaskMethod, TensorContext, get_task_method, register_task_method, task_methods

__all__ = ["merge_tasks", "merge_task_states", "merge_tasks_hf", "resolve_method", "compress_tasks", "CompressedTasks", "register_task_method",
           "task_methods", "get_task_method", "TaskMethod", "TensorContext", "ModuleContext"]


def resolve_method(method: Any, scale, density, seed, method_options: dict, *, for_states: bool = False):
    """(TaskMethod, scale, density, seed, options with defaults) after checking every argument; raises
    before any tensor is touched (the CLI calls it before reading checkpoints). for_states=True: the
    caller needs one state dict, which the input-dependent methods (mass, neulig) do not produce."""
    m = get_task_method(method)
    if for_states and m.returns_module:
        raise ValueError(f"method: {m.name!r} is input-dependent (it routes or mixes per input) and returns a "
                         "module, not one state dict; call hm.merge_tasks(base, experts, "
                         f"{m.name!r}, ...) and use the module it returns")
    d = check_density(density, m.name, m.uses_density)
    stray = [k for k in method_options if k not in m.options]
    if stray:
        valid = sorted(m.options) or "none"
        raise TypeError(f"{stray[0]}: not an option of method {m.name!r} (its options: {valid})")
    opts = {**m.options, **method_options}
    if m.check is not None:
        m.check(opts)
    return m, check_scale(scale), d, check_seed(seed), opts


def merge_task_states(base: Any, experts: Any, method: str, scale: float = 1.0, density: float | None = None,
                      seed: int = 0, *, check_finite: bool = True, non_float: str = "error", progress=None,
                      **method_options) -> dict:
    """merge_tasks on state dicts: {name: merged tensor} (what the CLI writes to a checkpoint)."""
    m, s, d, sd, opts = resolve_method(method, scale, density, seed, method_options, for_states=True)
    sb, states = check_inputs(base, experts, non_float)
    return merge_states(sb, states, m, s, d, sd, opts, check_finite, progress)


def merge_tasks(base, experts, method: str, scale: float = 1.0, density: float | None = None, seed: int = 0,
                *, check_finite: bool = True, non_float: str = "error", **method_options):
    """Merge experts fine-tuned from `base` into one model with the base's architecture.

    For every float tensor, with task vectors τ_t = θ_t − θ_0:
      task_arithmetic  θ_0 + scale · Σ_t τ_t
      ties             θ_0 + scale · (mean of the entries that agree with the elected sign), after
                       keeping each τ_t's max(1, int(density·n)) largest magnitudes (per tensor);
                       option normalize=False sums them instead of averaging
      dare             θ_0 + scale · Σ_t mask_t⊙τ_t / density, mask_t ~ Bernoulli(density), seeded
                       per (seed, tensor, expert); option rescale="density" | "l1" | "none"
      dare_ties        the DARE drop, then the TIES election (options rescale, normalize)
      tsv              per matrix: each task's top ⌊min(m, n)/T⌋ singular components (option rank),
                       stacked U, V orthogonalised by their polar factors, θ_0 + scale · U⊥ diag(σ) V⊥ᵀ;
                       1-D tensors by task arithmetic
      mass             returns a MassModel: routes each input to the task whose rank-k input subspace
                       (at option layer) explains its features best, then runs θ_0 + scale · Σ_selected
                       rank-k τ_t (options rank, layer, top_k, trunk_scale); data-free
      neulig           returns a NeuLigModel: a Portland router (linear + softmax over the experts'
                       concatenated outputs) gives per-sample β(x); the model for x is
                       θ_0 + scale · Σ_t β_t(x) τ_t; trained with Adam on option data (options data,
                       loss, alpha, epochs, lr, batch_size, chunk_size)
      merge3           the base with θ_0 + Σ_t c_t τ_t, c searched by CMA-ES (option data: one (X, y)
                       per expert; heads, items, generations, popsize, low, high, x0, sigma,
                       estimator "irt" | "subset" | "full", reference_models, executor); each
                       candidate answers a small item subset and its full-data accuracy is estimated
                       with a 2PL IRT model; .merge3 on the result reports the search (scale stays 1)
    base: nn.Module; experts: list of nn.Modules or state dicts with the base's keys and shapes.
    density: in (0, 1] for ties / dare / dare_ties, None for the others. Non-float tensors (step
    counters) must equal the base's (non_float="base": keep the base's). NaN/inf in any input raise
    unless check_finite=False. Returns a new module; base and experts are left untouched.
    """
    import torch.nn as nn

    if not isinstance(base, nn.Module):
        raise TypeError(f"base: expected a torch.nn.Module (use merge_task_states for state dicts), "
                        f"got {type(base).__name__}")
    m, s, d, sd, opts = resolve_method(method, scale, density, seed, method_options)
    if m.returns_module:
        sb, states = check_inputs(base, experts, non_float)
        if check_finite:
            for k, a in sb.items():
                if a.is_floating_point():
                    _check_finite(k, a, [st[k] for st in states])
        return m.handler(base, states, ModuleContext(s, d, sd, opts))
    state = merge_task_states(base, experts, method, scale, density, seed, check_finite=check_finite,
                              non_float=non_float, **method_options)
    return new_module(base, state)
