"""Checkpoint files: safetensors (preferred) and PyTorch state dicts, read safely, written atomically.

- Format is recognised from the file's first bytes, not its name.
- PyTorch files are read with ``torch.load(weights_only=True)`` only: a file that needs anything
  beyond tensors and plain containers is refused, its pickle never executed.
- Every write goes to a temporary file in the destination folder, is fsync'ed, then renamed over
  the destination (``os.replace``), so an interrupted run never leaves a truncated file behind.
- ``LazyState`` opens a safetensors file without reading it: each tensor is its own read-only
  memory map, released as soon as the tensor is dropped, so streaming through a checkpoint keeps
  resident memory near the tensors in use. ``StreamWriter`` writes a safetensors file tensor by
  tensor (the header is known up front from the shapes), so an output never has to fit in memory.
"""
from .atomic import atomic_dir, atomic_write, check_replaceable_dir, current_umask
from .read import (AUTO_PREFIXES, CheckpointError, LazyState, TensorInfo, UnsafeCheckpointError, detect_format,
                   load_state, select_state, strip_prefix)
from .scan import FINGERPRINT_KIND, WeightScan, scan_state, scan_weights
from .write import StreamWriter, file_size_gb, save_state

__all__ = ["CheckpointError", "UnsafeCheckpointError", "detect_format", "load_state", "save_state",
           "atomic_write", "atomic_dir", "check_replaceable_dir", "current_umask", "LazyState", "StreamWriter",
           "TensorInfo", "scan_state", "scan_weights", "WeightScan", "FINGERPRINT_KIND", "select_state",
           "strip_prefix", "AUTO_PREFIXES", "file_size_gb"]
