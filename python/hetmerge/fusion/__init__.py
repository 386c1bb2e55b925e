"""HeteroFusion (docs/fusion.md): transfer task updates of language models of other families into a
target model as a PEFT LoRA adapter — role tables (topology), closed-form latent-basis maps from
calibration activations (basis), the transfer and LoRA factorization (transfer), conflict-aware
denoising of several sources (denoise), and hm.fuse (api)."""
from .api import FusionResult, calib_ids, fuse, load_model
from .basis import BASES, fit_map, record_inputs
from .denoise import agreement, fuse_updates, source_weights
from .topology import FusionError, Proj, Topology, match_blocks, topology

__all__ = ["fuse", "FusionResult", "FusionError", "topology", "Topology", "Proj", "match_blocks", "fit_map",
           "record_inputs", "BASES", "agreement", "source_weights", "fuse_updates", "load_model", "calib_ids"]
