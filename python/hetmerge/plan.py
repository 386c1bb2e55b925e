"""Plan files (YAML or JSON) and the options object behind every CLI flag.

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

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .architectures import Arch, ArchError, parse_arch

__all__ = ["PlanError", "Options", "ModelRef", "Plan", "load_plan", "read_plan_file", "add_option_flags",
           "options_from_args", "parse_layer_map", "parse_arch_arg"]


class PlanError(ValueError):
    """A plan file or option is invalid; the message names the key."""


# ---------------------------------------------------------------------------------------------
# value parsers: each takes a YAML/JSON value or a command-line string, returns the typed value or
# raises ValueError with a short "expected ..." message (the caller prefixes the key)
# ---------------------------------------------------------------------------------------------

def _int(lo: int | None = None) -> Callable[[Any], int]:
    def parse(v):
        if isinstance(v, bool):
            raise ValueError(f"expected an integer, got {v!r}")
        try:
            x = int(v) if isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) else None
        except ValueError:
            x = None
        if x is None:
            raise ValueError(f"expected an integer, got {v!r}")
        if lo is not None and x < lo:
            raise ValueError(f"expected an integer >= {lo}, got {x}")
        return x
    return parse


def _float(lo: float | None = None, hi: float | None = None) -> Callable[[Any], float]:
    def parse(v):
        if isinstance(v, bool):
            raise ValueError(f"expected a number, got {v!r}")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {v!r}") from None
        if not math.isfinite(x):
            raise ValueError(f"expected a finite number, got {v!r}")
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise ValueError(f"expected a number in [{lo}, {hi}], got {x}")
        return x
    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v):
        if v not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {v!r}")
        return v
    parse.choices = choices   # shown as the flag's metavar
    return parse


def _lam(v):
    """A float in [0, 1], or {layer: float} (CLI: "fc0=0.5,fc1=0.2"; a repeated --lam adds pairs)."""
    if isinstance(v, (list, tuple)):    # repeated --lam flags
        v = ",".join(str(x) for x in v)
    if isinstance(v, str) and "," in v and "=" not in v:
        raise ValueError(f"expected one global λ or layer=λ pairs, got {v!r}")
    if isinstance(v, str) and "=" in v:
        items = [item for item in v.split(",") if item.strip()]
        bad = [item for item in items if "=" not in item]
        if bad:
            raise ValueError(f"expected layer=λ pairs like fc0=0.5,fc1=0.2, got {bad[0]!r} in {v!r}")
        pairs = [tuple(x.strip() for x in item.split("=", 1)) for item in items]
        seen: dict = {}
        for k, x in pairs:
            if k in seen:
                raise ValueError(f"layer {k!r} is given twice ({k}={seen[k]} and {k}={x}); give each layer once")
            seen[k] = x
        v = seen
    if isinstance(v, Mapping):
        out = {}
        for k, x in v.items():
            try:
                out[str(k).strip()] = _float(0.0, 1.0)(x)
            except ValueError as exc:
                raise ValueError(f"layer {k!r}: {exc}") from None
        if not out:
            raise ValueError("expected at least one layer")
        return out
    return _float(0.0, 1.0)(v)


def _lambdas(v):
    """A count K (evenly spaced in [0, 1]) or an explicit list (CLI: "0,0.1,0.5,1")."""
    if isinstance(v, str) and "," in v:
        v = [x for x in v.split(",") if x.strip()]
    if isinstance(v, (list, tuple)):
        xs = [_float(0.0, 1.0)(x) for x in v]
        if not xs:
            raise ValueError("expected a non-empty list")
        dup = sorted({x for x in xs if xs.count(x) > 1})
        if dup:
            raise ValueError(f"λ value(s) {dup} appear more than once in {list(v)}; give each λ once")
        return xs
    k = _int(2)(v)
    return k


def _bool(v):
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "yes", "1", "on"):
        return True
    if str(v).lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _device(v):
    v = str(v)
    if v == "cpu" or v == "cuda" or v.startswith("cuda:"):
        return v
    raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got {v!r}")


def _data(v):
    """'digits', 'mnist1d', 'none', or a .npz file with X and y (optionally X_test, y_test)."""
    if v is None or v == "none":
        return None
    v = str(v)
    if v in ("digits", "mnist1d") or v.endswith(".npz"):
        return v
    raise ValueError(f"expected 'digits', 'mnist1d', 'none' or a .npz file with X and y, got {v!r}")


def opt(default, help: str, parse: Callable[[Any], Any], metavar: str | None = None, plan_only: bool = False):
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar,
                                            "plan_only": plan_only})


@dataclass
class Options:
    """Merge options. Each field is a plan key and a command-line flag (underscores become dashes)."""
    method: str = opt("weight", "alignment method: weight matching, or activation matching on --data",
                      _choice("weight", "activation"))
    objective: str = opt("inner", "weight-matching objective: inner product, or l2 distance (they differ "
                         "only where target units are dropped)", _choice("inner", "l2"))
    restarts: int = opt(1, "random coordinate-descent orders tried; the best objective wins", _int(1), "N")
    max_iter: int = opt(100, "maximum alignment sweeps per restart", _int(0), "N")
    tol: float = opt(1e-9, "stop when a sweep improves the objective by less than this (relative)",
                     _float(0.0), "X")
    seed: int = opt(0, "seed of the coordinate-descent order", _int(0), "N")
    lam: Any = opt(0.5, "merging factor λ in [0, 1] (0 = base), or per layer: fc0=0.5,fc1=0.2 "
                   "(unlisted layers keep the base's weights)", _lam, "λ")
    fill: str = opt("zero", "padded target units: zero, or keep the base's value", _choice("zero", "base"))
    lambdas: Any = opt(21, "λ values swept: a count K (evenly spaced in [0, 1]) or a list 0,0.1,...",
                       _lambdas, "K|LIST")
    acc_tol: float = opt(0.01, "λ*: largest λ whose base-domain accuracy stays within this of the base's",
                         _float(0.0, 1.0), "X")
    data: Any = opt(None, "evaluation data (sweep, activation matching): digits, mnist1d, none or a .npz "
                    "with X, y", _data, "NAME|NPZ")
    target_data: Any = opt(None, "target-domain data for the sweep (same forms as --data)", _data, "NAME|NPZ")
    batch_size: int = opt(2048, "evaluation batch size", _int(1), "N")
    device: str = opt("cpu", "device for alignment and sweeps: cpu, cuda, cuda:N", _device)
    allow_nonfinite: bool = opt(False, "accept weights holding NaN or ±inf (refused by default: they poison the "
                                "alignment and the merge)", _bool)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_field(f: dataclasses.Field, value: Any, where: str) -> Any:
    try:
        return f.metadata["parse"](value)
    except ValueError as exc:
        raise PlanError(f"{where}: {exc}") from None


def _unknown(keys, allowed, where: str) -> PlanError:
    parts = []
    for k in keys:
        m = difflib.get_close_matches(str(k), [str(a) for a in allowed], 1)
        parts.append(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else ""))
    return PlanError(f"{where}: unknown key(s) {', '.join(parts)}; allowed: {sorted(allowed)}")


def options_from_mapping(d: Mapping[str, Any], where: str = "plan") -> Options:
    by_name = {f.name: f for f in fields(Options)}
    kwargs = {}
    for k, v in d.items():
        if k not in by_name:
            raise _unknown([k], by_name, where)
        kwargs[k] = _parse_field(by_name[k], v, f"{where}.{k}" if where != "plan" else k)
    return Options(**kwargs)


# ---------------------------------------------------------------------------------------------
# command-line flags generated from Options
# ---------------------------------------------------------------------------------------------

def add_option_flags(parser, only: list[str] | None = None) -> None:
    """One flag per Options field (or the listed ones): --max-iter N, with the field's help and the
    default shown. Values stay strings here; they are parsed with the plan's own validators."""
    group = parser.add_argument_group("merge options (also plan-file keys; flags win over the plan)")
    for f in fields(Options):
        if only is not None and f.name not in only:
            continue
        default = f.default
        shown = default if not isinstance(default, str) else repr(default)
        flag, dest, parse = "--" + f.name.replace("_", "-"), f"opt_{f.name}", f.metadata["parse"]
        if parse is _bool:      # a switch: --allow-nonfinite
            group.add_argument(flag, dest=dest, action="store_const", const=True, default=None,
                               help=f"{f.metadata['help']} (default: off)")
            continue
        group.add_argument(flag, dest=dest, default=None,
                           # repeated --lam flags add layer=λ pairs (a repeated layer is an error)
                           action="append" if parse is _lam else "store",
                           metavar=f.metadata.get("metavar") or ("{" + ",".join(parse.choices) + "}"
                                                                 if hasattr(parse, "choices") else f.name.upper()),
                           help=f"{f.metadata['help']} (default: {shown})")


def options_from_args(args) -> dict[str, Any]:
    """{field: raw string} for the option flags given on the command line."""
    out = {f.name: getattr(args, f"opt_{f.name}") for f in fields(Options)
           if getattr(args, f"opt_{f.name}", None) is not None}
    if isinstance(out.get("lam"), list):
        out["lam"] = ",".join(out["lam"])
    return out


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
_PATH_OPTIONS = ("data", "target_data")     # option keys whose value may be a file
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
        raise _unknown(sorted(unknown), _MODEL_KEYS, where)
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
        raise _unknown(unknown, _PLAN_KEYS | opt_names, "plan")

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
