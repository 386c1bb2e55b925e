"""hetmerge: merge neural networks whose layers differ in width and depth.

Native primitives live in :mod:`hetmerge.ops`; see DESIGN.md for their semantics.
"""
from __future__ import annotations

import torch as _torch

from . import _C, ops
from ._backend import cuda_status as _cuda_status

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads used by hetmerge's CPU kernels (default: torch's thread count at import)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    return int(_C.get_num_threads())


def cuda_available() -> bool:
    """True when CUDA tensors can go through hetmerge.ops (built with CUDA, driver and device present)."""
    return _cuda_status() is None


_C.set_num_threads(max(1, _torch.get_num_threads()))

__all__ = ["ops", "set_num_threads", "get_num_threads", "cuda_available", "__version__"]

# ---- Python layer (issue 3: spec → align → merge → sweep → assemble) ----------------------------
from .spec import PermSpec, SpecError  # noqa: E402
from .trace import register_handler, trace_spec  # noqa: E402
from .alignment import AlignResult, align  # noqa: E402
from .merging import merge  # noqa: E402
from .alignment import Alignment  # noqa: E402
from .evaluate import SweepResult, sweep  # noqa: E402
from .assemble import AssemblyResult, AssemblyStep, assemble  # noqa: E402

__all__ += ["PermSpec", "SpecError", "trace_spec", "register_handler", "Alignment", "AlignResult", "align", "merge", "SweepResult", "sweep",
            "AssemblyResult", "AssemblyStep", "assemble"]
from .tasks import compress_tasks, merge_tasks  # noqa: E402  (multi-task merging)
__all__ += ["merge_tasks", "compress_tasks"]
from .many import ManyAlignment, align_many, merge_many  # noqa: E402  (N models, one universe: C2M3)
__all__ += ["align_many", "merge_many", "ManyAlignment"]
from .repair import repair  # noqa: E402  (REPAIR; hm.merge(..., repair=X) calls it)
__all__ += ["repair"]
from .fusion import fuse  # noqa: E402  (HeteroFusion: LM task updates across families, docs/fusion.md)
__all__ += ["fuse"]
# ---- end of the Python layer's block ------------------------------------------------------------
