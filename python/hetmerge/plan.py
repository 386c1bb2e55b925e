"""Plan files (YAML or JSON): the two models, the layer map and the options (hetmerge.options).

A plan names the two models and how to merge them:

    base:   {arch: mlp, weights: base.safetensors}
    target: {arch: {type: mlp}, weights: target.pt}
    layer_map: {fc0: fc0, fc1: fc2}       # base layer -> target layer; default: shallow to shallow
    lam: 0.3                              # or per layer: {fc0: 0.5, fc1: 0.2}
    method: weight
    restarts: 4                           # ... any field of Options, at the top level

Every field of ``Options`` is also a command-line flag (``--max-iter``), generated from the one
dataclass with its help text, so plan keys and flags cannot drift apart; flags override the plan.
``load_plan`` validates everything before any heavy work and names the offending key.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .architectures import Arch, ArchError, parse_arch
from .options import (Options, PlanError, add_option_flags, options_from_args, options_from_mapping,
                      unknown_key_error)

__all__ = ["PlanError", "Options", "ModelRef", "Plan", "load_plan", "read_plan_file", "add_option_flags",
           "options_from_args", "parse_layer_map", "parse_arch_arg"]

# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelRef:
    arch: Arch
    weights: Path | None
    sub_key: str | None = None      # entry of a training checkpoint holding the state dict
    key_prefix: str | None = None   # prefix stripped from every key; None = auto (checkpoint.strip_prefix)


@dataclass
class Plan:
    base: ModelRef
    target: ModelRef
    layer_map: dict | None
    options: Options
    alignment: Path | None = None
    path: Path | None = None

    def to_dict(self) -> dict:
        def ref(m: ModelRef):
            return {"arch": m.arch.params, "weights": str(m.weights) if m.weights else None,
                    "sub_key": m.sub_key, "key_prefix": m.key_prefix}
        return {"base": ref(self.base), "target": ref(self.target), "layer_map": self.layer_map,
                "alignment": str(self.alignment) if self.alignment else None, **self.options.to_dict()}


_MODEL_KEYS = {"arch", "weights", "sub_key", "key_prefix"}
_PATH_OPTIONS = ("data", "target_data", "repair")     # option keys whose value may be a file
_PLAN_KEYS = {"base", "target", "layer_map", "alignment"}


def read_plan_file(path: str | os.PathLike) -> dict:
    """The raw mapping in a YAML or JSON plan file (JSON by content or .json suffix)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"plan {p}: no such file")
    text = p.read_text()
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, p))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan {p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise PlanError(f"plan {p}: reading YAML needs PyYAML (pip install pyyaml), or write the plan "
                            "as JSON") from None
        try:
            data = yaml.load(text, Loader=_strict_yaml_loader(p))   # SafeLoader: no Python objects either
        except yaml.YAMLError as exc:
            raise PlanError(f"plan {p}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PlanError(f"plan {p}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def _no_duplicates(pairs, p: Path) -> dict:
    """A mapping from (key, value) pairs; a key given twice is an error (YAML and JSON readers would
    silently keep the last one: `lam: {fc0: 0.2, fc0: 0.3}` merging at 0.3 unannounced)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise PlanError(f"plan {p}: key {k!r} is given twice ({out[k]!r} and {v!r}); give it once")
        out[k] = v
    return out


def _strict_yaml_loader(p: Path):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        return _no_duplicates([(loader.construct_object(k, deep=deep), loader.construct_object(v, deep=deep))
                               for k, v in node.value], p)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def parse_layer_map(v: Any, where: str = "layer_map") -> dict | None:
    """{base layer: target layer} as strings; CLI form "fc0=fc0,fc1=fc2".

    Keys stay strings here: "2" is the layer named 2 (nn.Sequential), "#2" the layer at position 2.
    Which layer a key designates is decided against the models by spec.resolve_layer, the one
    resolver of layer maps and per-layer λ (a YAML int key 2 is the name "2" as well)."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = dict(item.split("=", 1) for item in v.split(",") if item.strip())
        except ValueError:
            raise PlanError(f"{where}: expected base=target pairs like fc0=fc0,fc1=fc2, got {v!r}") from None
    if isinstance(v, list):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in v):
            raise PlanError(f"{where}: a list layer map holds [base, target] pairs")
        v = dict((a, b) for a, b in v)
    if not isinstance(v, Mapping):
        raise PlanError(f"{where}: expected a mapping base layer -> target layer, got {type(v).__name__}")

    def norm(x):
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise PlanError(f"{where}: layer {x!r} must be a layer name or '#N' (a position)")
        x = str(x).strip()
        if not x:
            raise PlanError(f"{where}: empty layer name")
        if x.startswith("#") and not x[1:].strip().isdigit():
            raise PlanError(f"{where}: {x!r}: a position is '#' and a number, like '#2'")
        return x
    out = {norm(k): norm(t) for k, t in v.items()}
    if len(set(out.values())) != len(out):
        dup = sorted({str(t) for t in out.values() if list(out.values()).count(t) > 1})
        raise PlanError(f"{where}: target layer(s) {dup} are paired with more than one base layer")
    return out


def parse_arch_arg(v: str) -> Any:
    """--arch value: a name, module:factory, or an inline JSON/YAML mapping."""
    s = v.strip()
    if s.startswith("{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            import yaml
            return yaml.safe_load(s)
    return s


def _model_ref(d: Any, where: str, root: Path) -> ModelRef:
    if isinstance(d, str):
        d = {"weights": d}
    if not isinstance(d, Mapping):
        raise PlanError(f"{where}: expected a mapping with 'arch' and 'weights', got {type(d).__name__}")
    unknown = set(d) - _MODEL_KEYS
    if unknown:
        raise unknown_key_error(sorted(unknown), _MODEL_KEYS, where)
    try:
        arch = parse_arch(d.get("arch", "auto"), f"{where}.arch")
    except ArchError as exc:
        raise PlanError(str(exc)) from None
    arch.root = root     # a factory given as a file or a module beside the plan is found from there
    for k in ("sub_key", "key_prefix"):
        if d.get(k) is not None and not isinstance(d[k], str):
            raise PlanError(f"{where}.{k}: expected a string, got {type(d[k]).__name__}")
    w = d.get("weights")
    if w is not None and not isinstance(w, (str, os.PathLike)):
        raise PlanError(f"{where}.weights: expected a file path, got {type(w).__name__}")
    wp = None
    if w is not None:
        wp = Path(w).expanduser()
        if not wp.is_absolute():
            wp = root / wp     # relative to the plan file, so a plan folder can be moved as a whole
    return ModelRef(arch, wp, d.get("sub_key"), d.get("key_prefix"))


def load_plan(raw: Mapping[str, Any] | None = None, path: str | os.PathLike | None = None,
              overrides: Mapping[str, Any] | None = None, need_weights: bool = True) -> Plan:
    """Validate a plan: `raw` (or the file at `path`) with `overrides` (flags) on top.

    overrides may hold option fields and base_weights, target_weights, base_arch, target_arch,
    arch (both), layer_map, alignment, sub_key, key_prefix (both sides). Every path in a plan file
    (weights, alignment, data files, factory files and modules) is relative to the plan's folder;
    paths from flags are relative to the current folder. Raises PlanError naming the key; FileNotFoundError for a
    missing weights file.
    """
    root = Path.cwd()
    if raw is None:
        raw = read_plan_file(path) if path is not None else {}
        if path is not None:
            root = Path(path).resolve().parent
    raw = dict(raw)
    ov = dict(overrides or {})
    opt_names = set(Options.names())
    unknown = [k for k in raw if k not in _PLAN_KEYS | opt_names]
    if unknown:
        raise unknown_key_error(unknown, _PLAN_KEYS | opt_names, "plan")

    models = {}
    for side in ("base", "target"):
        d = raw.get(side, {})
        if isinstance(d, str):
            d = {"weights": d}
        d = dict(d) if isinstance(d, Mapping) else d
        if isinstance(d, dict):
            if ov.get(f"{side}_weights") is not None:
                d["weights"] = str(Path(ov[f"{side}_weights"]).resolve())
            arch = ov.get(f"{side}_arch") or ov.get("arch")
            if arch is not None:
                d["arch"] = parse_arch_arg(arch) if isinstance(arch, str) else arch
            for k in ("sub_key", "key_prefix"):     # flags: both sides
                if ov.get(k) is not None:
                    d[k] = ov[k]
        models[side] = _model_ref(d, side, root)
        if need_weights:
            w = models[side].weights
            if w is None:
                raise PlanError(f"{side}.weights: missing; give it in the plan or as the "
                                f"{'first' if side == 'base' else 'second'} positional argument")
            if not w.exists():
                raise FileNotFoundError(f"{side}.weights: {w}: no such file")

    lm = ov.get("layer_map") if ov.get("layer_map") is not None else raw.get("layer_map")
    layer_map = parse_layer_map(lm)
    al = ov.get("alignment") if ov.get("alignment") is not None else raw.get("alignment")
    alignment = None
    if al is not None:
        alignment = Path(al)
        if not alignment.is_absolute() and ov.get("alignment") is None:
            alignment = root / alignment
        if not alignment.exists():
            raise FileNotFoundError(f"alignment: {alignment}: no such file")

    merged = {k: raw[k] for k in raw if k in opt_names}
    for k in _PATH_OPTIONS:   # a data file named in the plan is relative to the plan, like the weights
        v = merged.get(k)
        if isinstance(v, str) and v.endswith(".npz") and not Path(v).expanduser().is_absolute():
            merged[k] = str(root / v)
    merged.update({k: v for k, v in ov.items() if k in opt_names and v is not None})
    options = options_from_mapping(merged)
    if options.method == "activation" and options.data is None:
        raise PlanError("method: 'activation' needs data (plan key 'data' or --data digits|mnist1d|FILE.npz)")
    positional = any(str(k).startswith("#") for k in [*(options.lam if isinstance(options.lam, dict) else ()),
                                                      *(layer_map or ())])
    # "#N" keys are resolved against the models later (the CLI checks them after pairing)
    if isinstance(options.lam, dict) and layer_map is not None and not positional:
        stray = [k for k in options.lam if k not in layer_map]
        if stray:
            raise PlanError(f"lam: layer(s) {stray} are not in layer_map {sorted(map(str, layer_map))}")
    return Plan(models["base"], models["target"], layer_map, options, alignment,
                Path(path) if path is not None else None)
