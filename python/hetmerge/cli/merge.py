"""`hetmerge merge`."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..data import load_eval_data
from .alignments import alignment_for
from .models import layer_lams, load_model, plan_from_args, prepare
from .outputs import check_output, plan_inputs
from .hf_dirs import cmd_merge_hf, is_hf_dir
from .ui import EXIT_OK, UI, IncompatibleError, human


def cmd_merge(args, ui: UI) -> int:
    if is_hf_dir(args.base) and is_hf_dir(args.target):   # Hugging Face model directories
        if getattr(args, "opt_repair", None) not in (None, "none"):
            raise IncompatibleError("repair: REPAIR runs data through the models; Hugging Face directories are "
                                    "merged without it")
        return cmd_merge_hf(args, ui)
    from ..checkpoint import LazyState, detect_format, save_state
    from ..merging import merge_items, stream_merge

    plan = plan_from_args(args)
    o = plan.options
    out = Path(args.output)
    check_output(out, plan_inputs(plan), "output")
    fmt = args.format or ("torch" if out.suffix.lower() in (".pt", ".pth", ".bin") else "safetensors")
    fin = {"check_finite": True, "allow_nonfinite": o.allow_nonfinite, "ui": ui}
    # REPAIR runs data through the merged model: it needs the whole model in memory
    streamable = (fmt == "safetensors" and not args.no_stream and o.repair is None and
                  detect_format(plan.base.weights) == detect_format(plan.target.weights) == "safetensors")
    if plan.alignment is not None and streamable:
        # never holds a model in memory: modules on the meta device give the pairing, the maps come
        # from the alignment file, the tensors stream from the memory-mapped files
        base, _ = load_model(plan.base, "base", meta=True, **fin)
        target, _ = load_model(plan.target, "target", meta=True, **fin)
    else:
        base, _ = load_model(plan.base, "base", **fin)
        target, _ = load_model(plan.target, "target", **fin)
    pairing, _, _, warns = prepare(base, target, plan.layer_map)
    for w in warns:
        ui.warn(w)
    lams = layer_lams(o.lam, pairing)
    data = load_eval_data(o.data, base, "cpu") if o.method == "activation" and plan.alignment is None else None
    alignment, _ = alignment_for(plan, base, target, pairing, ui, data)
    repair = load_eval_data(o.repair, base, "cpu", "repair", split="train")
    meta = {"created_by": "hetmerge merge", "base": str(plan.base.weights), "target": str(plan.target.weights),
            "lam": json.dumps(o.lam), "fill": o.fill, **({"repair": o.repair} if o.repair else {})}
    t0 = time.perf_counter()
    if streamable:
        items = merge_items(alignment.pairing, alignment.maps, lams)
        lb = LazyState(plan.base.weights, plan.base.key_prefix, plan.base.sub_key)
        lt = LazyState(plan.target.weights, plan.target.key_prefix, plan.target.sub_key)
        bar = ui.bar(total=lb.nbytes, desc="merge", unit="B", unit_scale=True)
        stats = stream_merge(lb, lt, out, items, fill=o.fill, metadata=meta,
                             progress=lambda k, n: bar.update(n))
        bar.close()
        how = f"streamed {human(stats['bytes'])} in blocks"
    else:
        import warnings

        import hetmerge as hm
        bar = ui.bar(total=1, desc="merge", unit="model")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            merged = hm.merge(base, target, alignment, lam=o.lam, fill=o.fill, repair=repair)
        save_state({k: v for k, v in merged.state_dict().items()}, out, format=fmt,
                   metadata=meta if fmt == "safetensors" else None)
        bar.update(1)
        bar.close()
        how = "in memory" + (f", REPAIRed on {o.repair} ({len(repair[0])} samples)" if o.repair else "")
    lam_s = o.lam if not isinstance(o.lam, dict) else ", ".join(f"{k}={v}" for k, v in o.lam.items())
    ui.out(f"merged {plan.target.weights.name} into {plan.base.weights.name} at λ = {lam_s} "
           f"(fill={o.fill}, {how}, {time.perf_counter() - t0:.2f} s): the result has the base's architecture")
    ui.out(f"wrote {out} ({fmt})")
    return EXIT_OK
