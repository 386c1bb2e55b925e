"""hm.fuse: transfer task updates of source models (other families, widths, depths) into a target
model as one PEFT LoRA adapter (HeteroFusion, our design: docs/fusion.md)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .basis import BASES, RIDGE
from .blocks import cka_matrix, monotone_match
from .calib import shared_plans, text_plans
from .denoise import fuse_updates, source_weights
from .topology import FusionError, match_blocks, topology
from .transfer import MapCache, lora_factors, module_deltas, role_deltas, transfer_deltas

__all__ = ["FusionResult", "fuse", "load_model", "calib_ids", "BLOCK_RULES"]

BLOCK_RULES = ("depth", "cka")


@dataclass
class FusionResult:
    """The fused LoRA adapter of the target and how it was made.

    config: PEFT's adapter_config.json as a dict; tensors: {PEFT key: tensor} (lora_A [r, in],
    lora_B [out, r], float32); deltas: {target module: fused ΔW [out, in] before the rank truncation};
    weights / agreement: [K] per source (denoising); pairs: [{target block: source block}] per source."""
    config: dict
    tensors: dict
    deltas: dict
    weights: torch.Tensor
    agreement: torch.Tensor
    pairs: list
    rank: int
    kept_energy: dict = field(default_factory=dict)   # module -> |B A|² / |ΔW|² after truncation

    def save(self, out, overwrite: bool = False) -> Path:
        """Write adapter_config.json + adapter_model.safetensors into folder `out` (atomic)."""
        from safetensors.torch import save_file

        out = Path(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"fuse: output {out} exists (pass overwrite=True to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            (tmp / "adapter_config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt", "created_by": "hetmerge fuse"})
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def load_model(x, what: str, base: nn.Module | None = None) -> nn.Module:
    """A transformers model from a module, an HF directory (config.json), or — given `base` — a PEFT
    adapter directory or PeftModel, merged into a copy of `base` (inputs are not changed)."""
    try:
        from peft import PeftModel
    except ImportError:   # peft is needed only for adapters
        PeftModel = None
    if PeftModel is not None and isinstance(x, PeftModel):
        return copy.deepcopy(x).merge_and_unload().eval()
    if isinstance(x, nn.Module):
        return x
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if (p / "adapter_config.json").is_file():
            if base is None:
                raise FusionError(f"fuse: {what} {p} is a PEFT adapter; it needs its base model")
            if PeftModel is None:
                raise FusionError(f"fuse: {what} {p} is a PEFT adapter: install peft to read it")
            return PeftModel.from_pretrained(copy.deepcopy(base), str(p)).merge_and_unload().eval()
        if (p / "config.json").is_file():
            import transformers

            return transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
        raise FileNotFoundError(f"fuse: {what} {p} is neither a Hugging Face model directory (config.json) "
                                "nor a PEFT adapter directory (adapter_config.json)")
    raise FusionError(f"fuse: {what} must be a transformers model or a directory, got {type(x).__name__}")


def calib_ids(calib, models: list[tuple[str, nn.Module]]) -> torch.Tensor:
    """Calibration token ids [B, T] int64, checked against every model's vocabulary (shared ids)."""
    return torch.cat(shared_plans(calib, models)[0].batches)


def _tokenizers(tokenizers, models: list[tuple[str, object]]) -> list:
    """One tokenizer per model (target first, then each source base): given (one for all, or a list),
    or read from the model's directory when it came as one."""
    if tokenizers is not None and not isinstance(tokenizers, (list, tuple)):
        return [tokenizers] * len(models)
    if tokenizers is not None:
        if len(tokenizers) != len(models):
            raise FusionError(f"fuse: tokenizers must be one tokenizer or a list of {len(models)} (the target's, "
                              f"then each source's), got {len(tokenizers)}")
        return list(tokenizers)
    out = []
    for what, given in models:
        if not isinstance(given, (str, os.PathLike)):
            raise FusionError(f"fuse: calib is text, so the {what} needs a tokenizer: it was given as a module; "
                              "pass tokenizers= (the target's, then each source's)")
        try:
            from transformers import AutoTokenizer
            out.append(AutoTokenizer.from_pretrained(str(given)))
        except (OSError, ValueError) as exc:
            raise FusionError(f"fuse: calib is text, but the {what} directory {given} has no tokenizer "
                              f"({type(exc).__name__}: {exc})") from exc
    return out


def fuse(target, sources, calib, rank: int = 8, basis: str = "procrustes", blocks=None,
         density: float = 1.0, temperature: float = 0.1, ridge: float = RIDGE, output=None, overwrite: bool = False,
         tokenizers=None, calib_length: int = 64, calib_pool: str = "last") -> FusionResult:
    """Transfer each source's task update into `target` and fuse them into one LoRA adapter.

    target: transformers causal LM (Llama/Mistral/Qwen2/GPT-2) or its HF directory.
    sources: [(source base, source fine-tuned)] — each a model or HF directory; the fine-tuned one
        may also be a PEFT adapter directory of its base (or a PeftModel).
    calib: token ids [B, T] valid for every model (shared vocabulary), or TEXT that each model
        encodes with its own tokenizer, activations paired by character spans (calib.py); N paired
        rows should exceed the widest projection for a well-posed least-squares map.
    tokenizers: for text calib: one tokenizer for all, or [target's, source 0's, ...]
        (tokenizers.Tokenizer, transformers fast tokenizer, or text -> (ids, ends)); default: read
        from each model's directory. calib_length: most tokens per forward pass of any model;
        calib_pool: "last" | "mean" token of each span.
    rank: LoRA rank r of the adapter; basis: "lstsq" | "procrustes" | "permutation" (basis.py);
    blocks: None or "depth" (relative depth), "cka" (by linear CKA of block outputs, order kept:
        blocks.py), or {target block: source block}; density, temperature: denoising;
    ridge: least-squares ridge relative to the activations' mean eigenvalue (larger = smoother maps).
    output: folder to write the adapter to (PEFT format), or None.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise FusionError(f"fuse: rank must be a positive int, got {rank!r}")
    if basis not in BASES:
        raise FusionError(f"fuse: basis must be one of {BASES}, got {basis!r}")
    if not 0.0 < float(density) <= 1.0:
        raise FusionError(f"fuse: density must be in (0, 1], got {density!r}")
    if not float(ridge) >= 0.0:
        raise FusionError(f"fuse: ridge must be >= 0, got {ridge!r}")
    if not float(temperature) > 0.0:
        raise FusionError(f"fuse: temperature must be > 0, got {temperature!r}")
    if isinstance(blocks, str) and blocks not in BLOCK_RULES:
        raise FusionError(f"fuse: blocks must be one of {BLOCK_RULES} or a {{target block: source block}} dict, "
                          f"got {blocks!r}")
    if not isinstance(sources, (list, tuple)) or not sources:
        raise FusionError("fuse: sources must be a non-empty list of (source base, source fine-tuned) pairs")
    tgt = load_model(target, "target").eval()
    t_topo = topology(tgt)
    loaded = []
    for k, pair in enumerate(sources):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise FusionError(f"fuse: sources[{k}] must be a (source base, source fine-tuned) pair, got {pair!r}")
        base = load_model(pair[0], f"sources[{k}] base").eval()
        ft = load_model(pair[1], f"sources[{k}] fine-tuned", base=base)
        loaded.append((base, ft))
    models = [("target", tgt)] + [(f"sources[{k}] base", b) for k, (b, _) in enumerate(loaded)]
    if isinstance(calib, str):
        given = [("target", target)] + [(f"sources[{k}] base", pair[0]) for k, pair in enumerate(sources)]
        plans = text_plans(calib, _tokenizers(tokenizers, given), models, calib_length, calib_pool)
    else:
        plans = shared_plans(calib, models)
    by_model: dict = {}
    for (_, m), plan in zip(models, plans):
        by_model.setdefault(id(m), plan)
    cache = MapCache(by_model, basis, float(ridge), outputs=blocks == "cka")
    updates, pairs = [], []
    for k, (base, ft) in enumerate(loaded):
        s_topo = topology(base)
        if blocks == "cka":
            pr = monotone_match(cka_matrix(cache.block_updates(tgt, t_topo), cache.block_updates(base, s_topo)))
        else:
            pr = match_blocks(t_topo.n_blocks, s_topo.n_blocks, None if isinstance(blocks, str) else blocks)
        d = role_deltas(base, ft, s_topo, f"sources[{k}]")
        updates.append(module_deltas(tgt, t_topo, transfer_deltas(tgt, t_topo, base, s_topo, d, pr, cache)))
        pairs.append(pr)
    if not any(updates):
        raise FusionError("fuse: no source update reached a target projection (all deltas zero, or no role "
                          "in common)")
    weights, agree = source_weights(updates, float(temperature))
    fused = fuse_updates(updates, weights, float(density))
    result = _adapter(tgt, t_topo, fused, rank, target)
    result.weights, result.agreement, result.pairs = weights, agree, pairs
    if output is not None:
        result.save(output, overwrite=overwrite)
    return result


def _adapter(tgt: nn.Module, t_topo, fused: dict, rank: int, target) -> FusionResult:
    from peft import LoraConfig

    tensors, energy = {}, {}
    for name, d in sorted(fused.items()):
        a, b = lora_factors(d, rank)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.float()
        n = float(d.norm()) ** 2
        energy[name] = float((b @ a).norm()) ** 2 / n if n > 0 else 1.0
    fan = t_topo.family == "gpt2"   # Conv1D stores [in, out]: PEFT needs fan_in_fan_out
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=sorted(fused),
                     fan_in_fan_out=fan, task_type="CAUSAL_LM",
                     base_model_name_or_path=str(target) if isinstance(target, (str, os.PathLike)) else None)
    config = cfg.to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return FusionResult(config, tensors, fused, torch.ones(1), torch.ones(1), [], rank, energy)
