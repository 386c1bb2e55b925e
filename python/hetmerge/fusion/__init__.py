"""HeteroFusion (docs/fusion.md): transfer task updates of language models of other families into a
target model as a PEFT LoRA adapter — role tables (topology), closed-form latent-basis maps from
calibration activations (basis), the transfer and LoRA factorization (transfer), conflict-aware
denoising of several sources (denoise), calibration ids or text paired across tokenizers (calib),
block matching by CKA (blocks), and hm.fuse (api)."""
from .api import BLOCK_RULES, FusionResult, calib_ids, fuse, load_model
from .basis import BASES, fit_map, record_inputs
from .blocks import cka_matrix, linear_cka, monotone_match
from .calib import Plan, common_spans, encode, shared_plans, text_plans
from .denoise import agreement, fuse_updates, source_weights
from .topology import FusionError, Proj, Topology, match_blocks, topology

__all__ = ["fuse", "FusionResult", "FusionError", "topology", "Topology", "Proj", "match_blocks", "fit_map",
           "record_inputs", "BASES", "agreement", "source_weights", "fuse_updates", "load_model", "calib_ids",
           "BLOCK_RULES", "linear_cka", "cka_matrix", "monotone_match", "Plan", "common_spans", "encode",
           "shared_plans", "text_plans"]
