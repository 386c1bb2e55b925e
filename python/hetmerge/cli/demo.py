"""`hetmerge demo`."""
from __future__ import annotations

from pathlib import Path

from .ui import EXIT_OK, UI, IncompatibleError


def cmd_demo(args, ui: UI) -> int:
    import torch

    import hetmerge as hm

    from .. import report as R
    from ..demo import DemoConfig, markdown, run_demo, terminal_summary

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
