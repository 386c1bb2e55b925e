"""Argument normalisation shared by the ops wrappers: frameworks, index maps, outputs, backends."""
from __future__ import annotations

import importlib.util
import math
import mmap
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from . import _C

# The CUDA module is optional: absent when built without nvcc, unusable without a driver.
_cuda = None
_CUDA_IMPORT_ERROR: str | None = None
if importlib.util.find_spec("hetmerge._cuda") is None:
    _CUDA_IMPORT_ERROR = "not compiled (build with nvcc on PATH or CUDACXX set, HETMERGE_CUDA=ON)"
else:
    try:
        from . import _cuda  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        _CUDA_IMPORT_ERROR = f"failed to import: {exc}"

Array = Any  # torch.Tensor | numpy.ndarray


def as_array(x: Any, fn: str, arg: str) -> Array:
    """torch tensors and numpy arrays pass through; other DLPack producers become torch tensors."""
    if isinstance(x, torch.Tensor):
        # The primitives are not differentiable; exporting a tensor that requires grad would fail.
        return x.detach() if x.requires_grad else x
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    raise TypeError(f"{fn}: {arg} must be a torch.Tensor, numpy.ndarray or DLPack array, got {type(x).__name__}")


def index_map(m: Any, fn: str, arg: str, like: Array) -> Array | None:
    """An int64 index map in like's framework and device (None stays None)."""
    if m is None:
        return None
    if isinstance(like, torch.Tensor):
        if isinstance(m, torch.Tensor):
            if m.dtype.is_floating_point or m.dtype.is_complex or m.dtype == torch.bool:
                raise TypeError(f"{fn}: {arg} must be an integer index map, got {m.dtype}")
            # No detach (integer tensors carry no grad): a map already on the device and int64 stays the
            # same object, which the CUDA backend validates once, not on every call.
            return m.to(device=like.device, dtype=torch.int64)
        arr = np.asarray(m)
        _check_integer(arr, fn, arg)
        return torch.as_tensor(arr.astype(np.int64, copy=False), device=like.device)
    if isinstance(m, torch.Tensor):
        if m.dtype.is_floating_point or m.dtype.is_complex or m.dtype == torch.bool:
            raise TypeError(f"{fn}: {arg} must be an integer index map, got {m.dtype}")
        m = m.detach().cpu().numpy()
    arr = np.asarray(m)
    _check_integer(arr, fn, arg)
    return arr.astype(np.int64, copy=False)


def _check_integer(arr: np.ndarray, fn: str, arg: str) -> None:
    if arr.size == 0 and arr.dtype.kind == "f":
        return  # np.asarray([]) is float64; an empty map is still a valid map
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{fn}: {arg} must be an integer index map, got dtype {arr.dtype}")


def float_list(values: Any, fn: str, arg: str) -> list[float]:
    """A 1-D sequence/tensor/array of numbers as Python floats (they travel by value to the kernels)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{fn}: {arg} must be 1-D, got shape {tuple(arr.shape)}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{fn}: {arg}[{i}] = {arr[i]} is not finite")
    return arr.tolist()


# Outputs at least this large get their own huge-page-advised mapping: first-touch page faults on
# 4 KiB pages cap writes into fresh memory near 1.5–2 GB/s here, 2 MiB pages lift that ~4-6x.
# Below 32 MiB (glibc's largest dynamic mmap threshold) malloc recycles freed memory without
# faults, which beats a fresh mapping, so smaller outputs stay with torch/numpy's allocator.
HUGE_PAGE_MIN_BYTES = 32 << 20


def _huge_page_buffer(nbytes: int) -> mmap.mmap | None:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
        return buf
    except (OSError, ValueError):
        return None


def empty_like_framework(shape: Sequence[int], like: Array, dtype: Any = None) -> Array:
    """A new contiguous output of like's framework and device (the tensor keeps its memory alive)."""
    shape = tuple(int(s) for s in shape)
    if isinstance(like, torch.Tensor):
        dtype = dtype or like.dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if like.device.type == "cpu" and nbytes >= HUGE_PAGE_MIN_BYTES:
            buf = _huge_page_buffer(nbytes)
            if buf is not None:
                with warnings.catch_warnings():  # mmap buffers are writable; torch warns generically
                    warnings.simplefilter("ignore")
                    return torch.frombuffer(buf, dtype=dtype).view(shape)
        return torch.empty(shape, dtype=dtype, device=like.device)
    dtype = np.dtype(dtype or like.dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        buf = _huge_page_buffer(nbytes)
        if buf is not None:
            return np.frombuffer(buf, dtype=dtype).reshape(shape)
    return np.empty(shape, dtype=dtype)


def check_out(out: Any, fn: str, like: Array) -> Array:
    if isinstance(like, torch.Tensor) != isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: out must be a {type(like).__name__} like the inputs, got {type(out).__name__}")
    return out


def is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def is_cuda(x: Array) -> bool:
    return isinstance(x, torch.Tensor) and x.is_cuda


def cuda_status() -> str | None:
    """None when CUDA tensors can be processed, else the reason why not."""
    if _cuda is None:
        return f"hetmerge's CUDA backend is unavailable: {_CUDA_IMPORT_ERROR}"
    reason = _cuda.unavailable_reason()
    return reason or None


def backend(like: Array, fn: str):
    """The native module for like's device, and the extra arguments its entry points take."""
    if not is_cuda(like):
        return _C, {}
    reason = cuda_status()
    if reason is not None:
        raise RuntimeError(f"{fn}: got a CUDA tensor but {reason}")
    stream = torch.cuda.current_stream(like.device).cuda_stream
    return _cuda, {"stream": stream}


def shape_of(x: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
