"""The argument parser: subcommands, their flags (plan options come from plan.Options), help."""
from __future__ import annotations

import argparse

from .inspect import cmd_inspect
from .align import cmd_align
from .merge import cmd_merge
from .sweep import cmd_sweep
from .merge_tasks import add_parser as add_merge_tasks_parser
from .assemble import add_parser as add_assemble_parser
from .parser_common import EPILOG, common_args, layout_args, model_args
from .convert import cmd_convert
from .demo import cmd_demo
from .bench import cmd_bench
from .zoo import add_parser as add_zoo_parser
from .fuse import add_parser as add_fuse_parser

def build_parser() -> argparse.ArgumentParser:
    from ..plan import add_option_flags

    try:
        from .. import __version__ as version
    except Exception:
        version = "?"
    p = argparse.ArgumentParser(
        prog="hetmerge", description="Merge neural networks whose layers differ in width and depth "
        "(Model Assembly Learning): align, merge, sweep λ, assemble.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"hetmerge {version}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole flow on a zoo of MLPs trained on offline real data (digits, "
                       "MNIST-1D): tables, report.json, plots, report.md",
                       description="Train (or load from the cache) a zoo of heterogeneous MLPs on sklearn digits "
                       "and MNIST-1D, align and sweep every architecture pair, plot the barrier heat map and "
                       "λ curves, and assemble several zoo models into one base. No downloads.",
                       epilog=EPILOG)
    d.add_argument("-o", "--output", default="hetmerge-demo", metavar="DIR", help="report folder (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="reduced zoo and grids (seconds; used by the tests)")
    d.add_argument("--datasets", nargs="+", choices=["digits", "mnist1d"], default=None,
                   help="data sets (default: both; --quick: digits)")
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    d.add_argument("--restarts", type=int, default=1, help="alignment restarts per pair (default: %(default)s)")
    d.add_argument("--cache-dir", default=None, metavar="DIR", help="zoo cache (default: $HETMERGE_CACHE_DIR or "
                   "~/.cache/hetmerge)")
    d.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    common_args(d)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="compatibility report of two checkpoints before any heavy work",
                       description="Permutation groups of each model, the layer map with each paired layer's "
                       "case, the index maps to find, parameters and a memory estimate. Builds the models "
                       "without loading weights. Refuses impossible plans with what to change.", epilog=EPILOG)
    model_args(i, positional_required=False)
    add_option_flags(i, only=["lam", "lambdas"])
    i.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    common_args(i)
    i.set_defaults(func=cmd_inspect)

    a = sub.add_parser("align", help="align TARGET to BASE: write an alignment file (JSON with the index maps)",
                       epilog=EPILOG)
    model_args(a, positional_required=False)
    a.add_argument("-o", "--output", default="alignment.json", metavar="FILE", help="(default: %(default)s)")
    add_option_flags(a, only=["method", "objective", "restarts", "max_iter", "tol", "seed", "data", "device",
                              "allow_nonfinite"])
    a.add_argument("--heads", choices=["inside", "whole"], default=None,
                   help="Hugging Face directories: attention heads move whole and their Q/K and V/O dimensions "
                        "inside them (inside, the default), or whole heads only (whole); the merge reads it "
                        "back from the alignment file")
    common_args(a)
    a.set_defaults(func=cmd_align)

    m = sub.add_parser("merge", help="merge TARGET into BASE at λ: write a checkpoint with the base's architecture",
                       description="Merge with the maps of --alignment (or align first). safetensors in and out "
                       "stream from memory-mapped files in blocks, so peak memory stays near a few blocks.",
                       epilog=EPILOG)
    model_args(m, positional_required=False)
    m.add_argument("--alignment", metavar="FILE", help="alignment file from hetmerge align (default: align now)")
    m.add_argument("-o", "--output", default="merged.safetensors", metavar="FILE",
                   help="output checkpoint; .pt/.pth/.bin -> PyTorch, else safetensors (default: %(default)s)")
    m.add_argument("--format", choices=["safetensors", "torch"], default=None, help="override the suffix")
    m.add_argument("--no-stream", action="store_true", help="merge in memory even when streaming is possible")
    add_option_flags(m, only=["lam", "fill", "method", "objective", "restarts", "max_iter", "tol", "seed", "data",
                              "repair", "allow_nonfinite"])
    common_args(m)
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("sweep", help="sweep λ aligned vs unaligned on data: table, sweep.json, plots",
                       epilog=EPILOG)
    model_args(s, positional_required=False)
    s.add_argument("--alignment", metavar="FILE", help="alignment file from hetmerge align (default: align now)")
    s.add_argument("-o", "--output", default="hetmerge-sweep", metavar="DIR", help="(default: %(default)s)")
    add_option_flags(s, only=["data", "target_data", "repair", "lambdas", "acc_tol", "fill", "batch_size", "device", "method",
                              "objective", "restarts", "max_iter", "tol", "seed", "allow_nonfinite"])
    common_args(s)
    s.set_defaults(func=cmd_sweep)

    c = sub.add_parser("convert", help="convert a checkpoint between PyTorch and safetensors", epilog=EPILOG)
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--format", choices=["safetensors", "torch"], default=None, help="(default: from OUT's suffix)")
    c.add_argument("--force", action="store_true", help="replace OUT when it exists")
    layout_args(c)
    common_args(c)
    c.set_defaults(func=cmd_convert)

    b = sub.add_parser("bench", help="benchmark the primitives, alignment and sweep across widths, ours vs "
                       "references (lapx: pip install 'hetmerge[bench]')", epilog=EPILOG)
    b.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024], help="(default: %(default)s)")
    b.add_argument("--repeat", type=int, default=3, help="best of N (default: %(default)s)")
    b.add_argument("--only", nargs="+", default=None, help="suites to run: data_movement (or permute_pad, "
                   "interpolate, weighted_sum), cost_matrix, linear_assignment, align, sweep")
    b.add_argument("-o", "--output", default="hetmerge-bench", metavar="DIR", help="(default: %(default)s)")
    common_args(b)
    b.set_defaults(func=cmd_bench)
    add_merge_tasks_parser(sub)
    add_assemble_parser(sub)
    add_zoo_parser(sub)
    add_fuse_parser(sub)
    return p
