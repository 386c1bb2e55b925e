"""`hetmerge zoo`: every pair of a folder of checkpoints aligned and swept, on one core, a process
pool (--jobs N) or Ray (--executor ray); resumable. Library: hetmerge.fleet."""
from __future__ import annotations

import os
from pathlib import Path

from .ui import EXIT_OK, UI

ZOO_OPTIONS = ["data", "method", "objective", "restarts", "max_iter", "tol", "seed", "lambdas", "acc_tol", "fill",
               "batch_size", "allow_nonfinite"]


def add_parser(sub) -> None:
    from ..fleet import EXECUTORS
    from ..plan import add_option_flags
    from .parser_common import EPILOG, common_args, layout_args

    z = sub.add_parser("zoo", help="all pairs of a folder of checkpoints: compatibility, alignment, λ sweep; "
                       "barrier heat map, λ* table, assembly order (process pool or Ray; resumable)",
                       description="Score every checkpoint under ZOO_DIR alone, then for every (base, target) "
                       "pair (or a seeded sample) check compatibility, align the target to the base, sweep λ on "
                       "the validation split and report the test split too. Each result is saved as it "
                       "finishes: rerunning the same command after a crash or Ctrl-C skips finished pairs. "
                       "Alignments land in OUT/alignments/ for `hetmerge merge --alignment`. Docs: docs/zoo.md",
                       epilog=EPILOG)
    z.add_argument("zoo_dir", metavar="ZOO_DIR", help="folder of checkpoints (.safetensors, .pt, .pth, .bin; "
                   "searched recursively)")
    z.add_argument("-o", "--output", default="hetmerge-zoo", metavar="OUT", help="results folder, reused by a "
                   "rerun (default: %(default)s)")
    g = z.add_argument_group("models")
    g.add_argument("--arch", default="auto", metavar="DESC", help="architecture of every model, as for "
                   "hetmerge align (default: %(default)s: read from the weights)")
    layout_args(g)
    s = z.add_argument_group("pairs")
    s.add_argument("--pairs", type=int, default=None, metavar="N", help="run a seeded sample of N pairs "
                   "(default: all)")
    s.add_argument("--sample", type=int, default=0, metavar="SEED", help="seed of --pairs (default: %(default)s)")
    s.add_argument("--one-way", action="store_true", help="each unordered pair once, the better model on "
                   "validation as the base (default: both directions)")
    s.add_argument("--universe", action="store_true", help="also align all models at once into a C2M3 universe "
                   "(hm.align_many) and show its barriers next to the pairwise ones")
    e = z.add_argument_group("execution")
    e.add_argument("--executor", choices=EXECUTORS, default=None, help="where tasks run (default: inprocess, or "
                   "pool when --jobs > 1)")
    e.add_argument("--jobs", type=int, default=None, metavar="N", help="pool: worker processes (default: all "
                   "cores); ray without --address: CPUs of the local Ray")
    e.add_argument("--address", default=None, metavar="ADDR", help="ray: address of an existing cluster "
                   "('auto', 'ray://head:10001'; default: start a local Ray)")
    e.add_argument("--retries", type=int, default=2, metavar="N", help="retries of a task that fails or whose "
                   "worker dies, before it is recorded as failed (default: %(default)s)")
    add_option_flags(z, only=ZOO_OPTIONS)
    common_args(z)
    z.set_defaults(func=cmd_zoo)


def pair_saved(ui: UI, bar, doc: dict, reused: bool) -> None:
    """Called once per pair as soon as its result is on disk (reused or computed)."""
    s = (doc.get("result") or {}).get("sweep")
    what = f"barrier {s['barrier']:.3f} λ* {s['lam_star']:.2f}" if s else doc["status"]
    bar.set_postfix_str(f"{doc['base']} <- {doc['target']}: {what}{' (saved before)' if reused else ''}")
    bar.update(1)
    if doc["status"] == "failed":
        ui.warn(f"pair {doc['base']} <- {doc['target']} failed after {doc['attempts']} attempt(s): {doc['reason']}")


def _config(args):
    from ..fleet.study import ZooConfig
    from ..plan import PlanError, options_from_args, options_from_mapping, parse_arch_arg
    from .models import lambda_grid

    o = options_from_mapping(options_from_args(args))
    if o.data is None:
        raise PlanError("data: the zoo study sweeps λ on data: --data digits|mnist1d|FILE.npz (a .npz needs "
                        "X_val, y_val and X_test, y_test)")
    if args.pairs is not None and args.pairs < 1:
        raise PlanError(f"--pairs: expected an integer >= 1, got {args.pairs}")
    if isinstance(o.data, str) and o.data.endswith(".npz") and not Path(o.data).exists():
        raise FileNotFoundError(f"data: {o.data}: no such file")
    return ZooConfig(zoo_dir=Path(args.zoo_dir), out=Path(args.output), data=o.data,
                     arch=parse_arch_arg(args.arch), sub_key=args.sub_key, key_prefix=args.key_prefix,
                     lambdas=lambda_grid(o).tolist(), acc_tol=o.acc_tol, fill=o.fill, method=o.method,
                     objective=o.objective, restarts=o.restarts, max_iter=o.max_iter, tol=o.tol, seed=o.seed,
                     batch_size=o.batch_size, pairs=args.pairs, sample_seed=args.sample, one_way=args.one_way,
                     allow_nonfinite=o.allow_nonfinite, universe=args.universe)


def _executor(args):
    from ..fleet import make_executor
    from ..fleet.tasks import PRELOAD
    from ..plan import PlanError

    kind = args.executor or ("pool" if (args.jobs or 1) > 1 else "inprocess")
    if args.jobs is not None and args.jobs < 1:
        raise PlanError(f"--jobs: expected an integer >= 1, got {args.jobs}")
    if args.retries < 0:
        raise PlanError(f"--retries: expected an integer >= 0, got {args.retries}")
    if args.address and kind != "ray":
        raise PlanError("--address: only with --executor ray")
    try:
        return make_executor(kind, workers=args.jobs, retries=args.retries, threads=args.threads,
                             address=args.address, preload=PRELOAD)
    except RuntimeError as exc:   # Ray missing, or its cluster unreachable
        raise PlanError(f"--executor {kind}: {exc}") from None


def cmd_zoo(args, ui: UI) -> int:
    from .. import report as R
    from ..checkpoint import CheckpointError
    from ..fleet.study import find_models, run_zoo
    from ..fleet.summary import write_outputs
    from ..fleet.tasks import check_data
    from ..plan import PlanError

    cfg = _config(args)
    check_data(cfg.data)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise CheckpointError(f"output folder {cfg.out}: exists and is not a folder")
    if cfg.out.resolve() == cfg.zoo_dir.resolve():
        raise PlanError(f"-o {cfg.out}: is ZOO_DIR itself; choose another folder (one inside ZOO_DIR is fine: "
                        "it is not scanned for checkpoints)")
    try:
        n = len(find_models(cfg.zoo_dir, exclude=cfg.out))   # refuse before starting workers
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    bars = {}

    def on_model(doc, reused):
        if "m" not in bars:
            bars["m"] = ui.bar(total=n, desc="models", unit="model")
        bars["m"].update(1)
        if doc["status"] == "failed":
            ui.warn(f"model {doc['name']} failed after {doc['attempts']} attempt(s): {doc['reason']}")

    def on_pair(doc, reused):
        if "m" in bars:
            bars.pop("m").close()
        if "p" not in bars:
            bars["p"] = ui.bar(desc="pairs", unit="pair")
        pair_saved(ui, bars["p"], doc, reused)

    with _executor(args) as ex:
        ui.out(f"hetmerge zoo: {n} checkpoints under {cfg.zoo_dir}, executor {ex.name} ({ex.workers} "
               f"worker{'s' if ex.workers > 1 else ''}) -> {cfg.out}/")
        try:
            rep = run_zoo(cfg, ex, on_model, on_pair, ui.info)
        finally:
            for b in bars.values():
                b.close()
    names = write_outputs(rep, cfg.out)
    rows = rep["lam_table"]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["barrier val"])
    ui.out("")
    ui.out(R.table(ok[:20], align_left=["base", "target", "layers"]) if ok else "(no pair could be merged)")
    if len(ok) > 20:
        ui.out(f"... {len(ok) - 20} more pairs in {cfg.out}/report.md")
    order = rep["assembly_order"]
    if order["base"]:
        ui.out(f"\nassembly order: {order['base']} (base)" + "".join(f" <- {e['model']}" for e in order["order"]))
    c, run = rep["pair_counts"], rep["run"]
    ui.out(f"\npairs: {c['ok']} ok, {c['incompatible']} incompatible, {c['failed']} failed; "
           f"{run['pairs_computed']} computed, {run['pairs_reused']} reused from {cfg.out}/pairs; "
           f"{run['wall_s']:.1f} s")
    if c["failed"]:
        ui.warn(f"{c['failed']} pair(s) failed (reasons in report.json); rerun the command to retry them")
    uni = rep.get("universe")
    if uni and not uni.get("available"):
        ui.warn(uni["note"])
    ui.out(f"wrote {cfg.out}/" + ", ".join(names) + ", alignments/, pairs/, models/")
    return EXIT_OK
