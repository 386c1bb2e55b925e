"""Merge two Hugging Face model directories into a third, streamed tensor by tensor.

``merge_hf(base_dir, target_dir, out_dir, lam, res)``: every paired tensor becomes
``ops.interpolate(base, target, [λ], maps, fill)`` (the same formula as ``hm.merge``), every other
tensor is the base's; the output is written by ``hf.save_hf`` (sharded, atomic, base config and
tokenizer files), each merged tensor computed only when the writer asks for it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .hf import HFError, HFState, save_hf
from .merging import merge_items, merge_tensor
from .pairing import pair_specs
from .transformer_spec import (CanonicalState, canonical_state, expand_block_lams, layer_map_by_name,
                               model_type, transformer_spec)

__all__ = ["merge_hf", "MergedState"]


class MergedState(Mapping):
    """Lazy {base key: merged tensor} over two canonical states; each tensor computed on access."""

    def __init__(self, base: CanonicalState, target: CanonicalState, pairing, maps, lam: float,
                 fill: str = "zero"):
        self.base, self.target, self.fill = base, target, fill
        self.items = {it.base_key: it for it in merge_items(pairing, maps, lam)}
        missing = [pp.target_key for pp in pairing.params if pp.target_key not in target]
        if missing:
            raise HFError(f"target: no tensor(s) {missing[:3]} named by the alignment")

    def __getitem__(self, key: str) -> torch.Tensor:
        a = self.base[key]
        item = self.items.get(key)
        if item is None or not a.is_floating_point():
            return self.base.restore(key, a)
        return self.base.restore(key, merge_tensor(item, self.base, self.target, fill=self.fill)[0])

    def __iter__(self) -> Iterator[str]:
        return iter(self.base.shapes)

    def __len__(self) -> int:
        return len(self.base.shapes)

    def meta(self):
        return self.base.state.meta()


def merge_hf(base_dir: str | os.PathLike, target_dir: str | os.PathLike, out_dir: str | os.PathLike,
             lam: float = 0.5, res=None, fill: str = "zero", max_shard_size: int | str = "5GB",
             dtype: torch.dtype | None = None, overwrite: bool = False, progress=None) -> Path:
    """Merge `target_dir` into `base_dir` and write a Hugging Face directory at `out_dir`.

    lam: merging factor (0 = base, 1 = aligned target), or {layer: λ} where a key may also name a
      block ("model.layers.3", or "block:3") for all its layers; unlisted layers keep the base's.
    res: AlignResult of hm.align on ``AlignView``s of the two models (its pairing names canonical
      keys, which these directories must share), or None: identity alignment (same-named layers
      paired, maps by position: a plain linear merge (1 - λ)·base + λ·target for same-size models).
    fill, max_shard_size, dtype, overwrite: as in hm.merge and hf.save_hf (dtype None = the base's).
    """
    if fill not in ("zero", "base"):
        raise ValueError(f"fill: expected 'zero' or 'base', got {fill!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float, Mapping)):
        raise TypeError(f"lam: expected a float or {{layer or block: λ}}, got {type(lam).__name__}")
    base, target = HFState(base_dir), HFState(target_dir)
    mb, mt = model_type(base.config), model_type(target.config)
    if mb != mt:
        raise HFError(f"{target_dir}: model_type {mt!r} differs from the base's {mb!r}")
    cb, ct = canonical_state(base.config, base), canonical_state(target.config, target)
    if res is None:
        sa, sb = transformer_spec(cb, base.config), transformer_spec(ct, target.config)
        pairing = pair_specs(cb, ct, sa, sb, layer_map_by_name(sa, sb))
        maps = pairing.position_maps()
    else:
        if getattr(res, "pairing", None) is None:
            raise ValueError("res: expected an AlignResult from hm.align (or None for identity maps)")
        pairing, maps = res.pairing, res.maps
        unknown = [pp.base_key for pp in pairing.params if pp.base_key not in cb]
        if unknown:
            raise HFError(f"{base_dir}: no tensor(s) {unknown[:3]} named by the alignment")
    if isinstance(lam, Mapping):
        lam = expand_block_lams(lam, pairing.base_layers or list(pairing.layer_map))
    merged = MergedState(cb, ct, pairing, maps, lam, fill)
    return save_hf(out_dir, merged, base_dir=base_dir, max_shard_size=max_shard_size, dtype=dtype,
                   overwrite=overwrite, progress=progress)
