"""The options object behind every CLI flag and plan key.

Every field of ``Options`` is also a command-line flag (``--max-iter``), generated from the one
dataclass with its help text, so plan keys and flags cannot drift apart; each value is parsed and
validated by its field's parser, with errors naming the key (and the closest valid one on a typo).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

__all__ = ["PlanError", "Options", "opt", "options_from_mapping", "add_option_flags", "options_from_args"]


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
    repair: Any = opt(None, "REPAIR each merge on this data: every hidden unit gets the interpolated mean and std "
                      "of the two models' (docs/repair.md); digits, mnist1d (their training part), none or a .npz "
                      "with X, y (X_train, y_train if present)", _data, "NAME|NPZ")
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


def unknown_key_error(keys, allowed, where: str) -> PlanError:
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
            raise unknown_key_error([k], by_name, where)
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
