"""Streaming merge of sharded Hugging Face directories with Llama-7B tensor shapes: throughput against
this machine's disk, and peak memory.

    PYTHONPATH=python python bench/bench_hf_stream.py [--layers 4] [--dtype bfloat16] [--dir /tmp/hf-stream]

Writes two synthetic Llama directories (hidden 4096, MLP 11008, 32 heads × 128, vocabulary 32000,
`--layers` blocks, sharded safetensors + index, config.json) tensor by tensor, then merges the target
into the base at λ = 0.3 with `hetmerge.hf_merge.merge_hf` through a random alignment (a random
permutation of the residual stream, of every block's heads and MLP units: every tensor is gathered),
in a child process whose peak RSS is read with getrusage. Throughput = (bytes read + bytes written) /
merge time, against a plain `cp -r` of one directory (read + write) timed in the same run: both read
files the page cache may hold (they were just written), so the ratio is what compares. A few merged
tensors are checked against the formula.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

CHILD = """
import json, resource, sys, time, torch
from hetmerge.hf_merge import merge_hf
from hetmerge.alignment import Alignment
from hetmerge.hf import HFState
from hetmerge.pairing import pair_specs
from hetmerge.transformer_spec import canonical_state, layer_map_by_name, transformer_spec
base, target, out = sys.argv[1:4]
hb, ht = HFState(base), HFState(target)
cb, ct = canonical_state(hb.config, hb), canonical_state(ht.config, ht)
sa, sb = transformer_spec(cb, hb.config), transformer_spec(ct, ht.config)
pairing = pair_specs(cb, ct, sa, sb, layer_map_by_name(sa, sb))
g = torch.Generator().manual_seed(0)
maps = {n: torch.randperm(l.n_a, generator=g) for n, l in pairing.links.items()}
t0 = time.perf_counter()
merge_hf(base, target, out, lam=0.3, res=Alignment(pairing, maps), max_shard_size="2GB")
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "maps": {k: v.tolist() for k, v in maps.items() if k in ("residual", "model.layers.0.mlp")}}))
"""


class RandomState(dict):
    """{key: shape} whose tensors are drawn on access (save_hf streams them one at a time)."""

    def __init__(self, shapes: dict, dtype, seed: int):
        super().__init__(shapes)
        self.dtype, self.seed = dtype, seed

    def __getitem__(self, key):
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{key}".encode()))
        return (0.02 * torch.randn(dict.__getitem__(self, key), generator=g)).to(self.dtype)

    def meta(self):
        return {k: torch.empty(s, dtype=self.dtype, device="meta") for k, s in self.items()}


def llama_shapes(layers: int, hidden=4096, inter=11008, vocab=32000) -> dict:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(folder: Path, layers: int, dtype, seed: int) -> int:
    from hetmerge.hf import save_hf
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": str(dtype).replace("torch.", "")}
    state = RandomState(llama_shapes(layers), dtype, seed)
    src = folder.parent / f"{folder.name}-config"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(config))
    save_hf(folder, state, base_dir=src, max_shard_size="2GB", overwrite=True)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dir", default="/tmp/hf-stream")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size = write_model(root / "base", args.layers, dtype, 0)
    write_model(root / "target", args.layers, dtype, 1)
    print(f"wrote two {args.layers}-block Llama-7B-shaped directories, {size / 2**30:.2f} GiB each "
          f"({args.dtype}), in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(root / "copy", ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(root / "base"), str(root / "copy")], check=True)
    subprocess.run(["sync"], check=True)
    t_copy = time.perf_counter() - t0
    copy_mbs = 2 * size / t_copy / 2**20
    shutil.rmtree(root / "merged", ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root / "base"), str(root / "target"), str(root / "merged")],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:])
        return 1
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    merge_mbs = 3 * size / doc["seconds"] / 2**20
    print(f"plain copy (cp -r + sync): {t_copy:.1f} s, {copy_mbs:.0f} MiB/s read+written")
    print(f"merge_hf (random alignment, λ = 0.3): {doc['seconds']:.1f} s, {merge_mbs:.0f} MiB/s read+written "
          f"= {merge_mbs / copy_mbs:.0%} of the copy; peak RSS {doc['rss_mib']:.0f} MiB for "
          f"{3 * size / 2**30:.2f} GiB moved")
    # check: merged down_proj of block 0 = 0.7·A + 0.3·B[residual][:, mlp] (a few rows)
    from hetmerge.hf import HFState
    hb, ht, hm_ = HFState(root / "base"), HFState(root / "target"), HFState(root / "merged")
    res_map, mlp_map = torch.tensor(doc["maps"]["residual"]), torch.tensor(doc["maps"]["model.layers.0.mlp"])
    k = "model.layers.0.mlp.down_proj.weight"
    rows = torch.arange(0, 4096, 511)
    want = 0.7 * hb[k][rows].float() + 0.3 * ht[k][res_map[rows]][:, mlp_map].float()
    err = float((hm_[k][rows].float() - want).abs().max())
    print(f"check {k} rows {rows.tolist()}: max |merged − formula| = {err:.2e} (one {args.dtype} rounding)")
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
