"""Alignments for the subcommands: computed now (with a progress bar) or read from a file and
checked against the models at hand."""
from __future__ import annotations

import time
from pathlib import Path

from .models import fingerprint
from .ui import UI, IncompatibleError

def save_alignment(plan, res, wall_s: float, out: Path) -> None:
    """Write hm.align's result as an alignment file, with both models' fingerprints and provenance."""
    from .. import report as R
    from ..alignment import Alignment

    info = {"created_by": "hetmerge align", "versions": R.versions(),
            "arch": {"base": plan.base.arch.describe(), "target": plan.target.arch.describe()},
            "method": res.method, "objective": res.objective, "trace": list(res.trace),
            "iterations": res.iterations, "converged": res.converged,
            "restart_objectives": list(res.restart_objectives),
            "timings": {**res.timings, "wall": wall_s}, "options": plan.options.to_dict()}
    fingerprints = {"base": fingerprint(plan.base), "target": fingerprint(plan.target)}
    Alignment(res.pairing, res.maps, fingerprints, info).save(out)


def read_alignment(path: Path, pairing, plan, ui: UI):
    """The Alignment in `path`, checked against the pairing of the plan's models; warns when the
    weights differ from those it was computed on."""
    from ..alignment import Alignment, AlignmentError

    try:
        alignment = Alignment.load(path, pairing=pairing)
    except AlignmentError as exc:
        raise IncompatibleError(str(exc).replace("align again", "rerun hetmerge align")) from None
    current = {side: fingerprint(getattr(plan, side)) for side in ("base", "target")}
    changed, unchecked = alignment.check_fingerprints(current)
    for side in unchecked:
        ui.warn(f"alignment {path}: written by an older hetmerge whose {side} fingerprint covered only "
                f"the first 256 values of each tensor; cannot check that {side} weights are unchanged "
                f"since ({alignment.fingerprints.get(side, {}).get('file')}). Rerun hetmerge align to record "
                "a full fingerprint")
    for side in changed:
        ui.warn(f"alignment {path}: {side} weights differ from the file it was computed for "
                f"({alignment.fingerprints[side].get('file')}); the maps may not fit these weights")
    return alignment


def align(plan, base, target, ui: UI, data=None):
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
        warnings.simplefilter("ignore", UserWarning)    # deep-to-shallow warnings were shown by prepare
        best = hm.align(base, target, method=o.method, layer_map=plan.layer_map, data=data,
                        restarts=o.restarts, max_iter=o.max_iter, tol=o.tol, seed=o.seed,
                        objective=o.objective, callback=on_sweep)
    bar.close()
    return best, time.perf_counter() - t0


def alignment_for(plan, base, target, pairing, ui: UI, data=None):
    """(Alignment, AlignResult or None): read from --alignment, or aligned now."""
    if plan.alignment is not None:
        return read_alignment(plan.alignment, pairing, plan, ui), None
    res, _ = align(plan, base, target, ui, data)
    return res.alignment, res
