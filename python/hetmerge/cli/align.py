"""`hetmerge align`."""
from __future__ import annotations

from pathlib import Path

from ..data import load_eval_data
from .alignments import align, save_alignment
from .models import load_model, pick_device, plan_from_args, prepare
from .outputs import check_output, plan_inputs
from .hf_dirs import cmd_align_hf, is_hf_dir
from .ui import EXIT_OK, UI


def cmd_align(args, ui: UI) -> int:
    if is_hf_dir(args.base) and is_hf_dir(args.target):   # Hugging Face model directories
        return cmd_align_hf(args, ui)
    if getattr(args, "heads", None) is not None:
        from ..plan import PlanError
        raise PlanError("--heads applies to Hugging Face model directories (traced models take their "
                        "attention structure from the trace)")
    plan = plan_from_args(args)
    out = Path(args.output)
    check_output(out, plan_inputs(plan), "alignment output")
    dev = pick_device(plan.options)
    fin = {"check_finite": True, "allow_nonfinite": plan.options.allow_nonfinite, "ui": ui}
    base, _ = load_model(plan.base, "base", dev, **fin)
    target, _ = load_model(plan.target, "target", dev, **fin)
    pairing, _, _, warns = prepare(base, target, plan.layer_map)
    for w in warns:
        ui.warn(w)
    data = None
    if plan.options.method == "activation":
        data = load_eval_data(plan.options.data, base, dev)
    res, wall = align(plan, base, target, ui, data)
    save_alignment(plan, res, wall, out)
    tr = res.trace
    ui.out(f"aligned {plan.target.weights.name} to {plan.base.weights.name}: {len(res.maps)} index maps, "
           f"normalized objective {tr[0]:.4f} (by position) -> {tr[-1]:.4f} after {res.iterations} sweeps, "
           f"{'converged' if res.converged else 'NOT converged (raise --max-iter)'}, {wall:.2f} s")
    for bl, case in res.cases.items():
        ui.info(f"  {bl} <- {pairing.layer_map.get(bl)}: {case}")
    ui.out(f"wrote {out}")
    return EXIT_OK
