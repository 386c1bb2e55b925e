"""`hetmerge assemble`: integrate a zoo of checkpoints into a base one by one (hm.assemble), λ chosen
on a validation split and every step reported on the held-out test split."""
from __future__ import annotations

from pathlib import Path

from .models import fingerprint, lambda_grid, load_model, pick_device, prepare
from .outputs import check_output
from .ui import EXIT_OK, UI, IncompatibleError

ASSEMBLE_FILES = frozenset({"report.json", "report.md", "assembly.png", "lambda_curves.png"})   # --report DIR
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def add_parser(sub) -> None:
    from ..options import add_option_flags
    from .parser_common import EPILOG, common_args, layout_args

    p = sub.add_parser("assemble", help="integrate a zoo of checkpoints into BASE one by one (λ chosen on a "
                       "validation split): assembled checkpoint, report.json, plots", epilog=EPILOG,
                       description="Align each zoo model to the current base, sweep λ on the validation split, "
                       "take the λ that keeps base-domain accuracy within --acc-tol (the best target-domain "
                       "accuracy when --target-data is given), merge, continue. Every step is also "
                       "evaluated on the held-out test split. Zoo models that cannot be paired with the "
                       "base are skipped, with the reason in the report.")
    p.add_argument("base", metavar="BASE", help="base checkpoint: its architecture is kept")
    p.add_argument("zoo", nargs="+", metavar="ZOO", help="zoo checkpoints, or folders of them (*.safetensors, "
                   "*.pt, *.pth, *.bin, in name order), merged in the order given")
    p.add_argument("-o", "--output", default="assembled.safetensors", metavar="FILE",
                   help="assembled checkpoint; .pt/.pth/.bin -> PyTorch, else safetensors (default: %(default)s)")
    p.add_argument("--format", choices=["safetensors", "torch"], default=None, help="override the suffix")
    p.add_argument("--report", metavar="DIR", help="report folder (default: OUTPUT without suffix + '-report')")
    p.add_argument("--val-data", metavar="NPZ", help="validation split λ is chosen on (X, y); default for digits "
                   "and mnist1d: the part held out of their training sets (hetmerge.zoo.VAL_SIZES)")
    p.add_argument("--target-val-data", metavar="NPZ", help="target-domain validation split (as --val-data)")
    p.add_argument("--search", choices=["grid", "adaptive"], default="grid", help="sweep every λ of --lambdas, "
                   "or find λ* on that grid and the barrier from a few λ's (hm.sweep(search='adaptive'); "
                   "with --target-data the λ is picked among those evaluated) (default: %(default)s)")
    p.add_argument("--allow-replace", action="store_true", help="allow λ = 1 (replaces the base by the aligned "
                   "zoo model instead of assembling it; default: the largest grid λ below 1)")
    g = p.add_argument_group("models")
    g.add_argument("--arch", metavar="DESC", help="architecture of every model (as for merge; default: auto)")
    g.add_argument("--base-arch", metavar="DESC", help="architecture of the base only")
    layout_args(g)
    add_option_flags(p, only=["data", "target_data", "lambdas", "acc_tol", "fill", "method",
                              "restarts", "max_iter", "seed", "device", "allow_nonfinite"])
    common_args(p)
    p.set_defaults(func=cmd_assemble)


def zoo_paths(items) -> list[Path]:
    """Checkpoint files from ZOO arguments: files as given, folders expanded (name order)."""
    from ..plan import PlanError

    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in CHECKPOINT_SUFFIXES)
            if not found:
                raise PlanError(f"zoo: folder {p} holds no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"zoo: {p}: no such file or folder")
    seen = set()
    for p in out:
        if p.resolve() in seen:
            raise PlanError(f"zoo: {p} is listed twice; give each zoo model once")
        seen.add(p.resolve())
    return out


def _names(paths: list[Path]) -> list[str]:
    """Report names: file stems, with the parent folder where two stems collide."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{p.parent.name}/{s}" for s, p in zip(stems, paths)]


def load_splits(spec, val_spec, model, device: str, what: str):
    """(validation, test) (X, y) pairs of one domain, or (None, None) without data. The test split is
    what every command evaluates on (data.load_eval_data); the validation split is --val-data, or for
    digits / mnist1d the part hetmerge holds out of their training sets."""
    from ..data import load_eval_data
    from ..plan import PlanError
    from ..zoo import load_data

    if spec is None:
        if val_spec is not None:
            raise PlanError(f"{what.replace('data', 'val_data')}: given without --{what.replace('_', '-')}")
        return None, None
    test = load_eval_data(spec, model, device, what)
    if val_spec is not None:
        vflag = f"--{what.replace('_', '-').replace('data', 'val-data')}"
        if not str(val_spec).endswith(".npz") or Path(val_spec).resolve() == Path(str(spec)).resolve():
            raise PlanError(f"{vflag}: expected a .npz other than --{what.replace('_', '-')} {spec}, got "
                            f"{val_spec!r} (λ chosen on the test split would be reported on the data it was "
                            "tuned on)")
        val = load_eval_data(val_spec, model, device, f"{what} (validation)")
    elif spec in ("digits", "mnist1d"):
        sp = load_data(spec)
        val = sp.X_val.reshape(-1, *test[0].shape[1:]).to(device), sp.y_val.to(device)
    else:
        raise PlanError(f"{what}: {spec} is a file: give the validation split λ is chosen on as "
                        f"--{what.replace('_', '-').replace('data', 'val-data')} FILE.npz (choosing λ on the test "
                        "split would report numbers tuned on the very data they are measured on)")
    return val, test


def _acc(model, d):
    """Accuracy of a zoo model alone on (X, y), or None when it does not take this input."""
    import torch

    if d is None:
        return None
    try:
        with torch.no_grad():
            return float((model(d[0]).argmax(-1) == d[1]).float().mean())
    except RuntimeError:   # another input size than the data's (it can still be merged into the base)
        return None


def cmd_assemble(args, ui: UI) -> int:
    import warnings

    import hetmerge as hm

    from .. import report as R
    from ..checkpoint import check_replaceable_dir, save_state
    from ..spec import SpecError
    from ..plan import PlanError, load_plan, options_from_args
    from .assemble_report import write_report

    out = Path(args.output)
    report_dir = Path(args.report) if args.report else out.with_name(out.stem + "-report")
    paths = zoo_paths(args.zoo)
    names = _names(paths)
    ov = {**options_from_args(args), "base_weights": args.base}
    for k in ("arch", "base_arch", "sub_key", "key_prefix"):
        if getattr(args, k, None) is not None:
            ov[k] = getattr(args, k)
    plans = [load_plan(overrides={**ov, "target_weights": str(p)}) for p in paths]
    o = plans[0].options
    if o.data is None:
        raise IncompatibleError("data: assembling chooses λ on data: --data digits|mnist1d|FILE.npz")
    inputs = [("base weights", plans[0].base.weights)] + [(f"zoo model {n}", p) for n, p in zip(names, paths)]
    inputs += [(k, Path(v)) for k, v in (("data", o.data), ("target_data", o.target_data), ("val_data", args.val_data),
                                         ("target_val_data", args.target_val_data))
               if isinstance(v, str) and v.endswith(".npz")]
    check_output(out, inputs, "output")
    check_output(report_dir, inputs + [("output", out)], "report folder", folder=True)
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable_dir(report_dir, ASSEMBLE_FILES)   # refuse before the heavy work, not after
    fmt = args.format or ("torch" if out.suffix.lower() in (".pt", ".pth", ".bin") else "safetensors")
    dev = pick_device(o)
    fin = {"check_finite": True, "allow_nonfinite": o.allow_nonfinite, "ui": ui}
    base, _ = load_model(plans[0].base, "base", dev, **fin)
    val, test = load_splits(o.data, args.val_data, base, dev, "data")
    tval, ttest = load_splits(o.target_data, args.target_val_data, base, dev, "target_data")

    zoo, skipped = [], []
    for name, path, plan in zip(names, paths, plans):
        try:   # models the base cannot be paired with are skipped, not fatal: the rest still assemble
            model, _ = load_model(plan.target, f"zoo model {name}", dev, **fin)
            _, _, _, warns = prepare(base, model, None)
        except (IncompatibleError, PlanError) as exc:
            skipped.append({"model": name, "file": str(path), "reason": str(exc)})
            ui.warn(f"zoo model {name} ({path}) skipped: {exc}")
            continue
        for w in warns:
            ui.warn(f"zoo model {name}: {w}")
        zoo.append((name, path, plan, model))
    if not zoo:
        raise IncompatibleError(f"zoo: no model can be paired with the base {plans[0].base.weights}: "
                                + "; ".join(f"{s['model']}: {s['reason']}" for s in skipped))

    lam = lambda_grid(o)
    current, steps = base, []
    bar = ui.bar(total=len(zoo), desc="assemble", unit="model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, path, plan, model in zoo:
            # one zoo model per call: hm.assemble's loop is sequential, so this is the same assembly,
            # with a progress step per model
            try:
                current, (st,) = hm.assemble(current, {name: model}, data=val, target_data=tval, tol=o.acc_tol,
                                             lambdas=lam, method=o.method, restarts=o.restarts, fill=o.fill,
                                             seed=o.seed, eval_data=test, target_eval_data=ttest,
                                             allow_replace=args.allow_replace, search=args.search,
                                             max_iter=o.max_iter)
            except SpecError as exc:   # paired above, so not expected; still not fatal
                skipped.append({"model": name, "file": str(path), "reason": str(exc)})
                ui.warn(f"zoo model {name} ({path}) skipped: {exc}")
                bar.update(1)
                continue
            steps.append({"step": st, "file": str(path), "fingerprint": fingerprint(plan.target),
                          "member_test_acc": _acc(model, test)})
            bar.set_postfix_str(f"{name}: λ {st.lam:.2f}, test acc {100 * st.eval_after['base_acc']:.1f}%")
            bar.update(1)
    bar.close()
    meta = {"created_by": "hetmerge assemble", "base": str(plans[0].base.weights),
            "zoo": ",".join(s["step"].model for s in steps)}
    save_state(dict(current.state_dict()), out, format=fmt, metadata=meta if fmt == "safetensors" else None)
    doc = write_report(report_dir, ui, ASSEMBLE_FILES, base=plans[0].base, options=o, search=args.search,
                       steps=steps, skipped=skipped, data={"val": val, "test": test, "target_val": tval,
                                                           "target_test": ttest, "base_model": base},
                       output=out, versions=R.versions())
    ui.out(f"wrote {out} ({fmt}; {len(doc['steps'])} model(s) assembled, {len(skipped)} skipped) and "
           f"{report_dir}/report.json, report.md, assembly.png, lambda_curves.png")
    return EXIT_OK
