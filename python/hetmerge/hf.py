"""Hugging Face model directories, read lazily and written streamed, without ``transformers``.

Reading: ``HFState(folder)`` is one read-only {key: tensor} Mapping over ``model.safetensors`` or the
shards named by ``model.safetensors.index.json``; each shard is a ``checkpoint.LazyState`` (memory map
per tensor), so nothing is read until a tensor is asked for. ``HFState.config`` is config.json.

Writing: ``save_hf(folder, state, base_dir=...)`` writes a Hugging Face directory: safetensors shards
of at most ``max_shard_size`` bytes (one shard -> ``model.safetensors``, more -> ``model-0000i-of-0000n``
plus the index), the base's config.json, and its tokenizer / generation / preprocessor files. Tensors
are pulled from `state` one at a time and streamed to disk (``checkpoint.StreamWriter``), so `state`
may be a lazy Mapping that computes each tensor on demand (a merge). Everything goes to a temporary
folder beside the target, renamed into place only once complete: an interrupted write leaves nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .checkpoint import CheckpointError, LazyState, StreamWriter, TensorInfo, atomic_dir

__all__ = ["HFError", "HFState", "read_config", "save_hf", "parse_size", "AUX_FILES",
           "WEIGHTS_NAME", "INDEX_NAME"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# files copied from the base directory as they are: tokenizer, generation and preprocessing settings
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
             "chat_template.jinja", "chat_template.json", "generation_config.json",
             "preprocessor_config.json", "processor_config.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


class HFError(CheckpointError):
    """A Hugging Face model directory is missing files, inconsistent, or cannot be written."""


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a Hugging Face model directory, as a dict."""
    p = Path(folder) / CONFIG_NAME
    if not p.is_file():
        raise HFError(f"{folder}: no {CONFIG_NAME} (not a Hugging Face model directory)")
    try:
        cfg = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFError(f"{p}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise HFError(f"{p}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


class HFState(Mapping):
    """Read-only {key: tensor} view of every tensor of a Hugging Face directory, all shards together.

    Keys come in storage order (shard by shard, then by offset): the cheapest order to stream.
    ``infos[key]`` is the tensor's (dtype, shape, begin, end) in its shard; ``shard(key)`` its LazyState.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder)
        if not self.path.is_dir():
            raise HFError(f"{self.path}: not a directory (expected a Hugging Face model directory)")
        self.config = read_config(self.path)
        index, single = self.path / INDEX_NAME, self.path / WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise HFError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from None
            files = list(OrderedDict.fromkeys(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [WEIGHTS_NAME]
        else:
            other = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
                p.name for p in self.path.glob("*.pt"))
            hint = (f"; it holds {other}: PyTorch pickles are not read here, save with "
                    "save_pretrained(safe_serialization=True)" if other else "")
            raise HFError(f"{self.path}: neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")
        self.shards: "OrderedDict[str, LazyState]" = OrderedDict()
        self._where: dict[str, LazyState] = {}
        for name in files:
            f = self.path / name
            if Path(name).name != name:    # an index may only name files of its own folder
                raise HFError(f"{index}: shard {name!r} is not a file name inside {self.path}")
            if not f.is_file():
                raise HFError(f"{index}: shard {name!r} is missing from {self.path}")
            shard = LazyState(f, key_prefix="")   # HF keys as stored: no prefix stripping
            self.shards[name] = shard
            for k in shard.keys():
                if k in self._where:
                    raise HFError(f"{self.path}: tensor {k!r} is stored in both "
                                  f"{self._where[k].path.name} and {name}")
                if weight_map is not None and weight_map.get(k) != name:
                    raise HFError(f"{index}: tensor {k!r} is in {name} but the index says "
                                  f"{weight_map.get(k)!r}")
                self._where[k] = shard
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self._where]
            if lost:
                raise HFError(f"{index}: tensor(s) {lost[:3]} listed in the index are in no shard")
        if not self._where:
            raise HFError(f"{self.path}: the checkpoint holds no tensors")

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            shard = self._where[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None
        return shard.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shard(self, key: str) -> LazyState:
        return self._where[key]

    @property
    def infos(self) -> "OrderedDict[str, TensorInfo]":
        return OrderedDict((k, s.infos[k]) for k, s in self._where.items())

    def meta(self) -> "OrderedDict[str, torch.Tensor]":
        """{key: meta tensor}: every shape and dtype, no data."""
        return OrderedDict((k, torch.empty(i.shape, dtype=i.dtype, device="meta"))
                           for k, i in self.infos.items())

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards.values())


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9, as transformers reads it) or "500MiB" (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str) and (m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?",
                                                      size.strip().upper())):
        n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    else:
        n = -1
    if n <= 0:
        raise HFError(f"max_shard_size: expected a positive byte count or a size like '5GB', got {size!r}")
    return n


def _layout(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    # a lazy state tells shapes without computing tensors; a plain dict is already in memory
    meta = state.meta() if hasattr(state, "meta") else state
    out = []
    for k, v in meta.items():
        if not torch.is_tensor(v):
            raise HFError(f"state: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out.append((k, v.dtype, tuple(v.shape)))
    if not out:
        raise HFError("state: no tensors to write")
    return out


def _plan_shards(entries, limit: int) -> list[list]:
    """Greedy, in order: a shard closes when the next tensor would push it past `limit` bytes; a
    tensor larger than `limit` gets a shard of its own (as transformers does)."""
    shards, cur, size = [], [], 0
    for e in entries:
        n = e[1].itemsize * int(torch.Size(e[2]).numel())
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    if cur:
        shards.append(cur)
    return shards


def save_hf(folder: str | os.PathLike, state: Mapping[str, torch.Tensor],
            base_dir: str | os.PathLike | None = None, config: Mapping | None = None,
            max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
            overwrite: bool = False,
            progress: Callable[[str, int], None] | None = None) -> Path:
    """Write `state` as a Hugging Face model directory at `folder`, streamed and atomically.

    state: {key: tensor}, possibly lazy (``state.meta()`` gives the layout without computing; each
      tensor is then requested once, in order, and dropped once written).
    base_dir: the directory whose config.json and tokenizer/generation files are copied (the base).
    config: config dict to write instead of base_dir's config.json (one of the two is needed).
    max_shard_size: bytes per shard (int, "5GB", "200MiB"); one shard is written as model.safetensors.
    dtype: floating tensors are stored in this dtype (None: as they come, i.e. the base's); the
      config's dtype entry follows.
    overwrite: replace an existing `folder` (swapped in only after the new one is complete).
    progress(key, nbytes) is called after each tensor.
    """
    out = Path(folder)
    if out.exists() and not overwrite:
        raise HFError(f"{out}: already exists (pass overwrite=True to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise HFError(f"{out}: parent folder {parent} does not exist")
    if config is None:
        if base_dir is None:
            raise HFError("save_hf: needs base_dir (to copy config.json) or config")
        config = read_config(base_dir)
    config = dict(config)
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise HFError(f"dtype: expected one of {list(_DTYPE_NAMES)}, got {dtype}")
    limit = parse_size(max_shard_size)
    entries = [(k, dtype if dtype is not None and dt.is_floating_point else dt, shape)
               for k, dt, shape in _layout(state)]
    shards = _plan_shards(entries, limit)
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    # a temporary folder beside `out`, swapped in whole once complete (checkpoint.atomic_dir)
    with atomic_dir(out, replace_any=True) as tmp:
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            # "format": "pt" is what transformers expects in a safetensors header
            with StreamWriter(tmp / name, shard, metadata={"format": "pt"}) as w:
                for key, dt, shape in shard:
                    t = state[key]
                    if not torch.is_tensor(t) or tuple(t.shape) != shape:
                        raise HFError(f"state[{key!r}]: expected a tensor of shape {shape}, got "
                                      f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
                    w.write(key, t.to(dt))
                    nb = dt.itemsize * int(torch.Size(shape).numel())
                    total += nb
                    weight_map[key] = name
                    del t
                    if progress is not None:
                        progress(key, nb)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if dtype is not None:
            # transformers 5 writes "dtype", 4.x "torch_dtype"; keep whichever the base uses
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = _DTYPE_NAMES[dtype]
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if base_dir is not None:
            for name in AUX_FILES:
                src = Path(base_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
        for f in tmp.iterdir():      # durable before the rename makes the folder visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return out
