"""Architectures named in plan files: built-in MLP/CNN descriptions, or the user's own ``module:factory``.

A description is one of

    "mlp" / "cnn"                                  built-in, every size inferred from the weights
    {type: mlp, in_dim: 64, widths: [128, 64], out_dim: 10, bn: false}
    {type: cnn, in_ch: 1, channels: [16, 32], out_dim: 10, spatial: [8, 8], bn: true, hidden: null}
    "my_pkg.models:make_net"                       the user's factory, called with no arguments
    {factory: "my_pkg.models:make_net", kwargs: {width: 128}, input_shape: [1, 28, 28]}

Built-in sizes left out are read from the checkpoint's shapes (fc0..fcN, head; conv0..convN), so
``arch: mlp`` is enough for a checkpoint written by hetmerge's own builders. ``build`` returns the
module on the meta device when asked (no memory for weights: enough for inspect and streaming).
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["ArchError", "Arch", "parse_arch", "build"]


class ArchError(ValueError):
    """An architecture description is invalid, or does not match its weights."""


_MLP_KEYS = {"type", "in_dim", "widths", "out_dim", "bn", "dropout"}
_CNN_KEYS = {"type", "in_ch", "channels", "out_dim", "spatial", "bn", "hidden"}
_FACTORY_KEYS = {"factory", "kwargs", "input_shape"}


@dataclass
class Arch:
    """A parsed description. kind: "mlp", "cnn" or "factory"; params: the description's keys."""
    kind: str
    params: dict = field(default_factory=dict)
    where: str = "arch"     # plan key, for messages

    def describe(self) -> str:
        if self.kind == "factory":
            return self.params["factory"]
        return f"{self.kind}(" + ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "type") + ")"


def _check_keys(d: Mapping, allowed: set, where: str):
    unknown = sorted(set(d) - allowed)
    if unknown:
        import difflib
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, allowed, 1)) else repr(u)
                 for u in unknown]
        raise ArchError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {sorted(allowed)}")


def parse_arch(desc: Any, where: str = "arch") -> Arch:
    """Validate a description (see the module docstring); raises ArchError naming `where`."""
    if isinstance(desc, str):
        if desc in ("mlp", "cnn"):
            return Arch(desc, {}, where)
        if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", desc):
            return Arch("factory", {"factory": desc}, where)
        raise ArchError(f"{where}: {desc!r} is neither 'mlp', 'cnn' nor 'module:factory' "
                        "(e.g. 'my_pkg.models:make_net')")
    if not isinstance(desc, Mapping):
        raise ArchError(f"{where}: expected a string or a mapping, got {type(desc).__name__}")
    if "factory" in desc:
        _check_keys(desc, _FACTORY_KEYS, where)
        a = parse_arch(desc["factory"], f"{where}.factory")
        if a.kind != "factory":
            raise ArchError(f"{where}.factory: expected 'module:factory', got {desc['factory']!r}")
        kw = desc.get("kwargs") or {}
        if not isinstance(kw, Mapping):
            raise ArchError(f"{where}.kwargs: expected a mapping, got {type(kw).__name__}")
        ishape = desc.get("input_shape")
        if ishape is not None and (not isinstance(ishape, (list, tuple)) or
                                   not all(isinstance(s, int) and s > 0 for s in ishape)):
            raise ArchError(f"{where}.input_shape: expected a list of positive ints (one sample, no "
                            f"batch axis), got {ishape!r}")
        return Arch("factory", {"factory": desc["factory"], "kwargs": dict(kw), "input_shape": ishape}, where)
    kind = desc.get("type")
    if kind not in ("mlp", "cnn"):
        raise ArchError(f"{where}.type: expected 'mlp' or 'cnn' (or give 'factory'), got {kind!r}")
    _check_keys(desc, _MLP_KEYS if kind == "mlp" else _CNN_KEYS, where)
    p = dict(desc)
    for k in ("in_dim", "out_dim", "in_ch", "hidden"):
        if p.get(k) is not None and (not isinstance(p[k], int) or isinstance(p[k], bool) or p[k] < 1):
            raise ArchError(f"{where}.{k}: expected a positive int, got {p[k]!r}")
    for k in ("widths", "channels", "spatial"):
        v = p.get(k)
        if v is not None and (not isinstance(v, (list, tuple)) or
                              not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)):
            raise ArchError(f"{where}.{k}: expected a list of positive ints, got {v!r}")
    if kind == "cnn" and p.get("spatial") is not None and len(p["spatial"]) not in (1, 2):
        raise ArchError(f"{where}.spatial: expected 1 or 2 sizes (Conv1d / Conv2d), got {p['spatial']!r}")
    return Arch(kind, p, where)


def _indexed(state: Mapping[str, Any], prefix: str) -> list[int]:
    ids = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(rf"{prefix}(\d+)\.weight", k))})
    if ids != list(range(len(ids))):
        raise ArchError(f"weights: layers {prefix}0..{prefix}N are not consecutive: {ids}")
    return ids


def _infer_mlp(p: dict, state: Mapping[str, Any] | None, where: str) -> dict:
    need = [k for k in ("in_dim", "widths", "out_dim") if p.get(k) is None]
    if need and state is None:
        raise ArchError(f"{where}: give {need} or a weights file to read them from")
    if state is not None:
        ids = _indexed(state, "fc")
        if "head.weight" not in state:
            raise ArchError(f"{where}: the weights have no 'head.weight'; an MLP built by hetmerge has "
                            "layers fc0..fcN and head (describe other models with module:factory)")
        widths = [int(state[f"fc{i}.weight"].shape[0]) for i in ids]
        in_dim = int(state["fc0.weight"].shape[1]) if ids else int(state["head.weight"].shape[1])
        inferred = {"in_dim": in_dim, "widths": widths, "out_dim": int(state["head.weight"].shape[0])}
        inferred["bn"] = any(k.startswith("bn") for k in state)
        for k, v in inferred.items():
            if p.get(k) is None:
                p[k] = v
    return p


def _infer_cnn(p: dict, state: Mapping[str, Any] | None, where: str) -> dict:
    if p.get("spatial") is None:
        raise ArchError(f"{where}.spatial: required for a CNN (input size without channels, e.g. [8, 8])")
    need = [k for k in ("in_ch", "channels", "out_dim") if p.get(k) is None]
    if need and state is None:
        raise ArchError(f"{where}: give {need} or a weights file to read them from")
    if state is not None:
        ids = _indexed(state, "conv")
        if not ids or "head.weight" not in state:
            raise ArchError(f"{where}: the weights have no conv0.weight/head.weight; a CNN built by hetmerge "
                            "has layers conv0..convN and head (describe other models with module:factory)")
        inferred = {"in_ch": int(state["conv0.weight"].shape[1]),
                    "channels": [int(state[f"conv{i}.weight"].shape[0]) for i in ids],
                    "out_dim": int(state["head.weight"].shape[0]),
                    "bn": any(k.startswith("bn") for k in state),
                    "hidden": int(state["fc.weight"].shape[0]) if "fc.weight" in state else None}
        for k, v in inferred.items():
            if p.get(k) is None:
                p[k] = v
    return p


def _import_factory(spec: str, where: str):
    mod_name, fn_name = spec.split(":")
    # the user's own code: let a plan run from the project folder find its modules
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ArchError(f"{where}: cannot import module {mod_name!r}: {exc}") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise ArchError(f"{where}: module {mod_name!r} has no callable {fn_name!r}")
    return fn


def build(arch: Arch, state: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
          ) -> tuple[nn.Module, torch.Tensor | None]:
    """(module, example input [2, ...] or None) for `arch`; sizes missing from a built-in description
    are read from `state` (shapes only). device="meta" allocates nothing."""
    from . import models

    where = arch.where
    p = dict(arch.params)
    with torch.device(device):
        if arch.kind == "mlp":
            p = _infer_mlp(p, state, where)
            m = models.mlp(p["in_dim"], p["widths"], p["out_dim"], bn=bool(p.get("bn")),
                           dropout=float(p.get("dropout") or 0.0))
            ex_shape = (p["in_dim"],)
        elif arch.kind == "cnn":
            p = _infer_cnn(p, state, where)
            m = models.cnn(p["in_ch"], p["channels"], p["out_dim"], p["spatial"],
                           bn=bool(p.get("bn", True)), hidden=p.get("hidden"))
            ex_shape = (p["in_ch"], *p["spatial"])
        else:
            fn = _import_factory(p["factory"], where)
            try:
                m = fn(**p.get("kwargs", {}))
            except TypeError as exc:
                sig = ""
                try:
                    sig = str(inspect.signature(fn))
                except (TypeError, ValueError):
                    pass
                raise ArchError(f"{where}: {p['factory']}{sig} rejected kwargs {p.get('kwargs', {})}: "
                                f"{exc}") from None
            if not isinstance(m, nn.Module):
                raise ArchError(f"{where}: {p['factory']} returned a {type(m).__name__}, expected a "
                                "torch.nn.Module")
            ex_shape = tuple(p["input_shape"]) if p.get("input_shape") else None
    arch.params.update({k: v for k, v in p.items() if k not in arch.params})
    ex = None if ex_shape is None or str(device) == "meta" else torch.zeros((2, *ex_shape))
    return m, ex


def check_weights(model: nn.Module, state: Mapping[str, Any], where: str, path: str = "weights") -> list[str]:
    """Raise ArchError when `state` does not fit `model` (missing/unexpected keys, shapes); returns
    the notes worth showing (e.g. integer buffers absent from the file)."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    bad = [(k, tuple(own[k].shape), tuple(state[k].shape)) for k in own
           if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    msgs = []
    if missing:
        msgs.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        msgs.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, a, b in bad[:5]:
        msgs.append(f"{k!r} is {b} in the file but {a} in the architecture")
    if msgs:
        raise ArchError(f"{where}: {path} does not match the architecture: " + "; ".join(msgs))
    return []
