"""`hetmerge inspect` and `hetmerge merge` on Hugging Face model directories (config.json +
safetensors shards): groups and links from the config's architecture family, and a streamed,
sharded, atomic directory-to-directory merge. Aligning directories is not wired in yet (docs/
transformers.md): merge pairs same-named layers with maps by position (a plain linear merge)."""
from __future__ import annotations

import time
from pathlib import Path

from .outputs import check_output
from .ui import EXIT_OK, UI, IncompatibleError, human


def is_hf_dir(path) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def hf_pair(base_dir: Path, target_dir: Path):
    """(pairing, (base state, spec), (target state, spec)) of two directories of one family."""
    from ..hf import HFState
    from ..pairing import pair_specs
    from ..transformer_spec import canonical_state, layer_map_by_name, model_type, transformer_spec

    base, target = HFState(base_dir), HFState(target_dir)
    mb, mt = model_type(base.config), model_type(target.config)
    if mb != mt:
        raise IncompatibleError(f"{target_dir}: model_type {mt!r} differs from the base's {mb!r}; fusing "
                                "different families is not a merge")
    cb, ct = canonical_state(base.config, base), canonical_state(target.config, target)
    sa, sb = transformer_spec(cb, base.config), transformer_spec(ct, target.config)
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
        rows = [{"group": g, "units": spec.sizes.get(g, "-"), "axes": len(spec.groups[g]),
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
    ui.out("attention internals (per-head Q/K, V/O maps) stay fixed in this version; "
           "hetmerge merge on these directories is a plain linear merge of same-named layers")
    return EXIT_OK


def cmd_merge_hf(args, ui: UI) -> int:
    from ..hf_merge import merge_hf
    from ..options import options_from_args, options_from_mapping

    o = options_from_mapping(options_from_args(args), "flags")
    lam = o.lam

    base_dir, target_dir, out = Path(args.base), Path(args.target), Path(args.output)
    check_output(out, [("base", base_dir), ("target", target_dir)], "output folder", folder=True)
    if getattr(args, "alignment", None):
        raise IncompatibleError("--alignment: aligning Hugging Face directories is not supported yet; merge them "
                                "without it (same-named layers, maps by position) or align in Python "
                                "(docs/transformers.md)")
    if isinstance(lam, dict):
        raise IncompatibleError("lam: per-layer λ is not supported for Hugging Face directories yet; give one λ")
    from ..hf import read_config
    from ..transformer_spec import model_type
    mb, mt = model_type(read_config(base_dir)), model_type(read_config(target_dir))
    if mb != mt:
        raise IncompatibleError(f"{target_dir}: model_type {mt!r} differs from the base's {mb!r}; fusing "
                                "different families is not a merge")
    t0 = time.perf_counter()
    merge_hf(base_dir, target_dir, out, lam=float(lam), fill=o.fill)
    ui.out(f"merged {target_dir} into {base_dir} at λ = {lam} ({time.perf_counter() - t0:.2f} s): a Hugging Face "
           "directory with the base's config and tokenizer files")
    ui.out(f"wrote {out}/")
    return EXIT_OK
