"""Shared per-tensor plumbing of multi-task merging: input checks, the walk over the base's state
dict, and the small numeric helpers every method uses (task vectors, the final linear combination,
per-tensor seeds).

    base, experts --check_inputs--> (base state, expert states)
    for each float tensor of the base: handler(base tensor, expert tensors, ctx) -> merged tensor
"""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .. import ops

__all__ = ["state_of", "check_inputs", "check_density", "merge_states", "task_vectors", "add_scaled",
           "work_dtype", "tensor_seed"]


def state_of(m: Any, where: str) -> dict[str, torch.Tensor]:
    """The state dict of a module, or a {name: tensor} mapping as given (detached, not copied)."""
    if isinstance(m, nn.Module):
        return {k: v.detach() for k, v in m.state_dict().items()}
    if isinstance(m, Mapping):
        bad = [k for k, v in m.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{where}: {bad[0]!r} is a {type(m[bad[0]]).__name__}, not a torch.Tensor")
        return {k: v.detach() for k, v in m.items()}
    raise TypeError(f"{where}: expected a torch.nn.Module or a state dict, got {type(m).__name__}")


def check_density(density: Any, method: str, uses_density: bool) -> float | None:
    if not uses_density:
        if density is not None:
            raise ValueError(f"density: method {method!r} keeps every entry and takes no density "
                             f"(got {density!r}); drop it, or use a sparsifying method (ties, dare, dare_ties)")
        return None
    if density is None:
        raise ValueError(f"density: method {method!r} needs density in (0, 1], the fraction of each task "
                         "vector's entries kept")
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density: expected a number in (0, 1], got {density!r}")
    d = float(density)
    if not (0.0 < d <= 1.0):   # also refuses NaN
        raise ValueError(f"density: must be in (0, 1], got {density!r}")
    return d


def check_inputs(base: Any, experts: Any, non_float: str = "error") -> tuple[dict, list[dict]]:
    """(base state, [expert states]) after checking that every expert has the base's keys, shapes and
    float-ness. Integer/bool tensors (step counters) must equal the base's unless non_float="base"."""
    if non_float not in ("error", "base"):
        raise ValueError(f"non_float: expected 'error' or 'base', got {non_float!r}")
    if isinstance(experts, (nn.Module, Mapping, str, bytes)) or not isinstance(experts, Sequence):
        raise TypeError("experts: expected a list of modules or state dicts (one per fine-tuned task), "
                        f"got {type(experts).__name__}")
    if len(experts) == 0:
        raise ValueError("experts: must not be empty; give at least one fine-tuned model")
    sb = state_of(base, "base")
    states = [state_of(e, f"experts[{t}]") for t, e in enumerate(experts)]
    for t, se in enumerate(states):
        missing = [k for k in sb if k not in se]
        extra = [k for k in se if k not in sb]
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has keys the base lacks: {extra[:3]}"
            raise ValueError(f"experts[{t}]: not the base's architecture: it {what}"
                             f"{' ...' if len(missing or extra) > 3 else ''}")
        for k, a in sb.items():
            e = se[k]
            if e.shape != a.shape:
                raise ValueError(f"experts[{t}][{k!r}]: shape {tuple(e.shape)} differs from the base's "
                                 f"{tuple(a.shape)}; multi-task merging needs experts fine-tuned from the base")
            if a.is_floating_point() != e.is_floating_point():
                raise TypeError(f"experts[{t}][{k!r}]: dtype {e.dtype} but the base's is {a.dtype}: "
                                "a float tensor cannot be merged with a non-float one")
            if e.device != a.device:
                raise ValueError(f"experts[{t}][{k!r}]: on {e.device} but the base's is on {a.device}")
            if not a.is_floating_point() and non_float == "error" and not torch.equal(a, e):
                raise ValueError(f"experts[{t}][{k!r}]: non-float tensor ({a.dtype}) differs from the base's and "
                                 "integers cannot be merged; pass non_float='base' to keep the base's value")
    return sb, states


def check_finite(key: str, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
    """NaN/inf would make the magnitude ranking and sign election meaningless and poison any sum."""
    for who, x in [("base", base)] + [(f"experts[{t}]", e) for t, e in enumerate(experts)]:
        # a float32 sum is finite exactly when no entry is NaN/inf, unless huge finite float32/64
        # values overflow it: one read, no mask; the exact check runs only when the sum is not finite
        if x.numel() and bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
            continue
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{who}[{key!r}]: holds non-finite values (NaN/inf); they would poison the merge "
                             "(pass check_finite=False to merge anyway)")


def work_dtype(base: torch.Tensor) -> torch.dtype:
    """Arithmetic dtype: float32 for 16-bit weights (like the native kernels' accumulators), else the base's."""
    return torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype


def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """τ: [T, *base.shape] in work_dtype(base), τ[t] = θ_t − θ_0."""
    wd = work_dtype(base)
    b = base.to(wd)
    out = torch.empty((len(experts), *base.shape), dtype=wd, device=base.device)
    for t, e in enumerate(experts):
        torch.sub(e.to(wd), b, out=out[t])
    return out


def add_scaled(base: torch.Tensor, parts: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """θ_0 + Σ_i coeffs[i]·parts[i] in one ops.weighted_sum pass. Inputs of one dtype go in as they are
    (the kernel accumulates 16-bit ones in float32); mixed dtypes are computed in the widest, so that
    a float32 update is never rounded to 16 bits before it is added. The base comes last: the
    update is summed before it is added, as in θ_0 + s·Σ τ. Returns the widest dtype."""
    dt = base.dtype
    for p in parts:
        dt = torch.promote_types(dt, p.dtype)
    tensors = [x if x.dtype == dt else x.to(dt) for x in [*parts, base]]
    return ops.weighted_sum(tensors, [float(c) for c in coeffs] + [1.0])[0]


def tensor_seed(seed: int, key: str, t: int) -> int:
    """A 63-bit seed for (seed, tensor name, expert index): the same drop mask for a tensor whatever
    the order of the walk or the other tensors; stable across processes (no Python hash())."""
    h = hashlib.blake2b(f"{seed}\x00{key}\x00{t}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def merge_states(sb: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]], method,
                 scale: float, density: float | None, seed: int, options: Mapping[str, Any],
                 check_finite_values: bool = True, progress=None) -> dict[str, torch.Tensor]:
    """{name: merged tensor} for every tensor of the base; non-float tensors are the base's. Tensors
    that share storage in the base (tied embeddings) are merged once and stay equal."""
    from .registry import TensorContext

    out: dict[str, torch.Tensor] = {}
    done: dict[tuple, str] = {}
    for k, a in sb.items():
        if not a.is_floating_point():
            out[k] = a.clone()
            if progress is not None:
                progress(k)
            continue
        tie = (a.device, a.untyped_storage().data_ptr(), a.storage_offset(), tuple(a.shape), a.stride(), a.dtype)
        if a.numel() and tie in done:
            out[k] = out[done[tie]]
            if progress is not None:
                progress(k)
            continue
        ex = [s[k] for s in states]
        if check_finite_values:
            check_finite(k, a, ex)
        ctx = TensorContext(k, scale, density, seed, options)
        with torch.no_grad():
            m = method.handler(a, ex, ctx)
        if m.shape != a.shape:   # a handler bug, not a user error: say which
            raise RuntimeError(f"{method.name}: handler returned shape {tuple(m.shape)} for {k!r} "
                               f"of shape {tuple(a.shape)}")
        out[k] = m.to(a.dtype)
        if a.numel():
            done[tie] = k
        if progress is not None:
            progress(k)
    return out


def new_module(base: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    merged = copy.deepcopy(base)
    merged.load_state_dict(dict(state))
    return merged


def check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a number, got {scale!r}")
    s = float(scale)
    if not math.isfinite(s):
        raise ValueError(f"scale: must be finite, got {scale!r}")
    return s


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    return int(seed)
