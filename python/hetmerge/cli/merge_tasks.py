"""`hetmerge merge-tasks BASE EXPERT... --method ties --density 0.5 -o OUT`: a thin wrapper over
hm.tasks.merge_task_states (multi-task merging of experts fine-tuned from one base). The method and
its options are validated before any checkpoint is read; exit codes as in hetmerge.cli.

A plan file (`--plan FILE`, YAML or JSON) holds the same settings; flags override it, and paths in
it are relative to the plan's folder:

    base: base.safetensors
    experts: [rotate.safetensors, mirror.safetensors]
    method: ties
    density: 0.3
    scale: 1.0
    output: merged.safetensors
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .models import load_model
from .outputs import check_output
from .parser_common import EPILOG, common_args, layout_args
from .ui import EXIT_OK, UI, IncompatibleError

__all__ = ["cmd_merge_tasks", "add_parser"]

# flags that map to method options; None = not given, so a method refuses only what was asked for
_OPTION_FLAGS = ("normalize", "rescale", "rank")
# plan keys: their flag's dest, and the default when neither the plan nor a flag gives one
_PLAN_DEFAULTS = {"method": None, "scale": 1.0, "density": None, "seed": 0, "normalize": None, "rescale": None,
                  "rank": None, "non_float": "error", "arch": None, "sub_key": None, "key_prefix": None,
                  "allow_nonfinite": False, "format": None, "output": "merged.safetensors"}
_PLAN_PATHS = ("base", "experts", "output")


def _apply_plan(args) -> None:
    """Fill every setting the command line left unset from --plan (if any), then from the defaults."""
    from ..plan import PlanError, read_plan_file
    from ..options import unknown_key_error

    plan: dict = {}
    if args.plan:
        plan = read_plan_file(args.plan)
        root = Path(args.plan).resolve().parent
        allowed = set(_PLAN_DEFAULTS) | {"base", "experts"}
        unknown = [k for k in plan if k not in allowed]
        if unknown:
            raise unknown_key_error(unknown, allowed, f"plan {args.plan}")
        for k in _PLAN_PATHS:
            if k not in plan:
                continue
            v = plan[k]
            if k == "experts":
                if not isinstance(v, list) or not v or not all(isinstance(e, str) for e in v):
                    raise PlanError(f"plan {args.plan}: experts must be a non-empty list of checkpoint paths")
                plan[k] = [str(root / e) for e in v]
            elif not isinstance(v, str):
                raise PlanError(f"plan {args.plan}: {k} must be a path, got {v!r}")
            else:
                plan[k] = str(root / v)
    if args.base is None:
        args.base = plan.get("base")
    if not args.experts:
        args.experts = plan.get("experts") or []
    if args.base is None or not args.experts:
        raise PlanError("merge-tasks: give BASE and at least one EXPERT, on the command line or as base/experts "
                        "in --plan")
    for k, default in _PLAN_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, plan.get(k, default))
    if args.method is None:
        raise PlanError("merge-tasks: --method (or method in --plan) is required")
    for k, kind in (("scale", (int, float)), ("density", (int, float)), ("seed", int), ("rank", int),
                    ("normalize", bool), ("allow_nonfinite", bool)):
        v = getattr(args, k)
        if v is not None and (isinstance(v, bool) != (kind is bool) or not isinstance(v, kind)):
            raise PlanError(f"plan {args.plan}: {k} must be {'a number' if kind != int and kind != bool else kind.__name__}, "
                            f"got {v!r}")


def _method_options(args) -> dict:
    return {k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k) is not None}


def cmd_merge_tasks(args, ui: UI) -> int:
    from ..architectures import parse_arch
    from ..checkpoint import save_state
    from ..plan import ModelRef, PlanError, parse_arch_arg
    from ..tasks import resolve_method, merge_task_states

    _apply_plan(args)
    opts = _method_options(args)
    try:   # the plan is checked before the heavy work
        resolve_method(args.method, args.scale, args.density, args.seed, opts, for_states=True)
    except (TypeError, ValueError) as exc:
        raise PlanError(str(exc)) from None
    out = Path(args.output)
    paths = [Path(args.base)] + [Path(e) for e in args.experts]
    if paths[0].is_dir():
        return _merge_tasks_dirs(args, ui, paths, out, opts)
    fmt = args.format or ("torch" if out.suffix.lower() in (".pt", ".pth", ".bin") else "safetensors")
    for role, p in zip(["base"] + [f"expert {i}" for i in range(len(args.experts))], paths):
        if not p.exists():
            raise FileNotFoundError(f"{role}: {p}: no such file")
    check_output(out, [("base", paths[0])] + [(f"expert {i}", p) for i, p in enumerate(paths[1:])])
    arch = parse_arch(parse_arch_arg(args.arch) if args.arch else "auto")
    fin = {"check_finite": True, "allow_nonfinite": args.allow_nonfinite, "ui": ui}
    t0 = time.perf_counter()
    base, _ = load_model(ModelRef(arch, paths[0], args.sub_key, args.key_prefix), "base", **fin)
    experts = [load_model(ModelRef(arch, p, args.sub_key, args.key_prefix), f"experts[{i}]", **fin)[0]
               for i, p in enumerate(paths[1:])]
    n = len(base.state_dict())
    bar = ui.bar(total=n, desc=args.method, unit="tensor")
    try:
        state = merge_task_states(base, experts, args.method, args.scale, args.density, args.seed,
                                  check_finite=not args.allow_nonfinite, non_float=args.non_float,
                                  progress=lambda k: bar.update(1), **opts)
    except (TypeError, ValueError) as exc:   # architectures, keys, shapes, dtypes of the inputs
        raise IncompatibleError(str(exc)) from None
    finally:
        bar.close()
    meta = {"created_by": "hetmerge merge-tasks", "base": str(paths[0]),
            "experts": json.dumps([str(p) for p in paths[1:]]), "method": args.method,
            "scale": repr(args.scale), "density": repr(args.density), "seed": str(args.seed),
            "options": json.dumps(opts)}
    save_state(state, out, format=fmt, metadata=meta if fmt == "safetensors" else None)
    extra = "".join(f", {k}={v}" for k, v in [("density", args.density), *opts.items()] if v is not None)
    ui.out(f"merged {len(experts)} experts into {paths[0].name} with {args.method} (scale={args.scale}{extra}, "
           f"seed={args.seed}, {time.perf_counter() - t0:.2f} s): the result has the base's architecture")
    ui.out(f"wrote {out} ({fmt})")
    return EXIT_OK


def _merge_tasks_dirs(args, ui: UI, paths: list[Path], out: Path, opts: dict) -> int:
    """Hugging Face directories: streamed tensor by tensor (hm.tasks.merge_tasks_hf)."""
    from ..hf import HFError, HFState
    from ..tasks import merge_tasks_hf

    for i, p in enumerate(paths[1:]):
        if not p.is_dir():
            raise FileNotFoundError(f"expert {i}: {p}: not a Hugging Face directory (the base is one)")
    check_output(out, [("base", paths[0])] + [(f"expert {i}", p) for i, p in enumerate(paths[1:])],
                 "output folder", folder=True)
    t0 = time.perf_counter()
    bar = ui.bar(total=len(HFState(paths[0]).meta()), desc=args.method, unit="tensor")
    try:
        merge_tasks_hf(paths[0], paths[1:], out, args.method, args.scale, args.density, args.seed,
                       check_finite=not args.allow_nonfinite, non_float=args.non_float,
                       progress=lambda *_: bar.update(1), **opts)
    except HFError:     # files: missing shards, unreadable checkpoints (exit 3)
        raise
    except ValueError as exc:   # architectures, shapes, values of the inputs (exit 4)
        raise IncompatibleError(str(exc)) from None
    finally:
        bar.close()
    ui.out(f"merged {len(paths) - 1} expert directories into {paths[0]} with {args.method} "
           f"({time.perf_counter() - t0:.2f} s, streamed tensor by tensor)")
    ui.out(f"wrote {out}/")
    return EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    from ..tasks import task_methods

    p = sub.add_parser("merge-tasks", help="merge experts fine-tuned from BASE into one model (task arithmetic, "
                       "TIES, DARE, TSV)", description="Multi-task merging: every float tensor becomes "
                       "θ_0 + scale · (the method's combination of the task vectors θ_t − θ_0). "
                       "Methods and options: docs/merge_tasks.md.", epilog=EPILOG)
    p.add_argument("base", nargs="?", metavar="BASE", help="the pretrained base checkpoint (.safetensors or .pt)")
    p.add_argument("experts", nargs="*", metavar="EXPERT", help="checkpoints fine-tuned from BASE (same architecture)")
    p.add_argument("--plan", metavar="FILE", help="plan file (YAML or JSON) with base, experts, method and options; "
                   "flags override it")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="output checkpoint; .pt/.pth/.bin -> PyTorch, else safetensors (default: merged.safetensors)")
    p.add_argument("--format", choices=["safetensors", "torch"], default=None, help="override the suffix")
    g = p.add_argument_group("method")
    g.add_argument("--method", metavar="NAME", help=f"one of {', '.join(task_methods(state_only=True))} "
                   "(mass and neulig are input-dependent modules: Python API only)")
    g.add_argument("--scale", type=float, default=None, help="factor on the merged task vector (default: 1.0)")
    g.add_argument("--density", type=float, default=None,
                   help="fraction of each task vector kept, in (0, 1]: ties, dare, dare_ties (required there)")
    g.add_argument("--seed", type=int, default=None, help="seed of the DARE drop masks (default: 0)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="ties, dare_ties: average the agreeing entries (default) or sum them (--no-normalize)")
    g.add_argument("--rescale", choices=["density", "l1", "none"], default=None,
                   help="dare, dare_ties: rescale survivors by 1/density (default), to the L1 norm (mergekit), or not")
    g.add_argument("--rank", type=int, default=None, help="tsv: singular components kept per task "
                   "(default: min(m, n) / number of experts)")
    g.add_argument("--non-float", choices=["error", "base"], default=None,
                   help="integer tensors that differ from the base's: refuse (default) or keep the base's")
    m = p.add_argument_group("models")
    m.add_argument("--arch", metavar="DESC", help="architecture of all models (as for hetmerge merge; default: auto)")
    layout_args(m)
    m.add_argument("--allow-nonfinite", action="store_true", default=None, help="merge weights holding NaN/inf anyway")
    common_args(p)
    p.set_defaults(func=cmd_merge_tasks)
    return p
