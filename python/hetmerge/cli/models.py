"""Models from plans: threads and device, checkpoints loaded and scanned (fingerprint, NaN/inf),
modules built, the pairing prepared, the plan's λ resolved."""
from __future__ import annotations

import os

from .ui import UI, IncompatibleError

_SCANS: dict = {}   # one pass per weights file per run: (file identity, selection) -> WeightScan


def torch_setup(args) -> None:
    import torch

    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
        import hetmerge as hm
        hm.set_num_threads(threads)


def scan(ref):
    """checkpoint.scan_weights of a plan side, cached by the file's identity and size/mtime, so the
    finiteness check at load time and the fingerprints of the outputs share one read of the file."""
    from ..checkpoint import scan_weights

    st = os.stat(ref.weights)
    key = (os.path.realpath(ref.weights), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, ref.sub_key,
           ref.key_prefix)
    if key not in _SCANS:
        _SCANS[key] = scan_weights(ref.weights, ref.sub_key, ref.key_prefix)
    return _SCANS[key]


def fingerprint(ref) -> dict:
    """Identity of a checkpoint's weights, independent of its format: blake2b over every tensor's
    name, dtype, shape and bytes (checkpoint.scan_state)."""
    from ..checkpoint import FINGERPRINT_KIND

    return {"file": str(ref.weights), "bytes": ref.weights.stat().st_size, "kind": FINGERPRINT_KIND,
            "digest": scan(ref).digest}


def refuse_nonfinite(ref, side: str, allow: bool, ui: UI) -> None:
    """Refuse weights holding NaN/inf (they make the assignment fail or the merge NaN), naming the tensors."""
    from ..checkpoint import CheckpointError

    bad = scan(ref).nonfinite
    if not bad:
        return
    listed = ", ".join(f"{k!r} ({n} values)" for k, n in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if allow:
        ui.warn(f"{side}.weights {ref.weights}: non-finite values (NaN/inf) in {listed}; kept (--allow-nonfinite)")
        return
    raise CheckpointError(f"{side}.weights {ref.weights}: non-finite values (NaN/inf) in {listed}; they would "
                          "break the alignment and poison the merge. Fix the checkpoint, or pass "
                          "--allow-nonfinite (plan key allow_nonfinite) to use it anyway")


def load_model(ref, side: str, device: str = "cpu", meta: bool = False, check_finite: bool = False,
                allow_nonfinite: bool = False, ui: UI | None = None):
    """(module, state) for one plan side; meta=True builds the module without weights memory.
    check_finite: scan the weights once (streamed) and refuse NaN/inf unless allow_nonfinite."""
    from ..architectures import ArchError, build, check_weights
    from ..checkpoint import LazyState, detect_format, load_state

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
            from ..checkpoint import strip_prefix
            stored = list(LazyState(path, "").infos) if detect_format(path) == "safetensors" else \
                list(load_state(path, sub_key=ref.sub_key, key_prefix=""))
            renamed = strip_prefix(stored, path)
            if any(k != v for k, v in renamed.items()):
                k0 = stored[0]
                hint = (f" (the keys were read without a wrapper prefix: {k0!r} -> {renamed[k0]!r}; pass "
                        "--key-prefix '' to keep them as stored)")
        raise IncompatibleError(str(exc) + hint) from None
    if check_finite:
        refuse_nonfinite(ref, side, allow_nonfinite, ui or UI())
    if not meta:
        missing = {k: v for k, v in model.state_dict().items() if k not in state}   # integer bookkeeping
        model.load_state_dict({**missing, **state})
        model = model.to(device).eval()
    return model, state


def prepare(base, target, layer_map):
    """Pairing of two modules, with library errors turned into what-to-change messages: a layer
    map key that names no layer is a bad argument (exit 2), models with nothing to pair or layers
    of different kinds paired are incompatible (exit 4)."""
    import warnings

    from ..alignment import prepare
    from ..plan import PlanError
    from ..pairing import LayerMapError, NothingToAlignError
    from ..spec import SpecError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pairing, bspec, tspec = prepare(base, target, layer_map)
        except LayerMapError as exc:
            raise PlanError(f"{exc}. Fix layer_map") from None
        except NothingToAlignError as exc:
            raise IncompatibleError(str(exc)) from None
        except SpecError as exc:
            raise IncompatibleError(f"{exc}. Change layer_map so that it pairs layers of the same kind "
                                    "(Linear with Linear, ConvNd with ConvNd of equal kernel size), or "
                                    "describe the model with a factory that fx can trace") from None
    return pairing, bspec, tspec, [str(w.message) for w in caught]


def pick_device(opts) -> str:
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


def plan_from_args(args, need_weights: bool = True):
    from ..plan import load_plan, options_from_args

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


def lambda_grid(opts):
    import torch

    if isinstance(opts.lambdas, list):
        return torch.tensor(sorted(set(opts.lambdas)), dtype=torch.float64)
    return torch.linspace(0, 1, int(opts.lambdas), dtype=torch.float64)


def layer_lams(lam, pairing):
    """The plan's λ with per-layer keys resolved like layer-map keys (hm.merge's own rule): a key
    naming no layer is a bad argument (exit 2), one naming an unpaired layer is incompatible (4)."""
    from ..merging import layer_lams
    from ..plan import PlanError
    from ..pairing import LayerMapError, resolve_layer

    if isinstance(lam, dict):
        for k in lam:
            try:
                resolve_layer(k, pairing.base_layers, "lam", "base", label="")
            except LayerMapError as exc:
                raise PlanError(str(exc)) from None
    try:
        return layer_lams(pairing, lam)
    except LayerMapError as exc:
        raise IncompatibleError(f"{exc}; set λ only for paired layers") from None
