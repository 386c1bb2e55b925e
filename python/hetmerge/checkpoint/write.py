"""Writing checkpoints: safetensors streamed tensor by tensor (StreamWriter), save_state."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .atomic import atomic_write
from .read import CheckpointError, _ST_NAMES


def _st_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None
               ) -> tuple[bytes, list[int]]:
    """Serialized safetensors header (padded to 8 bytes, as the reference writer does) and offsets."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets, pos = [], 0
    for name, dt, shape in entries:
        if dt not in _ST_NAMES:
            raise CheckpointError(f"{name}: dtype {dt} cannot be stored in safetensors by hetmerge")
        n = (int(np.prod(shape)) if shape else 1) * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, offsets


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B") if t.numel() else memoryview(b"")


class StreamWriter:
    """Write a safetensors file one tensor at a time, atomically.

        with StreamWriter(path, [(key, dtype, shape), ...]) as w:
            for key, ... : w.write(key, tensor)      # in the declared order

    Only the tensor being written is in memory; the file appears at `path` only when every
    declared tensor has been written and the context exits cleanly.
    """

    def __init__(self, path: str | os.PathLike, entries, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.entries = [(k, dt, tuple(int(s) for s in shape)) for k, dt, shape in entries]
        self._header, _ = _st_header(self.entries, metadata)
        self._next = 0
        self._part = 0
        self._cm = None
        self._f = None

    def __enter__(self) -> "StreamWriter":
        self._cm = atomic_write(self.path)
        self._f = self._cm.__enter__()
        self._f.write(struct.pack("<Q", len(self._header)))
        self._f.write(self._header)
        return self

    def write(self, key: str, t: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path}: {key!r} written after the last declared tensor")
        name, dt, shape = self.entries[self._next]
        if key != name or t.dtype != dt or tuple(t.shape) != shape:
            raise CheckpointError(f"{self.path}: expected {name!r} {dt} {shape} next, got {key!r} "
                                  f"{t.dtype} {tuple(t.shape)}")
        self._f.write(_tensor_bytes(t))
        self._next += 1

    def write_part(self, key: str, t: torch.Tensor) -> None:
        """Append leading-axis rows of the next declared tensor (rows in order); end with end_tensor."""
        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path}: {key!r} written after the last declared tensor")
        name, dt, shape = self.entries[self._next]
        if key != name or t.dtype != dt or tuple(t.shape[1:]) != shape[1:]:
            raise CheckpointError(f"{self.path}: expected rows of {name!r} {dt} {shape} next, got {key!r} "
                                  f"{t.dtype} {tuple(t.shape)}")
        self._f.write(_tensor_bytes(t))
        self._part += int(t.shape[0]) if t.dim() else 1

    def end_tensor(self, key: str) -> None:
        name, dt, shape = self.entries[self._next]
        if key != name or self._part != (shape[0] if shape else 1):
            raise CheckpointError(f"{self.path}: {name!r} got {self._part} rows, expected "
                                  f"{shape[0] if shape else 1}")
        self._part = 0
        self._next += 1

    def __exit__(self, et, ev, tb):
        if et is None and self._next != len(self.entries):
            missing = [e[0] for e in self.entries[self._next:]]
            et, ev = CheckpointError, CheckpointError(f"{self.path}: {len(missing)} declared tensors "
                                                      f"never written ({missing[:3]}...)")
            self._cm.__exit__(et, ev, None)
            raise ev
        return self._cm.__exit__(et, ev, tb)


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike, format: str | None = None,
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write {key: tensor} atomically. format: "safetensors", "torch", or None (from the suffix:
    .pt/.pth/.bin -> torch, anything else -> safetensors). Shared or strided tensors are copied
    contiguous (safetensors stores each tensor once)."""
    p = Path(path)
    if format is None:
        format = "torch" if p.suffix.lower() in (".pt", ".pth", ".bin") else "safetensors"
    if format not in ("safetensors", "torch"):
        raise CheckpointError(f"format: expected 'safetensors' or 'torch', got {format!r}")
    for k, v in state.items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"{p}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    if format == "torch":
        with atomic_write(p) as f:
            torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, f)
        return p
    with StreamWriter(p, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], metadata) as w:
        for k, v in state.items():
            w.write(k, v)
    return p


def file_size_gb(path) -> float:
    return os.path.getsize(path) / 1e9
