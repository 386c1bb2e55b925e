"""Multi-task merging of Hugging Face directories, streamed: `merge_tasks_hf(base_dir, expert_dirs,
out_dir, method, ...)` writes a Hugging Face directory whose tensors are computed one at a time, when
the writer asks for them, from memory-mapped shards. Peak memory is about one tensor of each input
plus the method's work space for that tensor, whatever the checkpoints' size, so checkpoints larger
than RAM merge (the same handlers as hm.merge_tasks: results are identical tensor by tensor).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..hf import HFState, save_hf
from .plumbing import check_finite
from .registry import TensorContext

__all__ = ["merge_tasks_hf", "MergedTaskState"]


class MergedTaskState(Mapping):
    """Lazy {key: merged tensor} over a base and expert states; each tensor computed on access."""

    def __init__(self, base: HFState, experts: list[HFState], method, scale, density, seed, options,
                 check_finite_values: bool = True, non_float: str = "error"):
        self.base, self.experts = base, experts
        self.args = (method, scale, density, seed, options)
        self.check_finite_values, self.non_float = check_finite_values, non_float

    def __getitem__(self, key: str) -> torch.Tensor:
        method, scale, density, seed, options = self.args
        a = self.base[key]
        ex = [e[key] for e in self.experts]
        if not a.is_floating_point():
            if self.non_float == "error":
                for t, e in enumerate(ex):
                    if not torch.equal(e, a):
                        raise ValueError(f"experts[{t}][{key!r}]: integer tensor differs from the base's; "
                                         "pass non_float='base' to keep the base's")
            return a
        if self.check_finite_values:
            check_finite(key, a, ex)
        with torch.no_grad():
            m = method.handler(a, ex, TensorContext(key, scale, density, seed, options))
        return m.to(a.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base.meta())

    def __len__(self) -> int:
        return len(self.base.meta())

    def meta(self):
        return self.base.meta()


def merge_tasks_hf(base_dir: str | os.PathLike, expert_dirs, out_dir: str | os.PathLike, method: str,
                   scale: float = 1.0, density: float | None = None, seed: int = 0, *, check_finite: bool = True,
                   non_float: str = "error", max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
                   overwrite: bool = False, progress=None, **method_options) -> Path:
    """hm.merge_tasks on Hugging Face directories (config.json + safetensors shards), streamed to
    `out_dir` (sharded, atomic, the base's config and tokenizer files). Arguments as in merge_tasks;
    every expert must hold the base's keys, shapes and model_type. Returns the output folder."""
    from . import resolve_method

    if non_float not in ("error", "base"):
        raise ValueError(f"non_float: expected 'error' or 'base', got {non_float!r}")
    m, s, d, sd, opts = resolve_method(method, scale, density, seed, method_options, for_states=True)
    if isinstance(expert_dirs, (str, os.PathLike)) or not expert_dirs:
        raise ValueError("expert_dirs: a non-empty list of expert directories")
    base = HFState(base_dir)
    experts = [HFState(e) for e in expert_dirs]
    bmeta = base.meta()
    for t, (folder, e) in enumerate(zip(expert_dirs, experts)):
        mt_b, mt_e = base.config.get("model_type"), e.config.get("model_type")
        if mt_b != mt_e:
            raise ValueError(f"experts[{t}] {folder}: model_type {mt_e!r} differs from the base's {mt_b!r}")
        emeta = e.meta()
        missing, extra = sorted(set(bmeta) - set(emeta)), sorted(set(emeta) - set(bmeta))
        if missing or extra:
            raise ValueError(f"experts[{t}] {folder}: not the base's architecture: "
                          f"{'lacks ' + str(missing[:3]) if missing else ''}{' has extra ' + str(extra[:3]) if extra else ''}")
        for k, v in bmeta.items():
            if tuple(emeta[k].shape) != tuple(v.shape):
                raise ValueError(f"experts[{t}][{k!r}]: shape {tuple(emeta[k].shape)} differs from the base's "
                              f"{tuple(v.shape)}")
    merged = MergedTaskState(base, experts, m, s, d, sd, opts, check_finite, non_float)
    return save_hf(out_dir, merged, base_dir=base_dir, max_shard_size=max_shard_size, dtype=dtype,
                   overwrite=overwrite, progress=progress)
