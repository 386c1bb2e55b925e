"""Outputs never overwrite inputs: one check for every subcommand that writes."""
from __future__ import annotations

import os
from pathlib import Path

SWEEP_FILES = frozenset({"sweep.json", "sweep.png", "alignment_trace.png", "report.md"})   # what sweep -o writes


def same_file(a: Path, b: Path) -> bool:
    """a and b are one file: the same path after symlinks, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_output(out: Path, inputs, what: str = "output", folder: bool = False) -> None:
    """Refuse an output that is one of the inputs (by path, symlink or hard link) — writing it would
    destroy that input — or, for an output folder replaced as a whole, one that holds an input.
    inputs: [(role, path)] with None entries skipped. Raises CheckpointError (exit 3)."""
    from ..checkpoint import CheckpointError

    for role, p in inputs:
        if p is None:
            continue
        p = Path(p)
        if same_file(out, p):
            raise CheckpointError(f"{what} {out} is the {role} {p}: writing it would overwrite an input; "
                                  "choose another output path")
        if folder:
            real_out, real_in = os.path.realpath(out), os.path.realpath(p)
            if real_in.startswith(real_out.rstrip(os.sep) + os.sep):
                raise CheckpointError(f"{what} {out} holds the {role} {p}; the folder is replaced as a whole, "
                                      "so choose an output folder that holds no input")


def plan_inputs(plan) -> list:
    """[(role, path)] of every file a plan reads."""
    ins = [("base weights", plan.base.weights), ("target weights", plan.target.weights),
           ("alignment", plan.alignment), ("plan", plan.path)]
    for k in ("data", "target_data", "repair"):
        v = getattr(plan.options, k)
        if isinstance(v, str) and v.endswith(".npz"):
            ins.append((k, Path(v)))
    return ins
