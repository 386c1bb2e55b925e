"""Checkpoint files: safetensors (preferred) and PyTorch state dicts, read safely, written atomically.

- Format is recognised from the file's first bytes, not its name.
- PyTorch files are read with ``torch.load(weights_only=True)`` only: a file that needs anything
  beyond tensors and plain containers is refused, its pickle never executed.
- Every write goes to a temporary file in the destination folder, is fsync'ed, then renamed over
  the destination (``os.replace``), so an interrupted run never leaves a truncated file behind.
- ``LazyState`` opens a safetensors file without reading it: each tensor is its own read-only
  memory map, released as soon as the tensor is dropped, so streaming through a checkpoint keeps
  resident memory near the tensors in use. ``StreamWriter`` writes a safetensors file tensor by
  tensor (the header is known up front from the shapes), so an output never has to fit in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

__all__ = ["CheckpointError", "UnsafeCheckpointError", "detect_format", "load_state", "save_state",
           "atomic_write", "atomic_dir", "check_replaceable_dir", "LazyState", "StreamWriter", "TensorInfo", "scan_state", "scan_weights",
           "select_state", "strip_prefix"]


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


# ---------------------------------------------------------------------------------------------
# one pass over the weights: fingerprint and finiteness
# ---------------------------------------------------------------------------------------------

FINGERPRINT_KIND = "blake2b-256 over every tensor's name, dtype, shape and bytes"
_SCAN_CHUNK = 8 << 20     # bytes hashed and checked per step: cache-friendly, bounded temporaries


class WeightScan(tuple):
    """(digest, nonfinite, nbytes, seconds): the fingerprint of a state dict, the tensors holding NaN or
    ±inf as [(key, count)], the bytes read and the time it took."""
    __slots__ = ()
    digest = property(lambda s: s[0])
    nonfinite = property(lambda s: s[1])
    nbytes = property(lambda s: s[2])
    seconds = property(lambda s: s[3])


def scan_state(state: Mapping[str, torch.Tensor]) -> WeightScan:
    """Hash every byte of every tensor (sorted by key, so the digest does not depend on the file's
    format or order) and count non-finite values, streaming in 8 MiB chunks: a memory-mapped
    checkpoint is read once, and only a chunk of it is resident at a time."""
    import hashlib
    import time

    t0 = time.perf_counter()
    h = hashlib.blake2b(digest_size=32)
    bad, total = [], 0
    for k in sorted(state):
        t = state[k]
        h.update(f"{k}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        flat = t.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        step = max(1, _SCAN_CHUNK // max(1, flat.element_size()))
        arr = (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy()
        n_bad = 0
        for i in range(0, arr.size, step):
            c = arr[i:i + step]
            h.update(memoryview(c).cast("B"))
            # numpy, not torch: torch.isfinite on 8 MiB chunks ran 20x slower (thread start-up per call)
            if flat.dtype == torch.bfloat16:     # exponent bits all ones = inf or NaN
                n_bad += int(np.count_nonzero((c & 0x7F80) == 0x7F80))
            elif flat.is_floating_point() and not np.isfinite(c).all():
                n_bad += int(c.size - np.count_nonzero(np.isfinite(c)))
        total += flat.numel() * flat.element_size()
        if n_bad:
            bad.append((k, n_bad))
        del flat, t
    return WeightScan((h.hexdigest(), bad, total, time.perf_counter() - t0))


def scan_weights(path: str | os.PathLike, sub_key: str | None = None, key_prefix: str | None = None) -> WeightScan:
    """scan_state of a checkpoint file, tensor by tensor from its memory map."""
    p = Path(path)
    state = LazyState(p, key_prefix, sub_key) if detect_format(p) == "safetensors" else \
        load_state(p, sub_key=sub_key, key_prefix=key_prefix)
    return scan_state(state)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file next to `path`; on success fsync it and rename it over `path`.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is left
    as it was. Same folder, so the rename is atomic on POSIX and Windows (os.replace).
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"{p}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates 0600; a plain open() would give 0666 & ~umask, which is what users expect
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask: from /proc on Linux (read-only), else by setting and restoring it (POSIX has
    no read-only call; the swap is process-wide, hence the /proc path first)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable_dir(path: str | os.PathLike, owned_names=frozenset()) -> Path:
    """Raise CheckpointError unless atomic_dir(path, owned_names) may replace `path`; returns its parent."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"{p}: folder {folder} does not exist")
    if p.exists() or p.is_symlink():
        if not p.is_dir() or p.is_symlink():
            raise CheckpointError(f"{p}: exists and is not a folder; choose another output folder")
        foreign = sorted(c.name for c in p.iterdir() if c.name not in owned_names or not c.is_file())
        if foreign:
            raise CheckpointError(f"{p}: exists and holds files this command did not write "
                                  f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); the whole "
                                  "folder is replaced on success, so choose an empty or new folder")
    return folder


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, owned_names: set[str] | frozenset = frozenset()):
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole.

    An interrupted run leaves either the previous folder or the complete new one, never a mix. An
    existing `path` is replaced only at the very end, and only when it holds nothing but files named
    in `owned_names` (a previous run's outputs): a folder with anything else is refused, not deleted.
    """
    import shutil

    p = Path(path)
    folder = check_replaceable_dir(p, owned_names)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp makes 0700
        yield tmp
        if p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".old", dir=folder))
            os.replace(p, old / "d")      # two renames: POSIX cannot swap a non-empty folder in one
            os.replace(tmp, p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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



