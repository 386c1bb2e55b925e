"""Which transformer layers pair, and per-block λ: block prefixes of a transformer spec, the
name-based layer map with depth-mismatched block maps, and block keys in per-layer λ."""
from __future__ import annotations

import re
from typing import Any, Mapping

from .spec import LayerMapError, PermSpec, SpecError

__all__ = ["blocks_of", "layer_map_by_name", "expand_block_lams"]

_BLOCK_PREFIX = re.compile(r".*?\.(?:layers?|h)\.\d+")
_BLOCK = re.compile(r"(?P<prefix>.*?\.(?:layers?|h)\.)(?P<index>\d+)\.(?P<rest>.+)")


def blocks_of(spec: PermSpec) -> list[str]:
    """The block prefixes of a transformer spec, in depth order ("model.layers.0", ...)."""
    seen: dict[str, None] = {}
    for layer in spec.layers:
        m = _BLOCK.fullmatch(layer.name)
        if m:
            seen.setdefault(m.group("prefix") + m.group("index"), None)
    return list(seen)


def layer_map_by_name(base_spec: PermSpec, target_spec: PermSpec,
                      blocks: Mapping[Any, Any] | None = None) -> dict[str, str]:
    """{layer: same-named layer} for two specs of one architecture family; the layer_map to pass to
    hm.align / pair_specs (the default pairs layers by order and kind, which suits MLPs and CNNs,
    not blocks whose q/k/v/o and MLP layers differ only by name).

    Models of different depths: by default block i pairs with block i (MAL's shallow-to-shallow
    merging) and the base's extra blocks are left out (they keep the base's weights). `blocks`
    = {base block: target block} chooses the pairs instead (a block is its index or its prefix,
    "model.layers.3"); only the listed base blocks are paired. Layers outside blocks (embeddings,
    final norm, head) pair by name either way.
    """
    names = {l.name for l in target_spec.layers}
    if blocks is None:
        out = {l.name: l.name for l in base_spec.layers if l.name in names}
    else:
        bb, tb = blocks_of(base_spec), blocks_of(target_spec)
        pick = {}
        for kb, kt in blocks.items():
            pick[_block_prefix(kb, bb, "base")] = _block_prefix(kt, tb, "target")
        out = {}
        for l in base_spec.layers:
            m = _BLOCK.fullmatch(l.name)
            if m is None:
                if l.name in names:
                    out[l.name] = l.name
                continue
            t_block = pick.get(m.group("prefix") + m.group("index"))
            if t_block is not None and f"{t_block}.{m.group('rest')}" in names:
                out[l.name] = f"{t_block}.{m.group('rest')}"
    if not out:
        raise SpecError("layer_map_by_name: the two specs share no layer name (different families or "
                        "key naming); pass an explicit layer_map")
    return out


def _block_prefix(key: Any, blocks: list[str], side: str) -> str:
    if isinstance(key, bool):
        raise SpecError(f"blocks: {side} block {key!r} is not a block index or prefix")
    if isinstance(key, int) or (isinstance(key, str) and key.strip().lstrip("#").isdigit()):
        i = int(str(key).strip().lstrip("#"))
        if not 0 <= i < len(blocks):
            raise SpecError(f"blocks: {side} block {key!r} is out of range; the {side} has {len(blocks)} "
                            f"blocks (0..{len(blocks) - 1})")
        return blocks[i]
    if key in blocks:
        return key
    raise SpecError(f"blocks: {side} block {key!r} is not a block of the {side}; its blocks: "
                    f"{', '.join(blocks[:4])}{' ...' if len(blocks) > 4 else ''}")


def expand_block_lams(lam: Mapping[str, Any], layers) -> dict[str, Any]:
    """Per-layer λ where a key may name a block (prefix "model.layers.3", or "block:3" for block 3):
    it expands to every layer of that block; other keys are passed on as written (layer names or
    "#N" positions, resolved by hm.merge's rules)."""
    layers = list(layers)
    prefixes = []
    for name in layers:
        m = _BLOCK.fullmatch(name)
        if m and (m.group("prefix") + m.group("index")) not in prefixes:
            prefixes.append(m.group("prefix") + m.group("index"))
    out: dict[str, Any] = {}
    for k, v in lam.items():
        key = k.strip() if isinstance(k, str) else k
        if isinstance(key, str) and key.startswith("block:"):
            key = _block_prefix(key[len("block:"):], prefixes, "base")
        if isinstance(key, str) and key not in layers and key not in prefixes and _BLOCK_PREFIX.fullmatch(key):
            raise LayerMapError(f"lam: {k!r} is not a block of the base; its blocks: "
                                f"{', '.join(prefixes[:4])}{' ...' if len(prefixes) > 4 else ''} "
                                f"({len(prefixes)}; also written block:0 .. block:{len(prefixes) - 1})")
        if isinstance(key, str) and key not in layers and key in prefixes:
            for name in layers:
                if name.startswith(key + "."):
                    out[name] = v
        else:
            out[k] = v
    return out
