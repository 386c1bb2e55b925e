"""`hetmerge inspect`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import layer_lams, load_model, plan_from_args, prepare
from .outputs import check_output, plan_inputs
from ..merging import memory_estimate
from .hf_dirs import cmd_inspect_hf, is_hf_dir
from .ui import EXIT_OK, UI, human


def cmd_inspect(args, ui: UI) -> int:
    if is_hf_dir(args.base) and is_hf_dir(args.target):   # Hugging Face model directories
        return cmd_inspect_hf(args, ui)
    from .. import report as R
    from ..checkpoint import detect_format

    plan = plan_from_args(args)
    if args.json:
        check_output(Path(args.json), plan_inputs(plan), "--json output")
    base, sa = load_model(plan.base, "base", meta=True)
    target, sb = load_model(plan.target, "target", meta=True)
    pairing, bspec, tspec, warns = prepare(base, target, plan.layer_map)
    info: dict[str, Any] = {"models": {}, "layer_map": [], "links": [], "warnings": list(warns)}

    for side, model, spec, ref in (("base", base, bspec, plan.base), ("target", target, tspec, plan.target)):
        sd = model.state_dict()
        n_params = sum(v.numel() for v in sd.values() if v.is_floating_point())
        nbytes = sum(v.numel() * v.element_size() for v in sd.values())
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
        groups = [{"group": g, "size": spec.sizes.get(g), "fixed": g in spec.fixed, "axes": spec.axis_count(g),
                   "members": [f"{k}[{ax}]" for k, ax in spec.groups[g]]} for g in spec.groups]
        info["models"][side] = {"file": str(ref.weights), "format": detect_format(ref.weights),
                                "arch": ref.arch.describe(), "parameters": n_params, "bytes": nbytes,
                                "dtypes": dtypes, "layers": [l.name for l in spec.layers], "groups": groups}
        ui.out(f"{side}: {ref.weights} ({info['models'][side]['format']}, {', '.join(dtypes)})")
        ui.out(f"  architecture {ref.arch.describe()}: {n_params:,} parameters, {human(nbytes)}")
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
    K = len(o.lambdas) if isinstance(o.lambdas, list) else int(o.lambdas)
    mem = memory_estimate(pairing, sd_a, sd_b, K)
    bytes_a, bytes_b, cost, sweep_chunk = (mem["base_weights"], mem["target_weights"], mem["largest_cost_matrix"],
                                           mem["sweep_stacked_weights"])
    info["memory_estimate_bytes"] = mem
    ui.out("")
    ui.out("memory estimate (weights in their stored dtype, float32 costs):")
    ui.out(f"  align: both models {human(bytes_a + bytes_b)} + largest cost matrix {human(cost)} "
           f"= {human(mem['align_peak'])}")
    ui.out(f"  merge: in memory {human(mem['merge_in_memory_peak'])}; streamed from safetensors "
           f"about {human(mem['merge_streaming_peak'])} (blocks of base rows)")
    ui.out(f"  sweep of {K} λ: both models + stacked merged weights {human(sweep_chunk)} = {human(mem['sweep_peak'])}")
    for w in info["warnings"]:
        ui.warn(w)
    layer_lams(o.lam, pairing)
    ui.out("")
    ui.out("plan OK: these models can be aligned and merged as planned")
    if args.json:
        from ..report import write_json
        write_json(info, args.json)
        ui.info(f"wrote {args.json}")
    return EXIT_OK
