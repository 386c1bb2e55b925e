"""The `hetmerge` command: demo, inspect, align, merge, sweep, convert, bench.

The CLI parses arguments, validates plans, reads and writes files, and calls the library; the
merging itself is hetmerge.alignment / merge / evaluate / assemble. Exit codes:

    0 success   1 internal error   2 bad arguments or plan   3 missing, unreadable or unsafe file
    4 models incompatible with the plan (shapes, layer map, architecture)   130 interrupted
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FILE, EXIT_INCOMPATIBLE = 0, 1, 2, 3, 4

ALIGNMENT_FORMAT = "hetmerge-alignment"
SWEEP_FILES = frozenset({"sweep.json", "sweep.png", "alignment_trace.png", "report.md"})   # what sweep -o writes


class IncompatibleError(ValueError):
    """The models cannot be merged as the plan says; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# output helpers
# ---------------------------------------------------------------------------------------------

class UI:
    """Printing and progress bars under --quiet / -v."""

    def __init__(self, quiet: bool = False, verbose: int = 0):
        self.quiet, self.verbose = quiet, verbose

    def out(self, msg: str = "") -> None:
        if not self.quiet:
            print(msg, flush=True)

    def info(self, msg: str) -> None:   # -v only, on stderr so stdout stays the report
        if self.verbose and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"hetmerge: warning: {msg}", file=sys.stderr, flush=True)

    def bar(self, **kw):
        """A tqdm bar on stderr, or a no-op stand-in under --quiet / without tqdm."""
        if self.quiet:
            return _NoBar()
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)

    @property
    def bar_factory(self):
        return None if self.quiet else (lambda **kw: self.bar(**kw))


class _NoBar:
    def update(self, n=1): pass
    def set_postfix_str(self, s): pass
    def set_description(self, s): pass
    def close(self): pass
    def __enter__(self): return self
    def __exit__(self, *a): return False


def _torch_setup(args) -> None:
    import torch

    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
        import hetmerge as hm
        hm.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# models from plans
# ---------------------------------------------------------------------------------------------

_SCANS: dict = {}   # one pass per weights file per run: (file identity, selection) -> WeightScan


def _scan(ref):
    """checkpoint.scan_weights of a plan side, cached by the file's identity and size/mtime, so the
    finiteness check at load time and the fingerprints of the outputs share one read of the file."""
    from .checkpoint import scan_weights

    st = os.stat(ref.weights)
    key = (os.path.realpath(ref.weights), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, ref.sub_key,
           ref.key_prefix)
    if key not in _SCANS:
        _SCANS[key] = scan_weights(ref.weights, ref.sub_key, ref.key_prefix)
    return _SCANS[key]


def _fingerprint(ref) -> dict:
    """Identity of a checkpoint's weights, independent of its format: blake2b over every tensor's
    name, dtype, shape and bytes (checkpoint.scan_state)."""
    from .checkpoint import FINGERPRINT_KIND

    scan = _scan(ref)
    return {"file": str(ref.weights), "bytes": ref.weights.stat().st_size, "fingerprint": FINGERPRINT_KIND,
            "weights_blake2b": scan.digest}


def _check_finite(ref, side: str, allow: bool, ui: UI) -> None:
    """Refuse weights holding NaN/inf (they make the assignment fail or the merge NaN), naming the tensors."""
    from .checkpoint import CheckpointError

    bad = _scan(ref).nonfinite
    if not bad:
        return
    listed = ", ".join(f"{k!r} ({n} values)" for k, n in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if allow:
        ui.warn(f"{side}.weights {ref.weights}: non-finite values (NaN/inf) in {listed}; kept (--allow-nonfinite)")
        return
    raise CheckpointError(f"{side}.weights {ref.weights}: non-finite values (NaN/inf) in {listed}; they would "
                          "break the alignment and poison the merge. Fix the checkpoint, or pass "
                          "--allow-nonfinite (plan key allow_nonfinite) to use it anyway")


def _load_model(ref, side: str, device: str = "cpu", meta: bool = False, check_finite: bool = False,
                allow_nonfinite: bool = False, ui: UI | None = None):
    """(module, state) for one plan side; meta=True builds the module without weights memory.
    check_finite: scan the weights once (streamed) and refuse NaN/inf unless allow_nonfinite."""
    from .architectures import ArchError, build, check_weights
    from .checkpoint import LazyState, detect_format, load_state

    path = ref.weights
    if meta and detect_format(path) == "safetensors":
        state = LazyState(path, ref.key_prefix, ref.sub_key).meta()
    else:
        state = load_state(path, sub_key=ref.sub_key, key_prefix=ref.key_prefix)
    try:
        model, example = build(ref.arch, state, device="meta" if meta else "cpu")
        check_weights(model, state, side, f"weights {path.name}")
    except ArchError as exc:
        hint = ""
        if ref.key_prefix is None:   # say so when the automatic prefix rule changed the keys
            from .checkpoint import strip_prefix
            stored = list(LazyState(path, "").infos) if detect_format(path) == "safetensors" else \
                list(load_state(path, sub_key=ref.sub_key, key_prefix=""))
            renamed = strip_prefix(stored, path)
            if any(k != v for k, v in renamed.items()):
                k0 = stored[0]
                hint = (f" (the keys were read without a wrapper prefix: {k0!r} -> {renamed[k0]!r}; pass "
                        "--key-prefix '' to keep them as stored)")
        raise IncompatibleError(str(exc) + hint) from None
    if check_finite:
        _check_finite(ref, side, allow_nonfinite, ui or UI())
    if not meta:
        missing = {k: v for k, v in model.state_dict().items() if k not in state}   # integer bookkeeping
        model.load_state_dict({**missing, **state})
        model = model.to(device).eval()
    return model, state


def _same_file(a: Path, b: Path) -> bool:
    """a and b are one file: the same path after symlinks, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _check_output(out: Path, inputs, what: str = "output", folder: bool = False) -> None:
    """Refuse an output that is one of the inputs (by path, symlink or hard link) — writing it would
    destroy that input — or, for an output folder replaced as a whole, one that holds an input.
    inputs: [(role, path)] with None entries skipped. Raises CheckpointError (exit 3)."""
    from .checkpoint import CheckpointError

    for role, p in inputs:
        if p is None:
            continue
        p = Path(p)
        if _same_file(out, p):
            raise CheckpointError(f"{what} {out} is the {role} {p}: writing it would overwrite an input; "
                                  "choose another output path")
        if folder:
            real_out, real_in = os.path.realpath(out), os.path.realpath(p)
            if real_in.startswith(real_out.rstrip(os.sep) + os.sep):
                raise CheckpointError(f"{what} {out} holds the {role} {p}; the folder is replaced as a whole, "
                                      "so choose an output folder that holds no input")


def _plan_inputs(plan) -> list:
    """[(role, path)] of every file a plan reads."""
    ins = [("base weights", plan.base.weights), ("target weights", plan.target.weights),
           ("alignment", plan.alignment), ("plan", plan.path)]
    for k in ("data", "target_data"):
        v = getattr(plan.options, k)
        if isinstance(v, str) and v.endswith(".npz"):
            ins.append((k, Path(v)))
    return ins


def _prepare(base, target, layer_map):
    """Pairing of two modules, with library errors turned into what-to-change messages."""
    import warnings

    from .alignment import prepare
    from .spec import SpecError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pairing, bspec, tspec = prepare(base, target, layer_map)
        except SpecError as exc:
            raise IncompatibleError(f"{exc}. Change layer_map so that it pairs layers of the same kind "
                                    "(Linear with Linear, ConvNd with ConvNd of equal kernel size), or "
                                    "describe the model with a factory that fx can trace") from None
        except KeyError as exc:
            msg = exc.args[0] if exc.args else str(exc)
            raise IncompatibleError(f"{msg}. Fix layer_map") from None
    return pairing, bspec, tspec, [str(w.message) for w in caught]


def _device(opts) -> str:
    dev = opts.device
    if dev.startswith("cuda"):
        import torch

        import hetmerge as hm
        if not torch.cuda.is_available():
            raise IncompatibleError(f"device: {dev!r} requested but torch sees no CUDA device; use --device cpu")
        if not hm.cuda_available():
            raise IncompatibleError(f"device: {dev!r} requested but this hetmerge build has no CUDA backend "
                                    "(rebuild with nvcc on PATH, HETMERGE_CUDA=ON); use --device cpu")
    return dev


def _plan_from_args(args, need_weights: bool = True):
    from .plan import load_plan, options_from_args

    ov = options_from_args(args)
    for k in ("base_arch", "target_arch", "arch", "layer_map", "alignment", "sub_key", "key_prefix"):
        v = getattr(args, k, None)
        if v is not None:
            ov[k] = v
    if getattr(args, "base", None):
        ov["base_weights"] = args.base
    if getattr(args, "target", None):
        ov["target_weights"] = args.target
    return load_plan(path=args.plan, overrides=ov, need_weights=need_weights)


def _lambdas(opts):
    import torch

    if isinstance(opts.lambdas, list):
        return torch.tensor(sorted(set(opts.lambdas)), dtype=torch.float64)
    return torch.linspace(0, 1, int(opts.lambdas), dtype=torch.float64)


def _eval_data(spec: str | None, example_model, device: str, what: str = "data"):
    """(X, y) test tensors for 'digits', 'mnist1d' or a .npz (X_test/y_test if present, else X/y),
    reshaped to the model's input when only the layout differs (flat digits for an 8x8 CNN)."""
    import numpy as np
    import torch

    if spec is None:
        return None
    if spec in ("digits", "mnist1d"):
        from .zoo import load_data
        split = load_data(spec)
        X, y = split[2], split[3]
    else:
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"{what}: {p}: no such file")
        try:
            with np.load(p, allow_pickle=False) as z:   # no pickles from data files either
                xk, yk = ("X_test", "y_test") if "X_test" in z else ("X", "y")
                if xk not in z or yk not in z:
                    raise IncompatibleError(f"{what}: {p} needs arrays X and y (or X_test and y_test); "
                                            f"it has {sorted(z.files)}")
                X, y = torch.from_numpy(z[xk]).float(), torch.from_numpy(z[yk]).long()
        except (ValueError, OSError) as exc:
            raise IncompatibleError(f"{what}: cannot read {p}: {exc}") from None
    first = next((m for m in example_model.modules() if hasattr(m, "in_features") or hasattr(m, "in_channels")),
                 None)
    if first is not None and hasattr(first, "in_channels") and X.dim() == 2:
        # conv model, flat data: (N, C*H*W) -> (N, C, H, W) when the sizes allow a square image
        c = first.in_channels
        side = int(round((X.shape[1] / c) ** 0.5))
        if c * side * side == X.shape[1] and isinstance(first, torch.nn.Conv2d):
            X = X.view(-1, c, side, side)
        elif isinstance(first, torch.nn.Conv1d) and X.shape[1] % c == 0:
            X = X.view(-1, c, X.shape[1] // c)
    elif first is not None and hasattr(first, "in_features") and X.dim() > 2:
        X = X.reshape(len(X), -1)
    if first is not None and hasattr(first, "in_features") and X.shape[1] != first.in_features:
        raise IncompatibleError(f"{what}: {spec} has {X.shape[1]} features per sample but the base model "
                                f"takes {first.in_features}; use data the models were trained on")
    return X.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------
# alignment files
# ---------------------------------------------------------------------------------------------

def _alignment_doc(plan, res, pairing, wall_s: float) -> dict:
    from . import report as R

    return {
        "format": ALIGNMENT_FORMAT, "version": 1, "created_by": "hetmerge align",
        "versions": R.versions(),
        "base": {**_fingerprint(plan.base), "arch": plan.base.arch.describe()},
        "target": {**_fingerprint(plan.target), "arch": plan.target.arch.describe()},
        "layer_map": pairing.layer_map, "cases": pairing.cases,
        "links": {n: {"base_group": l.base_group, "target_group": l.target_group, "n_base": l.n_a,
                      "n_target": l.n_b, "solved": l.free} for n, l in pairing.links.items()},
        "method": res.method, "objective": res.objective, "trace": list(res.trace),
        "iterations": res.iterations, "converged": res.converged,
        "restart_objectives": list(res.restart_objectives),
        "timings": {**res.timings, "wall": wall_s},
        "options": plan.options.to_dict(),
        "maps": {n: m.tolist() for n, m in res.maps.items()},
    }


def _read_alignment(path: Path, pairing, plan, ui: UI) -> dict:
    """Index maps from an alignment file, checked against the pairing of the plan's models."""
    import torch

    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleError(f"alignment {path}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != ALIGNMENT_FORMAT:
        raise IncompatibleError(f"alignment {path}: not a hetmerge alignment file (written by hetmerge align)")
    for side in ("base", "target"):
        want = doc.get(side, {})
        if not isinstance(want, dict):
            continue
        if "weights_blake2b" not in want:
            # older files hashed the first 256 values of each tensor only: nothing here can recompute
            # that safely enough to vouch for the weights, so say so instead of a false "unchanged"
            if "weights_sha256" in want:
                ui.warn(f"alignment {path}: written by an older hetmerge whose {side} fingerprint covered only "
                        f"the first 256 values of each tensor; cannot check that {side} weights are unchanged "
                        f"since ({want.get('file')}). Rerun hetmerge align to record a full fingerprint")
            continue
        have = _fingerprint(getattr(plan, side))
        if want["weights_blake2b"] != have["weights_blake2b"]:
            ui.warn(f"alignment {path}: {side} weights differ from the file it was computed for "
                    f"({want.get('file')}); the maps may not fit these weights")
    maps = doc.get("maps")
    if not isinstance(maps, dict):
        raise IncompatibleError(f"alignment {path}: no 'maps'")
    out = {}
    for name, link in pairing.links.items():
        if name not in maps:
            raise IncompatibleError(f"alignment {path}: no map for link {name!r}; it was computed for a "
                                    f"different layer map ({doc.get('layer_map')}) — rerun hetmerge align")
        m = torch.tensor(maps[name], dtype=torch.long)
        valid = m[m >= 0]
        if m.numel() != link.n_a or (valid.numel() and int(valid.max()) >= link.n_b) or \
                valid.unique().numel() != valid.numel():
            raise IncompatibleError(f"alignment {path}: map {name!r} (length {m.numel()}, largest entry "
                                    f"{int(m.max()) if m.numel() else '-'}) does not fit these models: they need "
                                    f"{link.n_a} distinct entries < {link.n_b} (-1 = padding); it was computed "
                                    "for other models — rerun hetmerge align")
        out[name] = m
    extra = sorted(set(maps) - set(pairing.links))
    if extra:
        raise IncompatibleError(f"alignment {path}: maps {extra} match no link of these models; it was "
                                "computed for different models or layer map — rerun hetmerge align")
    return out


def _align(plan, base, target, ui: UI, data=None):
    """hm.align with a progress bar that moves per sweep and shows each sweep's objective gain."""
    import warnings

    import hetmerge as hm

    o = plan.options
    t0 = time.perf_counter()
    bar = ui.bar(total=None, desc="align", unit="sweep")

    def on_sweep(restart, sweep, objective, gain):
        bar.set_postfix_str(f"restart {restart + 1}/{o.restarts} objective {objective:.5f} gain {gain:+.2g}")
        bar.update(1)
        ui.info(f"  restart {restart} (seed {o.seed + restart}) sweep {sweep}: objective {objective:.5f}, "
                f"gain {gain:+.3g}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # deep-to-shallow warnings were shown by _prepare
        best = hm.align(base, target, method=o.method, layer_map=plan.layer_map, data=data,
                        restarts=o.restarts, max_iter=o.max_iter, tol=o.tol, seed=o.seed,
                        objective=o.objective, callback=on_sweep)
    bar.close()
    return best, time.perf_counter() - t0


def _maps_for(plan, base, target, pairing, ui: UI, data=None):
    """(maps, AlignResult or None) from --alignment, or aligned now."""
    if plan.alignment is not None:
        return _read_alignment(plan.alignment, pairing, plan, ui), None
    res, _ = _align(plan, base, target, ui, data)
    return res.maps, res


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_inspect(args, ui: UI) -> int:
    import torch

    from . import report as R
    from .checkpoint import detect_format

    plan = _plan_from_args(args)
    if args.json:
        _check_output(Path(args.json), _plan_inputs(plan), "--json output")
    base, sa = _load_model(plan.base, "base", meta=True)
    target, sb = _load_model(plan.target, "target", meta=True)
    pairing, bspec, tspec, warns = _prepare(base, target, plan.layer_map)
    info: dict[str, Any] = {"models": {}, "layer_map": [], "links": [], "warnings": list(warns)}

    for side, model, spec, ref in (("base", base, bspec, plan.base), ("target", target, tspec, plan.target)):
        sd = model.state_dict()
        n_params = sum(v.numel() for v in sd.values() if v.is_floating_point())
        nbytes = sum(v.numel() * v.element_size() for v in sd.values())
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
        groups = [{"group": g, "size": spec.sizes.get(g), "fixed": g in spec.fixed, "axes": len(spec.groups[g]),
                   "members": [f"{k}[{ax}]" for k, ax in spec.groups[g]]} for g in spec.groups]
        info["models"][side] = {"file": str(ref.weights), "format": detect_format(ref.weights),
                                "arch": ref.arch.describe(), "parameters": n_params, "bytes": nbytes,
                                "dtypes": dtypes, "layers": [l.name for l in spec.layers], "groups": groups}
        ui.out(f"{side}: {ref.weights} ({info['models'][side]['format']}, {', '.join(dtypes)})")
        ui.out(f"  architecture {ref.arch.describe()}: {n_params:,} parameters, {_human(nbytes)}")
        if ref.arch.kind == "sequential":
            note = (f"{side}: architecture rebuilt from the tensors alone; activations are assumed to be ReLU, "
                    "convolutions stride 1 with same padding and no pooling (give --base-arch/--target-arch "
                    "module:factory if that is not your model)")
            info["warnings"].append(note)
            ui.out(f"  note: {note.split(': ', 1)[1]}")
        ui.out(f"  layers: {', '.join(l.name for l in spec.layers)}")
        ui.out("  permutation groups (hidden-unit axes that move together):")
        ui.out("    " + R.table([{"group": g["group"], "units": g["size"] if g["size"] is not None else "-",
                                  "kind": "fixed (model input/output)" if g["fixed"] else "permutable",
                                  "axes": g["axes"], "members": ", ".join(g["members"][:4]) +
                                  (" ..." if len(g["members"]) > 4 else "")} for g in groups],
                                align_left=["group", "kind", "members"]).replace("\n", "\n    "))
    sd_a, sd_b = base.state_dict(), target.state_dict()
    blayers = {l.name: l for l in bspec.layers}
    tlayers = {l.name: l for l in tspec.layers}
    rows = []
    for bl, tl in pairing.layer_map.items():
        wa, wb = blayers[bl].params.get("weight"), tlayers[tl].params.get("weight")
        sa_ = tuple(sd_a[wa].shape) if wa else ()
        sb_ = tuple(sd_b[wb].shape) if wb else ()
        row = {"base layer": bl, "base shape": "x".join(map(str, sa_)), "target layer": tl,
               "target shape": "x".join(map(str, sb_)), "case": pairing.cases.get(bl, "-")}
        rows.append(row)
        info["layer_map"].append({**row, "base_shape": list(sa_), "target_shape": list(sb_)})
    kept = [l.name for l in bspec.layers if l.name not in pairing.layer_map]
    ui.out("")
    ui.out("layer map (base <- target):")
    ui.out("  " + R.table(rows, align_left=["base layer", "target layer", "case"]).replace("\n", "\n  "))
    if kept:
        ui.out(f"  base layers not in the map keep their weights: {', '.join(kept)}")
    info["kept_layers"] = kept
    lrows = []
    for n, l in pairing.links.items():
        kind = ("permutation" if l.n_a == l.n_b else "zero-padding (target narrower)" if l.n_a > l.n_b
                else "units dropped (target wider)")
        if not l.free:
            kind = "fixed axis, same size" if l.n_a == l.n_b else "fixed axis, padded/cropped by position"
            if l.n_a != l.n_b:
                info["warnings"].append(f"link {n}: fixed axes of different sizes ({l.n_a} vs {l.n_b}) are "
                                        "padded/cropped by position: the models do not share their inputs/outputs")
        lrows.append({"link": n, "base units": l.n_a, "target units": l.n_b, "solved": l.free, "map": kind})
        info["links"].append({"link": n, "n_base": l.n_a, "n_target": l.n_b, "solved": l.free, "kind": kind,
                              "base_group": l.base_group, "target_group": l.target_group})
    ui.out("")
    ui.out("index maps to find (one linear assignment per solved link and sweep):")
    ui.out("  " + R.table(lrows, align_left=["link", "map"]).replace("\n", "\n  "))

    # memory: weights, the largest cost matrix, the sweep's stacked copies, the streaming merge's blocks
    o = plan.options
    bytes_a, bytes_b = info["models"]["base"]["bytes"], info["models"]["target"]["bytes"]
    free = [l for l in pairing.links.values() if l.free]
    cost = max((l.n_a * l.n_b * 4 for l in free), default=0)
    paired = sum(sd_a[pp.base_key].numel() * sd_a[pp.base_key].element_size() for pp in pairing.params)
    K = len(o.lambdas) if isinstance(o.lambdas, list) else int(o.lambdas)
    sweep_chunk = min(K * paired, max(paired, 1 << 29))     # hm.sweep bounds its stacked weights at 512 MB
    biggest = max((v.numel() * v.element_size() for v in sd_a.values()), default=0)
    mem = {"base_weights": bytes_a, "target_weights": bytes_b, "largest_cost_matrix": cost,
           "align_peak": bytes_a + bytes_b + cost, "merge_in_memory_peak": 2 * bytes_a + bytes_b,
           "merge_streaming_peak": min(biggest, 64 << 20) * 3, "sweep_stacked_weights": sweep_chunk,
           "sweep_peak": bytes_a + bytes_b + sweep_chunk}
    info["memory_estimate_bytes"] = mem
    ui.out("")
    ui.out("memory estimate (weights in their stored dtype, float32 costs):")
    ui.out(f"  align: both models {_human(bytes_a + bytes_b)} + largest cost matrix {_human(cost)} "
           f"= {_human(mem['align_peak'])}")
    ui.out(f"  merge: in memory {_human(mem['merge_in_memory_peak'])}; streamed from safetensors "
           f"about {_human(mem['merge_streaming_peak'])} (blocks of base rows)")
    ui.out(f"  sweep of {K} λ: both models + stacked merged weights {_human(sweep_chunk)} = {_human(mem['sweep_peak'])}")
    for w in info["warnings"]:
        ui.warn(w)
    lam = o.lam
    if isinstance(lam, dict):
        stray = [k for k in lam if k not in pairing.layer_map]
        if stray:
            raise IncompatibleError(f"lam: layer(s) {stray} are not paired base layers "
                                    f"{sorted(pairing.layer_map)}; set λ only for paired layers")
    ui.out("")
    ui.out("plan OK: these models can be aligned and merged as planned")
    if args.json:
        from .report import write_json
        write_json(info, args.json)
        ui.info(f"wrote {args.json}")
    return EXIT_OK


def cmd_align(args, ui: UI) -> int:
    from .report import write_json

    plan = _plan_from_args(args)
    out = Path(args.output)
    _check_output(out, _plan_inputs(plan), "alignment output")
    dev = _device(plan.options)
    fin = {"check_finite": True, "allow_nonfinite": plan.options.allow_nonfinite, "ui": ui}
    base, _ = _load_model(plan.base, "base", dev, **fin)
    target, _ = _load_model(plan.target, "target", dev, **fin)
    pairing, _, _, warns = _prepare(base, target, plan.layer_map)
    for w in warns:
        ui.warn(w)
    data = None
    if plan.options.method == "activation":
        data = _eval_data(plan.options.data, base, dev)
    res, wall = _align(plan, base, target, ui, data)
    doc = _alignment_doc(plan, res, res.pairing or pairing, wall)
    write_json(doc, out)
    tr = res.trace
    ui.out(f"aligned {plan.target.weights.name} to {plan.base.weights.name}: {len(res.maps)} index maps, "
           f"normalized objective {tr[0]:.4f} (by position) -> {tr[-1]:.4f} after {res.iterations} sweeps, "
           f"{'converged' if res.converged else 'NOT converged (raise --max-iter)'}, {wall:.2f} s")
    for bl, case in res.cases.items():
        ui.info(f"  {bl} <- {pairing.layer_map.get(bl)}: {case}")
    ui.out(f"wrote {out}")
    return EXIT_OK


def _layer_lam(lam, layer: str) -> float:
    return float(lam) if not isinstance(lam, dict) else float(lam.get(layer, 0.0))


def cmd_merge(args, ui: UI) -> int:
    import torch

    from .checkpoint import LazyState, detect_format, save_state, stream_merge
    from .maps import transform

    plan = _plan_from_args(args)
    o = plan.options
    out = Path(args.output)
    _check_output(out, _plan_inputs(plan), "output")
    fmt = args.format or ("torch" if out.suffix.lower() in (".pt", ".pth", ".bin") else "safetensors")
    fin = {"check_finite": True, "allow_nonfinite": o.allow_nonfinite, "ui": ui}
    streamable = (fmt == "safetensors" and not args.no_stream and
                  detect_format(plan.base.weights) == detect_format(plan.target.weights) == "safetensors")
    if plan.alignment is not None and streamable:
        # never holds a model in memory: modules on the meta device give the pairing, the maps come
        # from the alignment file, the tensors stream from the memory-mapped files
        base, _ = _load_model(plan.base, "base", meta=True, **fin)
        target, _ = _load_model(plan.target, "target", meta=True, **fin)
    else:
        base, _ = _load_model(plan.base, "base", **fin)
        target, _ = _load_model(plan.target, "target", **fin)
    pairing, _, _, warns = _prepare(base, target, plan.layer_map)
    for w in warns:
        ui.warn(w)
    if isinstance(o.lam, dict):
        stray = [k for k in o.lam if k not in pairing.layer_map]
        if stray:
            raise IncompatibleError(f"lam: layer(s) {stray} are not paired base layers {sorted(pairing.layer_map)}")
    data = _eval_data(o.data, base, "cpu") if o.method == "activation" and plan.alignment is None else None
    maps, res = _maps_for(plan, base, target, pairing, ui, data)
    if res is not None and res.pairing is not None:
        pairing = res.pairing
    meta = {"created_by": "hetmerge merge", "base": str(plan.base.weights), "target": str(plan.target.weights),
            "lam": json.dumps(o.lam), "fill": o.fill}
    t0 = time.perf_counter()
    if streamable:
        items = {}
        for pp in pairing.params:
            rows, cols = transform(pp, maps)
            items[pp.base_key] = (pp.target_key, rows.cpu(), None if cols is None else cols.cpu(),
                                  _layer_lam(o.lam, pp.layer))
        lb = LazyState(plan.base.weights, plan.base.key_prefix, plan.base.sub_key)
        lt = LazyState(plan.target.weights, plan.target.key_prefix, plan.target.sub_key)
        bar = ui.bar(total=lb.nbytes, desc="merge", unit="B", unit_scale=True)
        stats = stream_merge(lb, lt, out, items, fill=o.fill, metadata=meta,
                             progress=lambda k, n: bar.update(n))
        bar.close()
        how = f"streamed {_human(stats['bytes'])} in blocks"
    else:
        import warnings

        import hetmerge as hm
        from .alignment import Alignment

        r = res or Alignment(pairing, maps)
        bar = ui.bar(total=1, desc="merge", unit="model")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            merged = hm.merge(base, target, r, lam=o.lam, fill=o.fill)
        save_state({k: v for k, v in merged.state_dict().items()}, out, format=fmt,
                   metadata=meta if fmt == "safetensors" else None)
        bar.update(1)
        bar.close()
        how = "in memory"
    lam_s = o.lam if not isinstance(o.lam, dict) else ", ".join(f"{k}={v}" for k, v in o.lam.items())
    ui.out(f"merged {plan.target.weights.name} into {plan.base.weights.name} at λ = {lam_s} "
           f"(fill={o.fill}, {how}, {time.perf_counter() - t0:.2f} s): the result has the base's architecture")
    ui.out(f"wrote {out} ({fmt})")
    return EXIT_OK


def cmd_sweep(args, ui: UI) -> int:
    import warnings

    import hetmerge as hm

    from . import report as R
    from .alignment import Alignment
    from .checkpoint import atomic_dir, check_replaceable_dir

    plan = _plan_from_args(args)
    o = plan.options
    dev = _device(o)
    if o.data is None:
        raise IncompatibleError("data: a sweep needs evaluation data: --data digits|mnist1d|FILE.npz "
                                "(or plan key 'data')")
    outdir = Path(args.output)
    _check_output(outdir, _plan_inputs(plan), "output folder", folder=True)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable_dir(outdir, SWEEP_FILES)     # refuse before the heavy work, not after
    fin = {"check_finite": True, "allow_nonfinite": o.allow_nonfinite, "ui": ui}
    base, _ = _load_model(plan.base, "base", dev, **fin)
    target, _ = _load_model(plan.target, "target", dev, **fin)
    pairing, _, _, warns = _prepare(base, target, plan.layer_map)
    for w in warns:
        ui.warn(w)
    data = _eval_data(o.data, base, dev)
    tdata = _eval_data(o.target_data, base, dev, "target_data")
    maps, res = _maps_for(plan, base, target, pairing, ui, data)
    alignment = res.alignment if res is not None else Alignment(pairing, maps)
    trace = list(res.trace) if res is not None else []   # empty when the maps came from a file
    lam = _lambdas(o)
    curves = {}
    bar = ui.bar(total=2, desc="sweep", unit="curve")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, r in (("unaligned", None), ("aligned", alignment)):
            c = hm.sweep(base, target, r, lam, data=data, target_data=tdata, tol=o.acc_tol, fill=o.fill,
                         layer_map=plan.layer_map if r is None else None, batch_size=o.batch_size)
            curves[name] = c
            bar.set_postfix_str(f"{name}: barrier {c.barrier:.3f}, λ* {c.lam_star:.2f}")
            bar.update(1)
    bar.close()
    lams = curves["aligned"].lambdas.tolist()
    doc = {"created_by": "hetmerge sweep", "versions": R.versions(), "plan": plan.to_dict(),
           "base": _fingerprint(plan.base), "target": _fingerprint(plan.target),
           "layer_map": pairing.layer_map, "cases": pairing.cases, "lambdas": lams,
           "alignment": {"file": str(plan.alignment) if plan.alignment else None, "trace": trace,
                         "objective": res.objective if res is not None else None}}
    for name, c in curves.items():
        doc[name] = {"loss": c.loss.tolist(), "acc": c.acc.tolist(), "barrier": c.barrier, "lam_star": c.lam_star,
                     "target_loss": None if c.target_loss is None else c.target_loss.tolist(),
                     "target_acc": None if c.target_acc is None else c.target_acc.tolist(),
                     "target_barrier": c.target_barrier, "timings": c.timings}
    rows = [{"λ": l, "loss_unal": doc["unaligned"]["loss"][i], "loss_al": doc["aligned"]["loss"][i],
             "acc_unal %": 100 * doc["unaligned"]["acc"][i], "acc_al %": 100 * doc["aligned"]["acc"][i]}
            for i, l in enumerate(lams)]
    ui.out(R.table(rows))
    ui.out("")
    ui.out(R.table([{"": n, "barrier": doc[n]["barrier"], "λ*": doc[n]["lam_star"],
                     "acc at λ*": 100 * doc[n]["acc"][min(range(len(lams)), key=lambda i: abs(lams[i] - doc[n]["lam_star"]))]}
                    for n in ("unaligned", "aligned")], align_left=[""]))
    # every file lands in a temporary folder that replaces outdir only when all are written
    with atomic_dir(outdir, SWEEP_FILES) as tmp:
        R.write_json(doc, tmp / "sweep.json")
        png = R.plot_sweeps([{"name": f"{plan.base.weights.name} ← {plan.target.weights.name}", "lambdas": lams,
                              "aligned": doc["aligned"], "unaligned": doc["unaligned"]}], tmp / "sweep.png",
                            f"λ sweep on {o.data}: aligned vs unaligned")
        if trace:
            R.plot_traces({"aligned": trace}, tmp / "alignment_trace.png", "weight-matching convergence")
        md = ["# hetmerge sweep", "", f"base `{plan.base.weights}`, target `{plan.target.weights}`, data {o.data}.", "",
              R.markdown_table(rows, list(rows[0])), "", f"![λ sweep]({png.name})", ""]
        if trace:
            md += ["![alignment trace](alignment_trace.png)", ""]
        R.write_markdown(tmp / "report.md", "\n".join(md))
    ui.out(f"wrote {outdir}/sweep.json, sweep.png, report.md")
    return EXIT_OK


def cmd_convert(args, ui: UI) -> int:
    from .checkpoint import CheckpointError, load_state, save_state

    out = Path(args.output)
    _check_output(out, [("input", Path(args.input))])
    if (out.exists() or out.is_symlink()) and not args.force:
        raise CheckpointError(f"{out}: exists; pass --force to replace it")
    state = load_state(args.input, sub_key=args.sub_key, key_prefix=args.key_prefix)
    out = save_state(state, out, format=args.format)
    ui.out(f"wrote {out} ({len(state)} tensors)")
    return EXIT_OK


def cmd_demo(args, ui: UI) -> int:
    import torch

    import hetmerge as hm

    from . import report as R
    from .demo import DemoConfig, markdown, run_demo, terminal_summary

    dev = args.device
    if dev.startswith("cuda") and not (torch.cuda.is_available() and hm.cuda_available()):
        raise IncompatibleError(f"--device {dev}: no usable CUDA device or no CUDA backend in this build; "
                                "use --device cpu")
    # small models: one thread avoids contention (4x faster per step measured on 2 shared cores)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    hm.set_num_threads(threads)
    datasets = args.datasets or (["digits"] if args.quick else ["digits", "mnist1d"])
    out = Path(args.output)
    cfg = DemoConfig(out=out, quick=args.quick, datasets=datasets, device=dev, cache=args.cache_dir,
                     retrain=args.retrain, restarts=args.restarts,
                     lambdas=11 if args.quick else 21, heat_lambdas=6 if args.quick else 11,
                     progress=ui.bar_factory, log=ui.info)
    ui.out(f"hetmerge demo{' --quick' if args.quick else ''}: zoo on {', '.join(datasets)} -> {out}/")
    rep = run_demo(cfg)
    rep["timings"]["threads"] = threads
    R.write_json(rep, out / "report.json")
    R.write_markdown(out / "report.md", markdown(rep))
    ui.out("")
    ui.out(terminal_summary(rep))
    pngs = sorted(p.name for p in out.glob("*.png"))
    ui.out(f"wrote {out}/report.json, report.md and {len(pngs)} plots: {', '.join(pngs)}")
    return EXIT_OK


def cmd_bench(args, ui: UI) -> int:
    from .benchmarks import run_bench

    return run_bench(args, ui)


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------

_EPILOG = """exit codes: 0 ok, 1 internal error, 2 bad arguments or plan, 3 missing/unreadable/unsafe file,
4 models incompatible with the plan. Docs: docs/cli.md"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables (errors still shown)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more detail; tracebacks on internal errors")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch and hetmerge")


def _model_args(p: argparse.ArgumentParser, positional_required: bool) -> None:
    nargs = None if positional_required else "?"
    p.add_argument("base", nargs=nargs, metavar="BASE", help="base checkpoint (.safetensors or .pt): its "
                   "architecture is kept" + ("" if positional_required else "; or base.weights in --plan"))
    p.add_argument("target", nargs=nargs, metavar="TARGET", help="target checkpoint merged into the base"
                   + ("" if positional_required else "; or target.weights in --plan"))
    g = p.add_argument_group("models")
    g.add_argument("--plan", metavar="FILE", help="plan file (YAML or JSON): models, layer map, λ, options")
    g.add_argument("--arch", metavar="DESC", help="architecture of both models: auto, sequential, mlp, cnn, "
                   "module:factory, file.py:factory, or an inline mapping '{\"type\": \"cnn\", \"spatial\": [8, 8]}' "
                   "(default: auto: hetmerge's mlp, else a Linear/Conv/BatchNorm chain rebuilt from the weights "
                   "with ReLU assumed)")
    g.add_argument("--base-arch", metavar="DESC", help="architecture of the base only")
    g.add_argument("--target-arch", metavar="DESC", help="architecture of the target only")
    g.add_argument("--layer-map", metavar="MAP", help="base=target layer pairs, e.g. fc0=fc0,fc1=fc2 "
                   "(default: shallow to shallow)")
    _layout_args(g)


def _layout_args(g) -> None:
    g.add_argument("--sub-key", metavar="KEY", help="entry of a training checkpoint that holds the state dict, "
                   "e.g. model_ema (dotted for nesting; default: the only {name: tensor} entry)")
    g.add_argument("--key-prefix", metavar="PREFIX", help="prefix to strip from every key, e.g. 'module.' "
                   "('' = keep keys as stored; default: strip module., _orig_mod., model. when every key has it)")


def build_parser() -> argparse.ArgumentParser:
    from .plan import add_option_flags

    try:
        from . import __version__ as version
    except Exception:
        version = "?"
    p = argparse.ArgumentParser(
        prog="hetmerge", description="Merge neural networks whose layers differ in width and depth "
        "(Model Assembly Learning): align, merge, sweep λ, assemble.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"hetmerge {version}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole flow on a zoo of MLPs trained on offline real data (digits, "
                       "MNIST-1D): tables, report.json, plots, report.md",
                       description="Train (or load from the cache) a zoo of heterogeneous MLPs on sklearn digits "
                       "and MNIST-1D, align and sweep every architecture pair, plot the barrier heat map and "
                       "λ curves, and assemble several zoo models into one base. No downloads.",
                       epilog=_EPILOG)
    d.add_argument("-o", "--output", default="hetmerge-demo", metavar="DIR", help="report folder (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="reduced zoo and grids (seconds; used by the tests)")
    d.add_argument("--datasets", nargs="+", choices=["digits", "mnist1d"], default=None,
                   help="data sets (default: both; --quick: digits)")
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    d.add_argument("--restarts", type=int, default=1, help="alignment restarts per pair (default: %(default)s)")
    d.add_argument("--cache-dir", default=None, metavar="DIR", help="zoo cache (default: $HETMERGE_CACHE_DIR or "
                   "~/.cache/hetmerge)")
    d.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    _common(d)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="compatibility report of two checkpoints before any heavy work",
                       description="Permutation groups of each model, the layer map with each paired layer's "
                       "case, the index maps to find, parameters and a memory estimate. Builds the models "
                       "without loading weights. Refuses impossible plans with what to change.", epilog=_EPILOG)
    _model_args(i, positional_required=False)
    add_option_flags(i, only=["lam", "lambdas"])
    i.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    _common(i)
    i.set_defaults(func=cmd_inspect)

    a = sub.add_parser("align", help="align TARGET to BASE: write an alignment file (JSON with the index maps)",
                       epilog=_EPILOG)
    _model_args(a, positional_required=False)
    a.add_argument("-o", "--output", default="alignment.json", metavar="FILE", help="(default: %(default)s)")
    add_option_flags(a, only=["method", "objective", "restarts", "max_iter", "tol", "seed", "data", "device",
                              "allow_nonfinite"])
    _common(a)
    a.set_defaults(func=cmd_align)

    m = sub.add_parser("merge", help="merge TARGET into BASE at λ: write a checkpoint with the base's architecture",
                       description="Merge with the maps of --alignment (or align first). safetensors in and out "
                       "stream from memory-mapped files in blocks, so peak memory stays near a few blocks.",
                       epilog=_EPILOG)
    _model_args(m, positional_required=False)
    m.add_argument("--alignment", metavar="FILE", help="alignment file from hetmerge align (default: align now)")
    m.add_argument("-o", "--output", default="merged.safetensors", metavar="FILE",
                   help="output checkpoint; .pt/.pth/.bin -> PyTorch, else safetensors (default: %(default)s)")
    m.add_argument("--format", choices=["safetensors", "torch"], default=None, help="override the suffix")
    m.add_argument("--no-stream", action="store_true", help="merge in memory even when streaming is possible")
    add_option_flags(m, only=["lam", "fill", "method", "objective", "restarts", "max_iter", "tol", "seed", "data",
                              "allow_nonfinite"])
    _common(m)
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("sweep", help="sweep λ aligned vs unaligned on data: table, sweep.json, plots",
                       epilog=_EPILOG)
    _model_args(s, positional_required=False)
    s.add_argument("--alignment", metavar="FILE", help="alignment file from hetmerge align (default: align now)")
    s.add_argument("-o", "--output", default="hetmerge-sweep", metavar="DIR", help="(default: %(default)s)")
    add_option_flags(s, only=["data", "target_data", "lambdas", "acc_tol", "fill", "batch_size", "device", "method",
                              "objective", "restarts", "max_iter", "tol", "seed", "allow_nonfinite"])
    _common(s)
    s.set_defaults(func=cmd_sweep)

    c = sub.add_parser("convert", help="convert a checkpoint between PyTorch and safetensors", epilog=_EPILOG)
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--format", choices=["safetensors", "torch"], default=None, help="(default: from OUT's suffix)")
    c.add_argument("--force", action="store_true", help="replace OUT when it exists")
    _layout_args(c)
    _common(c)
    c.set_defaults(func=cmd_convert)

    b = sub.add_parser("bench", help="benchmark the primitives and alignment across widths, ours vs references "
                       "(needs a source checkout)", epilog=_EPILOG)
    b.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024], help="(default: %(default)s)")
    b.add_argument("--repeat", type=int, default=3, help="best of N (default: %(default)s)")
    b.add_argument("--only", nargs="+", default=None, help="suites to run, e.g. interpolate cost_matrix align")
    b.add_argument("--bench-dir", default=None, metavar="DIR", help="the checkout's bench/ folder (default: found "
                   "from the installed package or the current folder)")
    b.add_argument("-o", "--output", default="hetmerge-bench", metavar="DIR", help="(default: %(default)s)")
    _common(b)
    b.set_defaults(func=cmd_bench)
    from .cli_tasks import add_parser as add_tasks_parser  # merge-tasks: hetmerge/cli_tasks.py
    add_tasks_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    ui = UI(quiet=args.quiet, verbose=args.verbose)
    prog = f"hetmerge {args.command}"

    def fail(code: int, msg: str) -> int:
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return code

    from .architectures import ArchError
    from .checkpoint import CheckpointError, UnsafeCheckpointError
    from .plan import PlanError

    try:
        _torch_setup(args)
        return args.func(args, ui)
    except KeyboardInterrupt:
        return fail(130, "interrupted (outputs are written atomically: nothing half-written was left)")
    except (PlanError, ArchError) as exc:
        return fail(EXIT_USAGE, str(exc))
    except UnsafeCheckpointError as exc:
        return fail(EXIT_FILE, str(exc))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        return fail(EXIT_FILE, exc.args[-1] if isinstance(exc.args[-1], str) and exc.filename is None else
                    f"{exc.filename}: {exc.strerror}")
    except CheckpointError as exc:
        return fail(EXIT_FILE, str(exc))
    except IncompatibleError as exc:
        return fail(EXIT_INCOMPATIBLE, str(exc))
    except Exception as exc:   # a bug or an unforeseen input: say what happened, traceback on -v
        from .spec import SpecError
        if isinstance(exc, SpecError):
            return fail(EXIT_INCOMPATIBLE, str(exc))
        if args.verbose:
            traceback.print_exc()
        return fail(EXIT_INTERNAL, f"{type(exc).__name__}: {exc}" +
                    ("" if args.verbose else " (run with -v for the traceback; please report it)"))


if __name__ == "__main__":
    raise SystemExit(main())
