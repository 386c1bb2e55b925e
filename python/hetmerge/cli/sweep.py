"""`hetmerge sweep`."""
from __future__ import annotations

from pathlib import Path

from ..data import load_eval_data
from .alignments import alignment_for
from .models import fingerprint, lambda_grid, load_model, pick_device, plan_from_args, prepare
from .outputs import SWEEP_FILES, check_output, plan_inputs
from .ui import EXIT_OK, UI, IncompatibleError


def cmd_sweep(args, ui: UI) -> int:
    import warnings

    import hetmerge as hm

    from .. import report as R
    from ..checkpoint import atomic_dir, check_replaceable_dir

    plan = plan_from_args(args)
    o = plan.options
    dev = pick_device(o)
    if o.data is None:
        raise IncompatibleError("data: a sweep needs evaluation data: --data digits|mnist1d|FILE.npz "
                                "(or plan key 'data')")
    outdir = Path(args.output)
    check_output(outdir, plan_inputs(plan), "output folder", folder=True)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable_dir(outdir, SWEEP_FILES)     # refuse before the heavy work, not after
    fin = {"check_finite": True, "allow_nonfinite": o.allow_nonfinite, "ui": ui}
    base, _ = load_model(plan.base, "base", dev, **fin)
    target, _ = load_model(plan.target, "target", dev, **fin)
    pairing, _, _, warns = prepare(base, target, plan.layer_map)
    for w in warns:
        ui.warn(w)
    data = load_eval_data(o.data, base, dev)
    tdata = load_eval_data(o.target_data, base, dev, "target_data")
    repair = load_eval_data(o.repair, base, dev, "repair", split="train")
    alignment, res = alignment_for(plan, base, target, pairing, ui, data)
    trace = list(res.trace) if res is not None else []   # empty when the maps came from a file
    lam = lambda_grid(o)
    curves = {}
    bar = ui.bar(total=2, desc="sweep", unit="curve")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, r in (("unaligned", None), ("aligned", alignment)):
            c = hm.sweep(base, target, r, lam, data=data, target_data=tdata, tol=o.acc_tol, fill=o.fill,
                         layer_map=plan.layer_map if r is None else None, batch_size=o.batch_size,
                         repair=repair)
            curves[name] = c
            bar.set_postfix_str(f"{name}: barrier {c.barrier:.3f}, λ* {c.lam_star:.2f}")
            bar.update(1)
    bar.close()
    doc = {"created_by": "hetmerge sweep", "versions": R.versions(), "plan": plan.to_dict(),
           "base": fingerprint(plan.base), "target": fingerprint(plan.target),
           "layer_map": pairing.layer_map, "cases": pairing.cases,
           "alignment": {"file": str(plan.alignment) if plan.alignment else None, "trace": trace,
                         "objective": res.objective if res is not None else None},
           "repair": o.repair,
           **R.sweep_curves(curves)}
    rows, summary = R.sweep_tables(doc)
    ui.out(R.table(rows))
    ui.out("")
    ui.out(R.table(summary, align_left=[""]))
    # every file lands in a temporary folder that replaces outdir only when all are written
    with atomic_dir(outdir, SWEEP_FILES) as tmp:
        R.write_sweep_report(tmp, doc, rows, trace, f"{plan.base.weights.name} ← {plan.target.weights.name}",
                             f"base `{plan.base.weights}`, target `{plan.target.weights}`, data {o.data}" +
                             (f"; every merge REPAIRed on {o.repair}." if o.repair else "."),
                             f"λ sweep on {o.data}: aligned vs unaligned")
    ui.out(f"wrote {outdir}/sweep.json, sweep.png, report.md")
    return EXIT_OK
