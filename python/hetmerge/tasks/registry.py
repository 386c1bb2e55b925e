"""The table of multi-task merge methods: name -> handler (STYLE.md, "extend by registration").

A handler merges one tensor: it receives the base tensor, the experts' tensors and a TensorContext
(scale, density, seed, the method's options, the tensor's name) and returns the merged tensor. A new
method is one file with one ``@register_task_method("name")`` handler plus its test.

Input-dependent methods (MASS routing, NeuLig's per-sample coefficients) cannot be one tensor per
name: they register with ``returns_module=True`` and a handler
``handler(base: nn.Module, states: [expert state dicts], ctx: ModuleContext) -> nn.Module`` that
builds the model users call on inputs; merge_task_states refuses them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

__all__ = ["TaskMethod", "TensorContext", "ModuleContext", "register_task_method", "get_task_method", "task_methods"]


@dataclass(frozen=True)
class TensorContext:
    """What a handler knows about the tensor it merges."""
    key: str                      # state-dict name, for error messages and per-tensor seeds
    scale: float
    density: float | None
    seed: int
    options: Mapping[str, Any]    # the method's options, defaults filled in


@dataclass(frozen=True)
class ModuleContext:
    """What a module-building (input-dependent) method knows: the checked arguments of merge_tasks."""
    scale: float
    density: float | None
    seed: int
    options: Mapping[str, Any]    # the method's options, defaults filled in


@dataclass(frozen=True)
class TaskMethod:
    name: str
    handler: Callable[[torch.Tensor, list, TensorContext], torch.Tensor]
    uses_density: bool             # density required (sparsifying methods) or refused (the others)
    options: Mapping[str, Any] = field(default_factory=dict)   # option name -> default
    check: Callable[[dict], None] | None = None                # validates the options once, at the door
    doc: str = ""
    returns_module: bool = False   # handler builds an input-dependent nn.Module (see the module docstring)


_METHODS: dict[str, TaskMethod] = {}


def register_task_method(name: str, *, uses_density: bool = False, options: Mapping[str, Any] | None = None,
                         check: Callable[[dict], None] | None = None, returns_module: bool = False):
    """Decorator: ``@register_task_method("ties", uses_density=True, options={"normalize": True})``
    registers ``handler(base, experts, ctx) -> merged`` under `name` (one name, one handler)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_task_method: name must be a non-empty string, got {name!r}")

    def deco(fn):
        if name in _METHODS and _METHODS[name].handler is not fn:
            raise ValueError(f"register_task_method: {name!r} is already registered by "
                             f"{_METHODS[name].handler.__module__}.{_METHODS[name].handler.__qualname__}")
        _METHODS[name] = TaskMethod(name, fn, uses_density, dict(options or {}), check,
                                    (fn.__doc__ or "").strip().split("\n")[0], returns_module)
        return fn
    return deco


def task_methods(state_only: bool = False) -> list[str]:
    """Registered method names; state_only: just those that give one state dict (the CLI's)."""
    return sorted(n for n, m in _METHODS.items() if not (state_only and m.returns_module))


def get_task_method(name: Any) -> TaskMethod:
    """The registered method `name`; a typo gets the closest valid name suggested."""
    if not isinstance(name, str):
        raise TypeError(f"method: expected a method name (str), got {type(name).__name__}; "
                        f"valid: {task_methods()}")
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"method: unknown multi-task merge method {name!r}{hint} Valid: {task_methods()}. "
                         "Add one with @hetmerge.tasks.register_task_method(name)")
    return _METHODS[name]
