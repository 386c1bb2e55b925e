"""`hetmerge inspect`, `align` and `merge` on Hugging Face model directories (config.json +
safetensors shards): groups and links from the config's architecture family (residual stream,
attention heads, MLP units; docs/transformers.md), weight matching straight from the
memory-mapped shards, and a streamed, sharded, atomic directory-to-directory merge. Without an
alignment, merge pairs same-named layers with maps by position (a plain linear merge)."""
from __future__ import annotations

import time
from pathlib import Path

import torch.nn as nn

from .outputs import check_output
from .ui import EXIT_OK, UI, IncompatibleError, human


def is_hf_dir(path) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def hf_pair(base_dir: Path, target_dir: Path, heads: str = "inside"):
    """(pairing, (base state, spec), (target state, spec)) of two directories of one family; heads:
    transformer_spec's "inside" or "whole"."""
    from ..hf import HFState
    from ..pairing import pair_specs
    from ..transformer_spec import canonical_state, layer_map_by_name, model_type, transformer_spec

    base, target = HFState(base_dir), HFState(target_dir)
    mb, mt = model_type(base.config), model_type(target.config)
    if mb != mt:
        raise IncompatibleError(f"{target_dir}: model_type {mt!r} differs from the base's {mb!r}; fusing "
                                "different families is not a merge")
    cb, ct = canonical_state(base.config, base), canonical_state(target.config, target)
    sa, sb = transformer_spec(cb, base.config, heads), transformer_spec(ct, target.config, heads)
    pairing = pair_specs(cb, ct, sa, sb, layer_map_by_name(sa, sb))
    return pairing, (base, sa), (target, sb)


def cmd_inspect_hf(args, ui: UI) -> int:
    from .. import report as R

    base_dir, target_dir = Path(args.base), Path(args.target)
    pairing, (base, sa), (target, sb) = hf_pair(base_dir, target_dir)
    for side, folder, state, spec in (("base", base_dir, base, sa), ("target", target_dir, target, sb)):
        meta = state.meta()
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in meta.values() if t.is_floating_point()})
        n_params = sum(t.numel() for t in meta.values() if t.is_floating_point())
        ui.out(f"{side}: {folder}/ (Hugging Face, {state.config.get('model_type')}, {', '.join(dtypes)}, "
               f"{len(state.shards)} shard(s))")
        ui.out(f"  {n_params:,} parameters, {human(state.nbytes)}; {len(spec.layers)} layers")
        ui.out("  permutation groups (hidden-unit axes that move together):")
        rows = [{"group": g, "units": spec.sizes.get(g, "-"), "axes": spec.axis_count(g),
                 "kind": "fixed" if g in spec.fixed else "permutable"} for g in spec.groups]
        ui.out("    " + R.table(rows, align_left=["group", "kind"]).replace("\n", "\n    "))
    lrows = [{"link": n, "base units": l.n_a, "target units": l.n_b, "solved": l.free,
              "map": ("fixed axis" if not l.free else "permutation") if l.n_a == l.n_b else
              "zero-padding" if l.n_a > l.n_b else "units dropped"}
             for n, l in pairing.links.items()]
    ui.out("")
    ui.out(f"{len(pairing.layer_map)} layers paired by name; links:")
    ui.out("  " + R.table(lrows, align_left=["link", "map"]).replace("\n", "\n  "))
    ui.out("")
    rope = any(t.head_units[0] == 1 for t in spec.ties.values())
    inside = ("V/O dimensions move inside a head (rotary embeddings keep Q/K in place)" if rope else
              "inside a head Q/K dimensions move together, and V/O dimensions together")
    ui.out(f"attention heads move as whole heads (a key/value head with its query heads; groups "
           f"<block>.attn.qk and <block>.attn.vo share one head map); {inside}. Without --alignment, "
           "hetmerge merge on these directories is a plain linear merge of same-named layers")
    return EXIT_OK


class _Weights(nn.Module):
    """hm.align takes modules but reads only their state dicts: here a directory's canonical tensors,
    memory-mapped from its shards."""

    def __init__(self, state):
        super().__init__()
        self._weights = state

    def state_dict(self, *args, keep_vars: bool = False, **kwargs):
        return {k: self._weights[k] for k in self._weights}


def _fingerprint(folder: Path) -> dict:
    from ..checkpoint import FINGERPRINT_KIND, scan_state
    from ..hf import HFState

    state = HFState(folder)
    return {"file": str(folder), "bytes": state.nbytes, "kind": FINGERPRINT_KIND, "digest": scan_state(state).digest}


def cmd_align_hf(args, ui: UI) -> int:
    """Weight matching of the target directory to the base directory, written as an alignment file."""
    from ..alignment import Alignment, align
    from ..options import options_from_args, options_from_mapping
    from ..transformer_spec import layer_map_by_name

    base_dir, target_dir, out = Path(args.base), Path(args.target), Path(args.output)
    check_output(out, [("base", base_dir), ("target", target_dir)], "alignment output")
    o = options_from_mapping(options_from_args(args), "flags")
    if o.method != "weight":
        raise IncompatibleError("method: Hugging Face directories are aligned by weight matching only (no data "
                                "is run through them here)")
    heads = getattr(args, "heads", None) or "inside"
    pairing, (base, sa), (target, sb) = hf_pair(base_dir, target_dir, heads)

    from ..transformer_spec import canonical_state
    cb, ct = canonical_state(base.config, base), canonical_state(target.config, target)
    t0 = time.perf_counter()
    res = align(_Weights(cb), _Weights(ct), method="weight", layer_map=layer_map_by_name(sa, sb),
                restarts=o.restarts, max_iter=o.max_iter, tol=o.tol, seed=o.seed, objective=o.objective,
                base_spec=sa, target_spec=sb)
    wall = time.perf_counter() - t0
    info = {"created_by": "hetmerge align", "method": res.method, "objective": res.objective,
            "trace": list(res.trace), "iterations": res.iterations, "converged": res.converged,
            "restart_objectives": list(res.restart_objectives), "timings": {**res.timings, "wall": wall},
            "hf": {"base": str(base_dir), "target": str(target_dir), "heads": heads}}
    Alignment(res.pairing, res.maps, {"base": _fingerprint(base_dir), "target": _fingerprint(target_dir)},
              info).save(out)
    tr = res.trace
    ui.out(f"aligned {target_dir} to {base_dir}: {len(res.maps)} index maps (residual stream, attention heads, MLP units), "
           f"normalized objective {tr[0]:.4f} (by position) -> {tr[-1]:.4f} after {res.iterations} sweeps, "
           f"{wall:.2f} s")
    ui.out(f"wrote {out}")
    return EXIT_OK


def _read_alignment_hf(path: Path, base_dir: Path, target_dir: Path, ui: UI):
    from ..alignment import Alignment, AlignmentError

    try:
        # the spec the alignment was computed with: heads moved whole or also inside
        info = Alignment.read(path).get("info")
        hf = info.get("hf") if isinstance(info, dict) else None
        heads = hf.get("heads", "inside") if isinstance(hf, dict) else "inside"
        if heads not in ("inside", "whole"):
            raise IncompatibleError(f"alignment {path}: info.hf.heads is {heads!r}, expected 'inside' or "
                                    "'whole'; rerun hetmerge align")
        alignment = Alignment.load(path, pairing=hf_pair(base_dir, target_dir, heads)[0])
    except AlignmentError as exc:
        raise IncompatibleError(str(exc).replace("align again", "rerun hetmerge align")) from None
    changed, unchecked = alignment.check_fingerprints({"base": _fingerprint(base_dir),
                                                       "target": _fingerprint(target_dir)})
    for side in changed + unchecked:
        ui.warn(f"alignment {path}: cannot vouch that the {side} weights are the ones it was computed on")
    return alignment


def cmd_merge_hf(args, ui: UI) -> int:
    from ..hf_merge import merge_hf
    from ..options import options_from_args, options_from_mapping

    o = options_from_mapping(options_from_args(args), "flags")
    lam = o.lam

    base_dir, target_dir, out = Path(args.base), Path(args.target), Path(args.output)
    check_output(out, [("base", base_dir), ("target", target_dir)], "output folder", folder=True)
    from ..hf import read_config
    from ..transformer_spec import model_type
    mb, mt = model_type(read_config(base_dir)), model_type(read_config(target_dir))
    if mb != mt:
        raise IncompatibleError(f"{target_dir}: model_type {mt!r} differs from the base's {mb!r}; fusing "
                                "different families is not a merge")
    alignment = _read_alignment_hf(Path(args.alignment), base_dir, target_dir, ui) if args.alignment else None
    if isinstance(lam, dict):   # block keys expanded, then checked like a file merge's (bad key: 2, unpaired: 4)
        from ..plan import PlanError
        from ..spec import LayerMapError
        from ..transformer_spec import expand_block_lams
        from .models import layer_lams
        pairing = alignment.pairing if alignment is not None else hf_pair(base_dir, target_dir)[0]
        try:
            lam = expand_block_lams(lam, pairing.base_layers)
        except LayerMapError as exc:
            raise PlanError(str(exc)) from None
        layer_lams(lam, pairing)
    t0 = time.perf_counter()
    merge_hf(base_dir, target_dir, out, lam=lam if isinstance(lam, dict) else float(lam), res=alignment,
             fill=o.fill)
    ui.out(f"merged {target_dir} into {base_dir} at λ = {lam} ({time.perf_counter() - t0:.2f} s): a Hugging Face "
           "directory with the base's config and tokenizer files")
    ui.out(f"wrote {out}/")
    return EXIT_OK
