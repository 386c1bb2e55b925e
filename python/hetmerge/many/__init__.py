"""Many models at once: cycle-consistent alignment into a universe (hm.align_many) and the
weighted average of the aligned models (hm.merge_many)."""
from .align import align_many
from .merge import merge_many
from .universe import ManyAlignment

__all__ = ["align_many", "merge_many", "ManyAlignment"]
