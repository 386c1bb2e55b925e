"""Permutation spec of a Hugging Face transformer, from its config and key names (no torch.fx, no model).

Covered (Llama / Mistral / Qwen2, GPT-2, BERT, ViT):

- the residual stream: ONE group, "residual", shared by every block: token/position/type embeddings
  (columns), ViT's cls/mask token, position embeddings and patch-embedding output, every norm's
  weight and bias, the inputs of q/k/v (GPT-2: the fused ``c_attn``) and of the MLP's up/gate, the
  outputs of the attention output projection and of the MLP's down projection (with their biases),
  the final norm, and the input of the LM / classification / pooler head;
- the MLP hidden units of each block: one group "<block>.mlp"; up and gate (SwiGLU) rows move together,
  down's input columns follow.

- the attention heads of each block: one group "<block>.attn" whose units are heads (a key/value
  head together with the query heads that share it under GQA/MQA): q/k/v rows and o's input columns
  move as whole heads, so every head's attention pattern is kept, and nothing moves inside a head
  (which is also what RoPE demands of Q/K: a rotary pair and its frequency stay put). Models with
  fewer heads of the same size are zero-padded with whole heads (a zero head adds nothing).
  GPT-2's fused ``c_attn`` holds q | k | v on one axis: three parts of that axis, each moved by
  the block's head map (``PermSpec.segments``).

Conventions. A transformers ``Conv1D`` (GPT-2) stores its weight as [in, out], so its input axis is
axis 0. Tensors whose hidden axis is not axis 0 or 1 (ViT's ``cls_token`` [1, 1, d] and
``position_embeddings`` [1, n, d]) are seen as 2-D views [n, d] (``canonical_state``), since a spec
permutes axes 0 and 1 only. Tied weights (an LM head sharing the embedding) are one tensor: the
alias is not in the canonical state, so it is neither counted twice by weight matching nor merged
twice. ``AlignView(model)`` shows a transformers module through that canonical state, which is how
``hm.align`` / ``hm.merge`` (which take nn.Modules) run on it:

    va, vb = AlignView(model_a), AlignView(model_b)
    sa, sb = transformer_spec(va), transformer_spec(vb)
    res = hm.align(va, vb, base_spec=sa, target_spec=sb, layer_map=layer_map_by_name(sa, sb))
    merged = hm.merge(va, vb, res, lam=0.5).model

New families are one entry in ``FAMILIES`` (model_type -> rule table); a key no rule covers raises
SpecError naming it, so an unknown head never silently escapes the residual stream.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from .spec import Layer, PermSpec, SpecError, Tie
from .transformer_families import (_HD, _NORM_GAIN, _O_PROJ, _QH, _QK, _QUERIES, _REP, _RMS_NORM_FAMILIES,
                                   _ROPE_FAMILIES, _VIEWS, _VO, FAMILIES, FUSED, RESIDUAL)
from .transformer_layers import blocks_of, expand_block_lams, layer_map_by_name

__all__ = ["FAMILIES", "RESIDUAL", "transformer_spec", "layer_map_by_name", "blocks_of", "expand_block_lams", "canonical_state", "CanonicalState",
           "AlignView", "tied_aliases", "model_type"]

_COMPILED = {fam: [(re.compile(rx), entries) for rx, entries in rules] for fam, rules in FAMILIES.items()}


def model_type(config: Any) -> str:
    """config["model_type"] of a config dict or a transformers PretrainedConfig."""
    mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if not mt:
        raise SpecError("transformer_spec: the config has no model_type")
    if mt not in FAMILIES:
        raise SpecError(f"transformer_spec: model_type {mt!r} is not supported (supported: "
                        f"{sorted(FAMILIES)}); add a rule table to transformer_spec.FAMILIES")
    return mt


# ---------------------------------------------------------------------------------------------
# canonical state: 2-D views, no tied aliases
# ---------------------------------------------------------------------------------------------

def _view_shape(mt: str, key: str, shape: tuple) -> tuple | None:
    rx = _VIEWS.get(mt)
    if rx is None or not rx.fullmatch(key):
        return None
    if len(shape) != 3 or shape[0] != 1:
        raise SpecError(f"transformer_spec: {key!r} has shape {shape}, expected [1, n, hidden]")
    return (shape[1], shape[2])


class CanonicalState(Mapping):
    """{key: tensor} of a raw state with the family's [1, n, d] tensors seen as [n, d], o_proj's
    columns under GQA reordered (head, dim, query head) and the given aliases left out;
    ``restore(key, t)`` gives a tensor back its stored shape and order."""

    def __init__(self, state: Mapping[str, torch.Tensor], mt: str, aliases=(), config: Any = None):
        self.state = state
        self.aliases = frozenset(aliases)
        meta = state.meta() if hasattr(state, "meta") else state
        self.shapes = OrderedDict((k, tuple(v.shape)) for k, v in meta.items() if k not in self.aliases)
        self.views = {k: v for k, s in self.shapes.items() if (v := _view_shape(mt, k, s)) is not None}
        # query heads per key/value head and head size, where o_proj's columns need reordering
        self.o_layout = None
        if config is not None and mt in _ROPE_FAMILIES:
            hb = head_blocks(config)
            rep = hb[_REP]
            if rep > 1:
                self.o_layout = (rep, hb[_HD])

    def _o(self, key: str) -> tuple | None:
        return self.o_layout if self.o_layout is not None and _O_PROJ.fullmatch(key) else None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.aliases:
            raise KeyError(key)
        t = self.state[key]
        lay = self._o(key)
        if lay is not None:
            rep, hd = lay
            return t.reshape(t.shape[0], -1, rep, hd).transpose(2, 3).reshape(t.shape[0], -1)
        return t.reshape(self.views[key]) if key in self.views else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def meta(self) -> "OrderedDict[str, torch.Tensor]":
        meta = self.state.meta() if hasattr(self.state, "meta") else self.state
        return OrderedDict((k, torch.empty(self.views.get(k, s), dtype=meta[k].dtype, device="meta"))
                           for k, s in self.shapes.items())

    def restore(self, key: str, t: torch.Tensor) -> torch.Tensor:
        lay = self._o(key)
        if lay is not None:
            rep, hd = lay
            t = t.reshape(t.shape[0], -1, hd, rep).transpose(2, 3).reshape(t.shape[0], -1)
        return t.reshape(self.shapes[key])


def canonical_state(config: Any, state: Mapping[str, torch.Tensor], aliases=()) -> CanonicalState:
    return CanonicalState(state, model_type(config), aliases, config)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias key: key it shares its tensor with} (the first name of a shared parameter is kept)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


class AlignView(nn.Module):
    """A transformers module seen through its canonical state, for hm.align / hm.merge.

    ``state_dict()`` leaves out tied aliases and shows [1, n, d] tensors as [n, d];
    ``load_state_dict()`` takes that canonical form back (aliases follow their source). ``forward``
    is the wrapped model's; ``.model`` is the wrapped model (after hm.merge: the merged one).
    """

    def __init__(self, model: nn.Module, config: Any = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"AlignView: expected a torch.nn.Module, got {type(model)}")
        self.model = model
        self.config = config if config is not None else getattr(model, "config", None)
        if self.config is None:
            raise SpecError("AlignView: the model has no .config; pass config=")
        self.model_type = model_type(self.config)
        self.aliases = tied_aliases(model)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = self.model.state_dict(keep_vars=keep_vars)
        cs = CanonicalState(sd, self.model_type, self.aliases, self.config)
        out = OrderedDict((prefix + k, cs[k]) for k in cs)
        if destination is not None:
            destination.update(out)
            return destination
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        own = self.model.state_dict(keep_vars=True)
        cs = CanonicalState(own, self.model_type, self.aliases, self.config)
        full = OrderedDict()
        for k, v in state_dict.items():
            if k not in own:
                raise KeyError(f"AlignView.load_state_dict: unexpected key {k!r}")
            full[k] = cs.restore(k, v) if k in cs.shapes else v.reshape(own[k].shape)
        for alias, src in self.aliases.items():
            if src in full:
                full[alias] = full[src]
        return self.model.load_state_dict(full, strict=strict, assign=assign)


# ---------------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------------

def _rule(rules, key: str):
    for rx, entries in rules:
        m = rx.fullmatch(key)
        if m is not None:
            return m, entries
    return None, None


def transformer_spec(model: nn.Module | Mapping[str, torch.Tensor], config: Any = None,
                     heads: str = "inside") -> PermSpec:
    """PermSpec of a Hugging Face transformer from its config's model_type and its key names.

    heads: "inside" (default: heads move whole, and inside a head Q/K dimensions move together and
      V/O dimensions together; only V/O under RoPE) or "whole" (heads move whole, nothing moves
      inside a head: the qk and vo units are heads). Which merges better is an empirical question
      (docs/transformers.md has a measured pair of each kind); choose it on validation data.

    model: an AlignView of a transformers module, or a {key: tensor}
      state (HFState, a state dict; canonicalized here, so ViT's [1, n, d] tensors are seen as
      [n, d] -- pass the same canonical state to whatever uses the spec).
    config: the model's config (dict or PretrainedConfig); read from the module when omitted.
    Layers are the modules (key prefixes) in state order, each with its tensors by local name.
    """
    if isinstance(model, AlignView):
        config = config if config is not None else model.config
        state = model.state_dict(keep_vars=True)
    elif isinstance(model, nn.Module):
        # the spec names canonical keys: given to hm.align/merge with the bare module, a tied
        # head alias would be left unpaired and hm.merge would load the base's head over the merge
        raise TypeError("transformer_spec: wrap the transformers module as AlignView(model) and pass "
                        "that view both here and to hm.align / hm.merge")
    elif isinstance(model, Mapping):
        if config is None:
            config = getattr(model, "config", None)
        if config is None:
            raise SpecError("transformer_spec: a state needs config= (the model's config.json)")
        state = model if isinstance(model, CanonicalState) else canonical_state(config, model)
    else:
        raise TypeError(f"transformer_spec: expected an nn.Module or a {{key: tensor}} state, got "
                        f"{type(model)}")
    if heads not in ("inside", "whole"):
        raise ValueError(f"heads: expected 'inside' or 'whole', got {heads!r}")
    whole = heads == "whole"
    mt = model_type(config)
    rules = _COMPILED[mt]
    blocks = head_blocks(config)
    meta = state.meta() if hasattr(state, "meta") else state
    groups: dict[str, list[tuple[str, int]]] = OrderedDict()
    fused: dict[tuple[str, int], tuple] = {}
    modules: dict[str, dict[str, str]] = OrderedDict()
    for key, t in meta.items():
        m, entries = _rule(rules, key)
        if m is None:
            raise SpecError(f"transformer_spec: tensor {key!r} {tuple(t.shape)} matches no rule of the "
                            f"{mt!r} family; add one to transformer_spec.FAMILIES[{mt!r}]")
        for g, ax, *blk in entries:
            if g == FUSED:          # an axis of equal parts, one per group (block 1, or a head)
                names = [p.replace("{L}", m.group("L")) for p in blk[0]]
                per = blocks[_HD] if whole else 1
                fused[(key, ax)] = tuple((n, t.shape[ax] // len(names) // per, per) for n in names)
                continue
            if whole and g in (_QK, _VO):   # a head is the unit: its rows (columns) are one block
                blk = [{_REP: _QH}.get(blk[0], blk[0])] if blk else [_HD]
            name = g.replace("{L}", m.group("L")) if "{L}" in g else g
            groups.setdefault(name, []).append((key, ax, blocks[blk[0]]) if blk else (key, ax))
        if t.is_floating_point():   # integer buffers (position ids, masks) are not merged
            prefix, _, local = key.rpartition(".")
            modules.setdefault(prefix, {})[local] = key
    if RESIDUAL not in groups:
        raise SpecError(f"transformer_spec: no residual-stream tensor found for {mt!r}")
    # storage order differs between a module, a single file and shards: sort names naturally
    # (block indices as numbers) so that every source of the same model gives the same layer list
    layers = [Layer(name, modules[name]) for name in sorted(modules, key=_natural)]
    spec = PermSpec.from_groups(state, groups, layers=layers)
    for (key, ax), parts in fused.items():
        for name, n, _ in parts:
            have = spec.sizes.setdefault(name, n)    # a group that only a fused axis holds (GPT-2's qk)
            spec.groups.setdefault(name, [])
            if have != n:
                raise SpecError(f"transformer_spec: {key!r} axis {ax} holds parts of {n} units of group "
                                f"{name!r}, which has {have}")
    spec.segments = dict(fused)
    if mt in _RMS_NORM_FAMILIES:
        spec.rms_norms = frozenset(k for k, *_ in groups[RESIDUAL] if _NORM_GAIN.fullmatch(k))
    spec.ties = _attention_ties(spec, meta, mt, blocks, whole)
    spec.check_ties()
    return spec


def _attention_ties(spec: PermSpec, meta, mt: str, blocks: dict, whole: bool) -> dict[str, Tie]:
    """One tie per block: its qk and vo groups, with the tensors holding Q."""
    ties = {}
    rope = mt in _ROPE_FAMILIES
    for g in spec.sizes:
        if not g.endswith(".attn.qk"):
            continue
        block = g[:-len("attn.qk")]
        vo = block + "attn.vo"
        if vo not in spec.sizes:
            raise SpecError(f"transformer_spec: block {block!r} has query/key projections but no value "
                            "projection")
        queries = tuple((k, ax, part) for k in meta if k.startswith(block)
                        for rx, ax, part in _QUERIES if rx.fullmatch(k))
        units = (1, 1) if whole else (1 if rope else blocks[_HD], blocks[_HD])
        ties[block + "attn"] = Tie((g, vo), units, queries)
    return ties


def _config_value(config: Any, *names: str):
    for n in names:
        v = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
        if v is not None:
            return v
    return None


def head_blocks(config: Any) -> dict[str, int]:
    """{"head_dim": rows of one k/v head, "query_group": rows of the query heads sharing it,
    "query_heads": query heads per key/value head}."""
    heads = _config_value(config, "num_attention_heads", "n_head")
    hidden = _config_value(config, "hidden_size", "n_embd")
    if not heads or not hidden:
        raise SpecError("transformer_spec: the config lacks num_attention_heads / hidden_size")
    kv = _config_value(config, "num_key_value_heads") or heads
    head_dim = _config_value(config, "head_dim") or hidden // heads
    if heads % kv:
        raise SpecError(f"transformer_spec: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv}")
    return {_HD: int(head_dim), _QH: int(head_dim) * (heads // kv), _REP: int(heads // kv)}


def _natural(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]
