"""Architectures named in plan files: built-in MLP/CNN descriptions, or the user's own ``module:factory``.

A description is one of

    "auto" (the default)                           "sequential" for keys like 0.weight, 2.weight; else "mlp"
    "sequential"                                   any chain of Linear / Conv / BatchNorm layers, rebuilt
                                                   from the tensors (see infer_sequential: ReLU assumed)
    "mlp" / "cnn"                                  built-in, every size inferred from the weights
    {type: mlp, in_dim: 64, widths: [128, 64], out_dim: 10, bn: false}
    {type: cnn, in_ch: 1, channels: [16, 32], out_dim: 10, spatial: [8, 8], bn: true, hidden: null}
    "my_pkg.models:make_net"                       the user's factory, called with no arguments
    "models/net.py:make_net"                       the same from a file (relative to the plan's folder)
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
    root: Path | None = None   # folder a factory's file or module is looked up in (the plan's); None = cwd

    def describe(self) -> str:
        if self.kind == "factory":
            return self.params["factory"]
        if self.kind == "sequential" and "layers" in self.params:
            return "sequential(" + ", ".join(self.params["layers"]) + "; activations assumed ReLU)"
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
        if desc in ("mlp", "cnn", "sequential", "auto"):
            return Arch(desc, {}, where)
        if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", desc) or re.fullmatch(r"[^:]+\.py:[A-Za-z_]\w*", desc):
            return Arch("factory", {"factory": desc}, where)
        raise ArchError(f"{where}: {desc!r} is neither 'mlp', 'cnn' nor 'module:factory' "
                        "(e.g. 'my_pkg.models:make_net' or 'models.py:make_net'), nor 'auto' or 'sequential'")
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


# ---------------------------------------------------------------------------------------------
# "sequential": a chain of Linear / Conv / BatchNorm layers rebuilt from the tensors alone
# ---------------------------------------------------------------------------------------------

_BN_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_HETMERGE_MLP = re.compile(r"(fc\d+|bn\d+|head)\.(weight|bias|running_mean|running_var|num_batches_tracked)")


def looks_sequential(state: Mapping[str, Any]) -> bool:
    """"auto" picks "mlp" for hetmerge's own MLP checkpoints (fc0..fcN, head) and "sequential" otherwise."""
    return not all(_HETMERGE_MLP.fullmatch(k) for k in state)


def _module_order(paths: list[str]) -> list[str]:
    """Module paths in forward order: siblings named by index ("0", "2", "10") sorted as numbers, as
    nn.Sequential runs them (safetensors writers may store tensors in any order); named siblings keep
    the order they came in (a torch state dict's registration order)."""
    tree: dict = {}
    for p in paths:
        node = tree
        for part in p.split("."):
            node = node.setdefault(part, {})
        node[None] = p          # a module with tensors of its own

    def walk(node):
        names = [n for n in node if n is not None]
        if names and all(n.isdigit() for n in names):
            names.sort(key=int)
        out = [node[None]] if None in node else []
        for n in names:
            out += walk(node[n])
        return out
    return walk(tree)


def infer_sequential(state: Mapping[str, Any], where: str = "arch") -> tuple[nn.Module, tuple | None, list[str]]:
    """(module, one input's shape or None, layer descriptions) rebuilt from a state dict's shapes.

    The tensors name the parameterized modules, in the order the model registered them ("0", "2",
    "features.3", ...); what they do not show is assumed, and said in every description:
    - 2-D weight: Linear; 3-D / 4-D weight: Conv1d / Conv2d with stride 1 and padding k // 2
      ("same" size), no pooling; a module with running_mean/running_var: BatchNorm of the layer
      before it;
    - ReLU after every Linear/Conv (after its BatchNorm when it has one), except the last layer;
      nn.Flatten before the first Linear that follows a Conv. Dropout changes nothing in eval mode.
    The result is nested nn.Sequential containers with the modules at their original key paths,
    so the checkpoint's keys load unchanged. Square (or 1-D) inputs are assumed when a Linear
    follows the convolutions: its in_features = channels x spatial size gives the input size.
    """
    mods: "dict[str, dict[str, Any]]" = {}
    for k, v in state.items():
        if "." not in k:
            raise ArchError(f"{where}: cannot infer a layer from key {k!r} (no module path); describe the "
                            "model with module:factory")
        path, name = k.rsplit(".", 1)
        mods.setdefault(path, {})[name] = v
    mods = {p: mods[p] for p in _module_order(list(mods))}
    layers: list[tuple[str, nn.Module, str]] = []      # (path, module, description)
    prev_main, prev_out, conv_dims, n_main = None, None, 0, 0
    for path, t in mods.items():
        shape = {n: tuple(x.shape) for n, x in t.items()}
        if "running_mean" in t or "running_var" in t:
            if set(t) - _BN_KEYS:
                raise ArchError(f"{where}: module {path!r} has {sorted(t)}: not a BatchNorm; use module:factory")
            n = shape.get("running_mean", shape.get("weight"))[0]
            if prev_out is not None and n != prev_out:
                raise ArchError(f"{where}: BatchNorm {path!r} has {n} features but the layer before it has "
                                f"{prev_out} outputs; describe the model with module:factory")
            bn = (nn.BatchNorm2d if conv_dims == 2 and prev_main == "conv" else nn.BatchNorm1d)(
                n, affine="weight" in t)
            layers.append((path, bn, f"{type(bn).__name__}({n})"))
            continue
        if set(t) - {"weight", "bias"} or "weight" not in t:
            raise ArchError(f"{where}: module {path!r} holds {sorted(t)}: not a Linear, Conv or BatchNorm the "
                            "'sequential' architecture can rebuild; describe the model with module:factory")
        w = shape["weight"]
        bias = "bias" in t
        if len(w) == 2:
            if prev_main == "conv":
                if w[1] % prev_out:
                    raise ArchError(f"{where}: Linear {path!r} takes {w[1]} features, not a multiple of the "
                                    f"{prev_out} channels before it; describe the model with module:factory")
                layers.append((path, nn.Flatten(), "Flatten"))
            elif prev_out is not None and w[1] != prev_out:
                raise ArchError(f"{where}: Linear {path!r} takes {w[1]} features but the layer before it gives "
                                f"{prev_out}; describe the model with module:factory")
            layers.append((path, nn.Linear(w[1], w[0], bias=bias), f"Linear({w[1]}→{w[0]})"))
            prev_main = "linear"
        elif len(w) in (3, 4):
            dims = len(w) - 2
            if prev_main == "linear" or (conv_dims and dims != conv_dims) or (prev_out is not None and w[1] != prev_out):
                raise ArchError(f"{where}: Conv {path!r} {w} does not follow the layer before it (grouped "
                                "convs and conv after linear are not inferred); describe the model with module:factory")
            k = w[2:]
            conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(w[1], w[0], k, padding=tuple(x // 2 for x in k), bias=bias)
            layers.append((path, conv, f"Conv{dims}d({w[1]}→{w[0]}, {'x'.join(map(str, k))}, same padding)"))
            prev_main, conv_dims = "conv", dims
        else:
            raise ArchError(f"{where}: module {path!r} has a {len(w)}-D weight {w}: not a Linear or Conv; describe "
                            "the model with module:factory")
        prev_out, n_main = w[0], n_main + 1
    # ReLU after each main layer's block (layer, or layer + BatchNorm), except the last block
    seq: list[tuple[str, nn.Module, str]] = []
    seen_main = 0
    for i, (path, m, desc) in enumerate(layers):
        seq.append((path, m, desc))
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            seen_main += 1
        nxt = layers[i + 1][1] if i + 1 < len(layers) else None
        end_of_block = not isinstance(m, nn.Flatten) and not isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d))
        if end_of_block and seen_main < n_main and not isinstance(m, nn.Flatten):
            seq.append((path, nn.ReLU(), "ReLU"))
    root = nn.Sequential()
    for path, m, _ in seq:
        *parents, leaf = path.split(".")
        cur = root
        for part in parents:
            if part not in cur._modules:
                cur.add_module(part, nn.Sequential())
            cur = cur._modules[part]
        name = leaf if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)) else \
            f"{leaf}_{type(m).__name__.lower()}"   # parameter-free: a name no key uses
        if name in cur._modules:
            raise ArchError(f"{where}: module name {name!r} is taken; describe the model with module:factory")
        cur.add_module(name, m)
    first = layers[0][1] if layers else None
    ex_shape = None
    if isinstance(first, nn.Linear):
        ex_shape = (first.in_features,)
    elif isinstance(first, (nn.Conv1d, nn.Conv2d)):
        lin = next((m for _, m, _ in layers if isinstance(m, nn.Linear)), None)
        c_last = next(m.out_channels for _, m, _ in reversed(layers) if isinstance(m, (nn.Conv1d, nn.Conv2d)))
        if lin is not None:
            size = lin.in_features // c_last
            side = round(size ** 0.5)
            if isinstance(first, nn.Conv1d):
                ex_shape = (first.in_channels, size)
            elif side * side == size:
                ex_shape = (first.in_channels, side, side)
    return root, ex_shape, [d for _, _, d in seq]


def _import_factory(spec: str, where: str, root: Path | None = None):
    mod_name, fn_name = spec.rsplit(":", 1)
    root = root or Path.cwd()
    if mod_name.endswith(".py"):     # a file: relative to the plan's folder
        from importlib.util import module_from_spec, spec_from_file_location

        f = Path(mod_name).expanduser()
        f = f if f.is_absolute() else root / f
        if not f.is_file():
            raise ArchError(f"{where}: factory file {f}: no such file")
        mspec = spec_from_file_location(f"_hetmerge_factory_{abs(hash(str(f.resolve())))}", f)
        mod = module_from_spec(mspec)
        try:
            mspec.loader.exec_module(mod)
        except Exception as exc:
            raise ArchError(f"{where}: cannot import {f}: {type(exc).__name__}: {exc}") from None
    else:
        # the user's own code: a module beside the plan file (or in the current folder) is found
        for folder in (str(Path.cwd()), str(root)):
            if folder not in sys.path:
                sys.path.insert(0, folder)
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
    if arch.kind == "auto":   # resolved once, from the key names: the Arch then describes what was built
        arch.kind = "sequential" if state is not None and looks_sequential(state) else "mlp"
    p = dict(arch.params)
    with torch.device(device):
        if arch.kind == "sequential":
            if state is None:
                raise ArchError(f"{where}: 'sequential' reads every size from the weights; give a weights file")
            m, ex_shape, p["layers"] = infer_sequential(state, where)
        elif arch.kind == "mlp":
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
            fn = _import_factory(p["factory"], where, arch.root)
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
