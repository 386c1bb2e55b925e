"""Argument groups every subcommand shares (verbosity, models, checkpoint layout) and the epilog."""
from __future__ import annotations

import argparse



EPILOG = """exit codes: 0 ok, 1 internal error, 2 bad arguments or plan, 3 missing/unreadable/unsafe file,
4 models incompatible with the plan. Docs: docs/cli.md"""


def common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables (errors still shown)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more detail; tracebacks on internal errors")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch and hetmerge")


def model_args(p: argparse.ArgumentParser, positional_required: bool) -> None:
    nargs = None if positional_required else "?"
    p.add_argument("base", nargs=nargs, metavar="BASE", help="base checkpoint (.safetensors or .pt): its "
                   "architecture is kept" + ("" if positional_required else "; or base.weights in --plan"))
    p.add_argument("target", nargs=nargs, metavar="TARGET", help="target checkpoint merged into the base"
                   + ("" if positional_required else "; or target.weights in --plan"))
    g = p.add_argument_group("models")
    g.add_argument("--plan", metavar="FILE", help="plan file (YAML or JSON): models, layer map, λ, options")
    g.add_argument("--arch", metavar="DESC", help="architecture of both models: auto, sequential, mlp, cnn, "
                   "module:factory, file.py:factory, or an inline mapping '{\"type\": \"cnn\", \"spatial\": [8, 8]}' "
                   "(default: auto: hetmerge's mlp, else a Linear/Conv/BatchNorm chain rebuilt from the weights "
                   "with ReLU assumed)")
    g.add_argument("--base-arch", metavar="DESC", help="architecture of the base only")
    g.add_argument("--target-arch", metavar="DESC", help="architecture of the target only")
    g.add_argument("--layer-map", metavar="MAP", help="base=target layer pairs by name, e.g. fc0=fc0,fc1=fc2 "
                   "(a name that exists is that layer: 2=2 pairs nn.Sequential's layers named 2); '#N' "
                   "is the layer at position N, e.g. '#1=#2' (default: shallow to shallow)")
    layout_args(g)


def layout_args(g) -> None:
    g.add_argument("--sub-key", metavar="KEY", help="entry of a training checkpoint that holds the state dict, "
                   "e.g. model_ema (dotted for nesting; default: the only {name: tensor} entry)")
    g.add_argument("--key-prefix", metavar="PREFIX", help="prefix to strip from every key, e.g. 'module.' "
                   "('' = keep keys as stored; default: strip module., _orig_mod., model. when every key has it)")
