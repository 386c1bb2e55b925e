"""Peak memory of a streaming merge of two multi-GB checkpoints, against the models' size.

    python bench/bench_big_merge.py                       # base 8192 wide, target 6144, 12 hidden layers (3.2 + 1.8 GB)
    python bench/bench_big_merge.py --base-width 16384 --target-width 12288 --layers 3   # 1 GB tensors
    python bench/bench_big_merge.py --dir /scratch --keep

Writes two synthetic float32 MLP checkpoints (safetensors) with different widths, then merges the
target into the base at λ = 0.3 through random padded permutations with
``hetmerge.checkpoint.stream_merge`` (memory-mapped inputs, one ``ops.interpolate`` per block of base
rows, the output streamed to disk). The merge runs in a child process so that its peak RSS (VmHWM) is not
polluted by generating the inputs. A few output rows are checked against the formula.
Needs about (base + target + base) bytes of free disk in --dir.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import hetmerge
from hetmerge import ops
from hetmerge.checkpoint import LazyState, StreamWriter
from hetmerge.merging import MergeItem, stream_merge

LAM = 0.3
IN_DIM, OUT_DIM = 1024, 10


def _layout(width: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """fc0 [w, in], fc1..fc{layers-1} [w, w], head [out, w] (+ biases): an MLP built by hetmerge."""
    out, d = [], IN_DIM
    for i in range(layers):
        out += [(f"fc{i}.weight", (width, d)), (f"fc{i}.bias", (width,))]
        d = width
    out += [("head.weight", (OUT_DIM, d)), ("head.bias", (OUT_DIM,))]
    return out


def write_checkpoint(path: str, width: int, layers: int, seed: int) -> int:
    """Random float32 weights, written tensor by tensor (never the whole model in memory)."""
    g = torch.Generator().manual_seed(seed)
    layout = _layout(width, layers)
    with StreamWriter(path, [(k, torch.float32, s) for k, s in layout]) as w:
        for k, s in layout:
            w.write(k, torch.empty(s).uniform_(-0.05, 0.05, generator=g))
    return os.path.getsize(path)


def random_map(n_a: int, n_b: int, rng: np.random.Generator) -> torch.Tensor:
    """Base-sized index map: a random injection of target units, -1 (padding) where the base is wider."""
    src = np.full(n_a, -1, dtype=np.int64)
    n = min(n_a, n_b)
    src[rng.choice(n_a, n, replace=False)] = rng.choice(n_b, n, replace=False)
    return torch.from_numpy(src)


def merge_items(base_w: int, target_w: int, layers: int, seed: int = 0) -> dict:
    """{base key: (target key, rows, cols, λ)} for the whole MLP (input and output axes fixed)."""
    rng = np.random.default_rng(seed)
    maps = [random_map(base_w, target_w, rng) for _ in range(layers)]
    items = {}
    for i in range(layers):
        items[f"fc{i}.weight"] = (f"fc{i}.weight", maps[i], maps[i - 1] if i else None, LAM)
        items[f"fc{i}.bias"] = (f"fc{i}.bias", maps[i], None, LAM)
    items["head.weight"] = ("head.weight", None, maps[-1], LAM)
    items["head.bias"] = ("head.bias", None, None, LAM)
    return items


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(args) -> int:
    """The measured process: open both files, stream the merge, report VmHWM."""
    rss_start = _status_kb("VmRSS")
    base, target = LazyState(args.base), LazyState(args.target)
    items = merge_items(args.base_width, args.target_width, args.layers)
    stats = stream_merge(base, target, args.out, [MergeItem(k, tk, k.split(".")[0], r, c, lam)
                                                  for k, (tk, r, c, lam) in items.items()],
                         chunk_bytes=args.chunk_mb << 20)
    # spot check: a few rows of the widest tensor against (1-λ)·a + λ·permute_pad(b)
    k = "fc1.weight" if args.layers > 1 else "fc0.weight"
    _, rows, cols, lam = items[k]
    merged = LazyState(args.out)
    pick = torch.tensor([0, 1, args.base_width // 2, args.base_width - 1])
    a, b, m = base.get(k), target.get(k), merged.get(k)
    want = (1 - lam) * a[pick] + lam * ops.permute_pad(b, rows[pick], cols)
    ok = bool(torch.allclose(m[pick], want, atol=1e-6))
    del a, b, m
    print(json.dumps({"rss_start_kb": rss_start, "vmhwm_kb": _status_kb("VmHWM"),
                      "threads_hetmerge": hetmerge.get_num_threads(), "threads_torch": torch.get_num_threads(),
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "check": ok, **stats}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-width", type=int, default=8192)
    p.add_argument("--target-width", type=int, default=6144)
    p.add_argument("--layers", type=int, default=12, help="hidden layers (square [w, w] after the first)")
    p.add_argument("--dir", default=None, help="folder for the checkpoints (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--chunk-mb", type=int, default=64, help="base rows merged per block (MB)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    folder = args.dir or tempfile.mkdtemp(prefix="hetmerge-bigmerge-")
    os.makedirs(folder, exist_ok=True)
    need = 4 * sum(int(np.prod(s)) for _, s in _layout(args.base_width, args.layers)) * 2 + \
        4 * sum(int(np.prod(s)) for _, s in _layout(args.target_width, args.layers))
    free = shutil.disk_usage(folder).free
    if free < need * 1.1:
        print(f"need about {need / 1e9:.1f} GB free in {folder}, have {free / 1e9:.1f} GB; "
              "use --dir or smaller widths", file=sys.stderr)
        return 2
    paths = {n: os.path.join(folder, f"{n}.safetensors") for n in ("base", "target", "merged")}
    try:
        t0 = time.perf_counter()
        sizes = {"base": write_checkpoint(paths["base"], args.base_width, args.layers, 0),
                 "target": write_checkpoint(paths["target"], args.target_width, args.layers, 1)}
        t_gen = time.perf_counter() - t0
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--base", paths["base"],
               "--target", paths["target"], "--out", paths["merged"], "--base-width", str(args.base_width),
               "--target-width", str(args.target_width), "--layers", str(args.layers),
               "--chunk-mb", str(args.chunk_mb)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        sizes["merged"] = os.path.getsize(paths["merged"])
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif not args.keep:
            for f in paths.values():
                if os.path.exists(f):
                    os.unlink(f)

    gb = 1e9
    largest = {k: 4 * int(np.prod(s)) for k, s in _layout(args.base_width, args.layers)}
    biggest = max(largest.values())
    peak = r["vmhwm_kb"] * 1024
    start = r["rss_start_kb"] * 1024
    res = {
        "torch": torch.__version__, "base_width": args.base_width, "target_width": args.target_width,
        "layers": args.layers, "base_gb": sizes["base"] / gb, "target_gb": sizes["target"] / gb,
        "merged_gb": sizes["merged"] / gb, "two_models_gb": (sizes["base"] + sizes["target"]) / gb,
        "largest_tensor_gb": biggest / gb, "block_mb": args.chunk_mb, "rss_after_import_gb": start / gb, "peak_rss_gb": peak / gb,
        "peak_minus_import_gb": (peak - start) / gb, "merge_s": r["seconds"], "generate_s": t_gen,
        "merge_gbps": (sizes["base"] + sizes["target"] + sizes["merged"]) / gb / r["seconds"],
        "spot_check": r["check"], "threads_hetmerge": r["threads_hetmerge"], "threads_torch": r["threads_torch"],
    }
    print(f"streaming merge, float32 MLPs: base {args.base_width} wide, target {args.target_width} wide, "
          f"{args.layers} hidden layers, λ = {LAM}; merge process threads: hetmerge {r['threads_hetmerge']}, "
          f"torch {r['threads_torch']} (no reference side: this measures memory against the models' size)")
    rows = [("base checkpoint", f"{res['base_gb']:.2f} GB"), ("target checkpoint", f"{res['target_gb']:.2f} GB"),
            ("merged checkpoint", f"{res['merged_gb']:.2f} GB"),
            ("both inputs (what a load-everything merge holds, before its output)", f"{res['two_models_gb']:.2f} GB"),
            ("largest single tensor", f"{res['largest_tensor_gb']:.2f} GB"),
            ("rows processed per block", f"{args.chunk_mb} MB of base rows"),
            ("RSS after imports", f"{res['rss_after_import_gb']:.2f} GB"),
            ("peak RSS of the merge process (VmHWM)", f"{res['peak_rss_gb']:.2f} GB"),
            ("peak RSS above imports", f"{res['peak_minus_import_gb']:.2f} GB"),
            ("peak / both inputs", f"{res['peak_rss_gb'] / res['two_models_gb']:.2f}"),
            ("merge time", f"{res['merge_s']:.1f} s ({res['merge_gbps']:.2f} GB/s read+written)"),
            ("spot check of merged rows", "ok" if res["spot_check"] else "FAILED")]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a.ljust(w)}  {b}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["spot_check"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
