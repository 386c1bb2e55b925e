"""Reading checkpoints: format detection, training-checkpoint selection and key prefixes,
load_state, and LazyState (memory-mapped safetensors, tensor by tensor)."""
from __future__ import annotations

import json
import os
import struct
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A PyTorch file holds objects that only an unrestricted unpickle could build (refused)."""


# safetensors dtype names <-> torch dtypes (the subset torch and numpy memory maps can carry)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# numpy carrier for each dtype when memory-mapping (bfloat16 travels as int16 and is re-viewed)
_NP_CARRIER = {
    torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
    torch.bfloat16: np.int16, torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
    torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}
# a header larger than this is not a real checkpoint's (safetensors itself caps it at 100 MB)
_MAX_HEADER = 100_000_000


def detect_format(path: str | os.PathLike) -> str:
    """"safetensors" or "torch" from the first bytes of `path`; CheckpointError otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, expected a checkpoint file (.safetensors or .pt)")
    with open(p, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if 2 <= n <= _MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":      # torch.save's zip container
        return "torch"
    if head[:1] == b"\x80":            # a bare pickle (legacy torch.save or pickle.dump)
        return "torch"
    raise CheckpointError(f"{p}: not a safetensors or PyTorch checkpoint (unrecognised header "
                          f"{head[:8]!r})")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

# prefixes that wrappers add in front of every key: DataParallel/DDP ("module."), torch.compile
# ("_orig_mod."), training frameworks that keep the net as `self.model` ("model.")
AUTO_PREFIXES = ("module.", "_orig_mod.", "model.")


def _is_tensor_dict(v) -> bool:
    return isinstance(v, Mapping) and bool(v) and all(isinstance(k, str) and torch.is_tensor(x) for k, x in v.items())


def select_state(obj, path: Path, sub_key: str | None = None) -> Mapping:
    """The state dict inside what torch.load returned.

    sub_key names the entry (dotted for nesting: "checkpoint.model"). Without it: `obj` itself when
    it holds only tensors; else the single top-level entry that is a {name: tensor} mapping
    ({"model": sd, "optimizer": ..., "epoch": 3}); several such entries ({"model": ..., "model_ema":
    ...}) are ambiguous and refused with the candidates listed.
    """
    if sub_key:
        cur = obj
        for part in sub_key.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                have = sorted(map(str, cur)) if isinstance(cur, Mapping) else type(cur).__name__
                raise CheckpointError(f"{path}: sub_key {sub_key!r}: no entry {part!r} (entries: {have})")
            cur = cur[part]
        if not isinstance(cur, Mapping):
            raise CheckpointError(f"{path}: sub_key {sub_key!r} holds a {type(cur).__name__}, expected a "
                                  "state dict {name: tensor}")
        return cur
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict "
                              "({name: tensor}); save model.state_dict(), not the model")
    if all(torch.is_tensor(v) for v in obj.values()):
        return obj
    cands = [k for k, v in obj.items() if _is_tensor_dict(v)]
    if len(cands) == 1:
        return obj[cands[0]]
    if cands:
        raise CheckpointError(f"{path}: holds several state dicts {cands}; choose one with --sub-key "
                              "(plan key sub_key)")
    return obj   # no candidate: report the first non-tensor entry below


def strip_prefix(keys: list[str], path: Path, key_prefix: str | None = None) -> dict[str, str]:
    """{stored key: model key}. key_prefix=None: strip AUTO_PREFIXES while every key starts with one;
    "" keeps keys as stored; any other value must start every key."""
    if key_prefix is None:
        out = {k: k for k in keys}
        while out and (p := next((p for p in AUTO_PREFIXES if all(v.startswith(p) for v in out.values())), None)):
            out = {k: v[len(p):] for k, v in out.items()}
        return out
    bad = [k for k in keys if not k.startswith(key_prefix)]
    if bad:
        raise CheckpointError(f"{path}: key_prefix {key_prefix!r}: {len(bad)} key(s) do not start with it, "
                              f"e.g. {bad[0]!r}")
    return {k: k[len(key_prefix):] for k in keys}


def _flatten_state(obj, path: Path, sub_key: str | None = None, key_prefix: str | None = None
                   ) -> "OrderedDict[str, torch.Tensor]":
    """A {key: tensor} dict from what torch.load returned (see select_state, strip_prefix)."""
    obj = select_state(obj, path, sub_key)
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: key {k!r} is not a string")
        if not torch.is_tensor(v):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    if not obj:
        raise CheckpointError(f"{path}: the state dict is empty")
    names = strip_prefix(list(obj), path, key_prefix)
    return OrderedDict((names[k], v) for k, v in obj.items())


def _torch_load(path: Path, mmap_: bool, sub_key: str | None = None, key_prefix: str | None = None
                ) -> "OrderedDict[str, torch.Tensor]":
    import pickle

    try:
        # weights_only=True: the restricted unpickler builds tensors and containers only and raises
        # on any other global, so a malicious file's payload is never called
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # pickle-protocol chatter; refusals raise below
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; show only the line naming the refused object
        lines = [l.strip() for l in str(exc).splitlines() if "GLOBAL" in l or "Unsupported" in l]
        detail = lines[0] if lines else str(exc).splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path}: refused: the file needs objects beyond tensors to load ({detail}); hetmerge "
            f"reads PyTorch files with torch.load(weights_only=True) only and never unpickles "
            f"arbitrary objects. Save model.state_dict(), or convert the file to safetensors in an "
            f"environment where you trust it") from None
    except RuntimeError as exc:
        if mmap_ and "mmap" in str(exc).lower():     # legacy (non-zip) files cannot be mapped
            return _torch_load(path, False, sub_key, key_prefix)
        raise CheckpointError(f"{path}: cannot read the PyTorch file: {exc}") from None
    except (EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the PyTorch file (truncated or corrupt?): {exc}") from None
    return _flatten_state(obj, path, sub_key, key_prefix)


def load_state(path: str | os.PathLike, mmap: bool = True, sub_key: str | None = None,
               key_prefix: str | None = None) -> "OrderedDict[str, torch.Tensor]":
    """{key: tensor} from a safetensors or PyTorch file (format from the file's bytes).

    mmap=True maps the file instead of reading it (safetensors: always; PyTorch: zip files), so a
    large checkpoint costs memory only for the tensors actually touched. sub_key / key_prefix select
    the state dict inside a training checkpoint and strip a wrapper's key prefix (select_state,
    strip_prefix); keys come back as the model names them.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "torch":
        return _torch_load(p, mmap, sub_key, key_prefix)
    lazy = LazyState(p, key_prefix=key_prefix, sub_key=sub_key)
    return OrderedDict((k, lazy.get(k) if mmap else lazy.get(k).clone()) for k in lazy.keys())


class TensorInfo(tuple):
    """(dtype, shape, begin, end) of one tensor in a safetensors file (byte offsets from the data start)."""
    __slots__ = ()
    dtype = property(lambda s: s[0])
    shape = property(lambda s: s[1])
    begin = property(lambda s: s[2])
    end = property(lambda s: s[3])

    @property
    def nbytes(self) -> int:
        return self[3] - self[2]


class LazyState(Mapping):
    """Read-only {key: tensor} view of a safetensors file; nothing is read until a tensor is asked for.

    Each ``get`` maps just that tensor's bytes (copy-on-write, so torch sees a writable array while
    the file itself is never modified); the mapping goes away with the last reference to the tensor.
    """

    def __init__(self, path: str | os.PathLike, key_prefix: str | None = None, sub_key: str | None = None):
        self.path = Path(path)
        if sub_key:
            raise CheckpointError(f"{self.path}: sub_key {sub_key!r}: a safetensors file holds one flat state "
                                  "dict; sub_key applies to PyTorch training checkpoints only")
        if detect_format(self.path) != "safetensors":
            raise CheckpointError(f"{self.path}: streaming needs a safetensors file; convert it first "
                                  "(hetmerge convert IN OUT.safetensors)")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: {exc}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.infos: "OrderedDict[str, TensorInfo]" = OrderedDict()
        for k, v in header.items():
            try:
                dt = _ST_DTYPES[v["dtype"]]
                b, e = (int(x) for x in v["data_offsets"])
                shape = tuple(int(s) for s in v["shape"])
            except KeyError as exc:
                raise CheckpointError(f"{self.path}: tensor {k!r}: unsupported or missing {exc}") from None
            numel = int(np.prod(shape)) if shape else 1
            if e - b != numel * torch.empty((), dtype=dt).element_size() or self.data_start + e > size:
                raise CheckpointError(f"{self.path}: tensor {k!r}: byte range {b}..{e} does not match "
                                      f"shape {shape} {v['dtype']} or the file is truncated ({size} bytes)")
            self.infos[k] = TensorInfo((dt, shape, b, e))
        # stored order = data order, which is also the cheapest order to stream; keys as the model names them
        names = strip_prefix(list(self.infos), self.path, key_prefix) if self.infos else {}
        self.infos = OrderedDict((names[k], i) for k, i in sorted(self.infos.items(), key=lambda kv: kv[1].begin))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def get(self, key: str) -> torch.Tensor:  # type: ignore[override]
        try:
            info = self.infos[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None
        dt, shape = info.dtype, info.shape
        if info.nbytes == 0:
            return torch.empty(shape, dtype=dt)
        # np.memmap aligns the offset to a page itself; mode "c" = private copy-on-write mapping
        arr = np.memmap(self.path, dtype=_NP_CARRIER[dt], mode="c",
                        offset=self.data_start + info.begin, shape=shape or (1,))
        t = torch.from_numpy(arr)
        if dt == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.reshape(shape)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of tensor `key` (axis 0), mapping only their bytes."""
        info = self.infos[key]
        dt, shape = info.dtype, info.shape
        if not shape:
            return self.get(key)
        start, stop = max(0, start), min(shape[0], stop)
        row = (int(np.prod(shape[1:])) if len(shape) > 1 else 1) * torch.empty((), dtype=dt).element_size()
        sub = (stop - start, *shape[1:])
        if stop <= start or row == 0:
            return torch.empty(sub, dtype=dt)
        arr = np.memmap(self.path, dtype=_NP_CARRIER[dt], mode="c",
                        offset=self.data_start + info.begin + start * row, shape=sub)
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if dt == torch.bfloat16 else t

    def gather_rows(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx (axis 0, any order) of tensor `key` as a new compact tensor [len(idx), ...].

        Read with positioned reads rather than through a mapping: faulting scattered rows of a
        mapping pulls in whole read-around windows (~100 MB resident for 6 MB of 12 KB rows in a
        test here), while pread costs exactly the rows asked for.
        """
        info = self.infos[key]
        dt, shape = info.dtype, info.shape
        idx = [int(i) for i in idx]
        out = torch.empty((len(idx), *shape[1:]), dtype=dt)
        if not idx:
            return out
        if min(idx) < 0 or max(idx) >= shape[0]:
            raise CheckpointError(f"{self.path}: row index out of range for {key!r} {shape}")
        row = out[0].numel() * out.element_size()
        buf = memoryview((out.view(torch.int16) if dt == torch.bfloat16 else out).numpy()).cast("B")
        base = self.data_start + info.begin
        fd = os.open(self.path, os.O_RDONLY)
        try:
            i = 0
            while i < len(idx):          # coalesce runs of consecutive rows into one read
                j = i + 1
                while j < len(idx) and idx[j] == idx[j - 1] + 1:
                    j += 1
                want, pos = (j - i) * row, 0
                while pos < want:
                    n = os.preadv(fd, [buf[i * row + pos:j * row]], base + idx[i] * row + pos)
                    if n <= 0:
                        raise CheckpointError(f"{self.path}: short read in {key!r} (file truncated?)")
                    pos += n
                i = j
        finally:
            os.close(fd)
        return out

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def meta(self) -> "OrderedDict[str, torch.Tensor]":
        """{key: meta tensor} with every shape and dtype, no data (to build a module on the meta device)."""
        return OrderedDict((k, torch.empty(i.shape, dtype=i.dtype, device="meta")) for k, i in self.infos.items())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())
