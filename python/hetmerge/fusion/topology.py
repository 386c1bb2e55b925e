"""Module-topology matching: which projection of which block plays which role, in any family.

A role table per family names each block's projections by function — q, k, v, o (attention),
up, gate, down (MLP), norm1, norm2 — so that two models of different families pair by role rather
than by tensor name. GPT-2's fused ``c_attn`` is three roles (q | k | v: three row slices of its
weight), and its ``Conv1D`` weights ([in, out]) are seen transposed, so every projection is read
as W: [out, in] acting on x: [in].

Blocks pair by relative depth (our rule): target block i takes source block
round(i·(L_s − 1)/(L_t − 1)) (block 0 when the target has one block). ``blocks={i: j}`` overrides.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["FusionError", "Proj", "Topology", "topology", "match_blocks", "ROLES", "FAMILY_ROLES"]

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "norm1", "norm2")
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


class FusionError(ValueError):
    """A model, source or option hm.fuse cannot use; the message names it."""


# family -> (regex over a module name with groups "blk" (block index) and "mod" (module path inside
# the block), {module path inside the block: role or ("fused", roles...)})
_LLAMA = (r"(?P<pre>(.*\.)?layers\.)(?P<blk>\d+)\.(?P<mod>.+)",
          {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
           "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
           "input_layernorm": "norm1", "post_attention_layernorm": "norm2"})
_GPT2 = (r"(?P<pre>(.*\.)?h\.)(?P<blk>\d+)\.(?P<mod>.+)",
         {"attn.c_attn": ("fused", "q", "k", "v"), "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down",
          "ln_1": "norm1", "ln_2": "norm2"})
FAMILY_ROLES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}


@dataclass(frozen=True)
class Proj:
    """One role of one block. module: the module's name (PEFT's target name); rows: the slice of
    the [out, in] weight that is this role (a part of a fused projection), None = all of it;
    conv1d: stored [in, out] (transformers Conv1D)."""
    role: str
    block: int
    module: str
    rows: tuple | None
    conv1d: bool

    def weight(self, model: nn.Module) -> torch.Tensor:
        """W: [out, in] of this role in `model` (a view; float as stored)."""
        w = model.get_submodule(self.module).weight
        w = w.t() if self.conv1d else w
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]


@dataclass
class Topology:
    """Roles per block of one model: blocks[i] = {role: Proj}."""
    family: str
    blocks: list = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


def model_family(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    fam = getattr(cfg, "model_type", None)
    if fam not in FAMILY_ROLES:
        raise FusionError(f"fuse: model family {fam!r} has no role table; known: {sorted(FAMILY_ROLES)} "
                          "(add one to hetmerge.fusion.topology.FAMILY_ROLES)")
    return fam


def topology(model: nn.Module) -> Topology:
    """The role table of a transformers model (Llama/Mistral/Qwen2/GPT-2)."""
    fam = model_family(model)
    pattern, table = FAMILY_ROLES[fam]
    rx = re.compile(pattern)
    found: dict[int, dict] = {}
    for name, mod in model.named_modules():
        m = rx.fullmatch(name)
        if m is None or m["mod"] not in table:
            continue
        blk, role = int(m["blk"]), table[m["mod"]]
        conv1d = type(mod).__name__ == "Conv1D"
        roles = found.setdefault(blk, {})
        if isinstance(role, tuple):   # fused q | k | v: equal thirds of the output axis
            parts = role[1:]
            n_out = mod.weight.shape[1] if conv1d else mod.weight.shape[0]
            if n_out % len(parts):
                raise FusionError(f"fuse: {name}: output size {n_out} is not {len(parts)} equal parts {parts}")
            step = n_out // len(parts)
            for p, r in enumerate(parts):
                roles[r] = Proj(r, blk, name, (p * step, (p + 1) * step), conv1d)
        else:
            roles[role] = Proj(role, blk, name, None, conv1d)
    if not found:
        raise FusionError(f"fuse: no transformer block of family {fam!r} found in the model's modules")
    idx = sorted(found)
    if idx != list(range(len(idx))):
        raise FusionError(f"fuse: block indices {idx} are not 0..{len(idx) - 1}")
    return Topology(fam, [found[i] for i in idx])


def match_blocks(n_target: int, n_source: int, blocks: dict | None = None) -> dict[int, int]:
    """{target block: source block}: relative depth, round(i·(L_s − 1)/(L_t − 1)), unless `blocks`
    gives the pairs (only those are used)."""
    if blocks is not None:
        for t, s in blocks.items():
            if not (isinstance(t, int) and 0 <= t < n_target and isinstance(s, int) and 0 <= s < n_source):
                raise FusionError(f"fuse: blocks[{t!r}] = {s!r}: need target block in 0..{n_target - 1} "
                                  f"and source block in 0..{n_source - 1}")
        return dict(blocks)
    if n_target == 1:
        return {0: 0}
    # half up (not Python's round-half-even), so the rule reads as written
    return {i: math.floor(i * (n_source - 1) / (n_target - 1) + 0.5) for i in range(n_target)}
