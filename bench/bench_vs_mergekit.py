"""Multi-task merging of Hugging Face directories: hetmerge (hm.tasks.merge_tasks_hf, streamed) vs
mergekit (run_merge, CPU, lazy loading), same inputs, same method and options, each in its own
process: wall time, peak resident memory (the child's ru_maxrss), and the largest difference
between the two outputs' tensors.

    PYTHONPATH=python python bench/bench_vs_mergekit.py [--hidden 1024] [--layers 4] [--experts 3]
        [--methods task_arithmetic ties] [--threads 2] [--workdir /tmp/hm-vs-mk]

The checkpoints are synthetic Llama-shaped models (transformers' LlamaConfig; intermediate = 2.6875 ·
hidden as in Llama-7B's 4096/11008), float32, experts = base + 0.01·N(0, 1) deltas, written once
with save_pretrained. Both sides read from disk and write a directory of safetensors shards.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HM = """
import sys, time, json, torch
torch.set_num_threads({threads})
import hetmerge as hm
from hetmerge.tasks import merge_tasks_hf
hm.set_num_threads({threads})
t0 = time.perf_counter()
merge_tasks_hf({base!r}, {experts!r}, {out!r}, {method!r}, **{kw!r})
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""

MK = """
import sys, time, json, torch
torch.set_num_threads({threads})
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
conf = MergeConfiguration.model_validate({{
    "merge_method": {method!r}, "base_model": {base!r}, "dtype": "float32",
    "models": [{{"model": e, "parameters": {{"weight": 1.0, **{per_model!r}}}}} for e in {experts!r}],
    "parameters": {shared!r}}})
t0 = time.perf_counter()
run_merge(conf, {out!r}, MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                                      lazy_unpickle=True, low_cpu_memory=True))
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""

# method -> (hetmerge kwargs, mergekit shared parameters, mergekit per-model parameters)
METHODS = {
    "task_arithmetic": ({"scale": 0.5}, {"lambda": 0.5}, {}),
    "ties": ({"density": 0.3}, {"lambda": 1.0, "normalize": True}, {"density": 0.3}),
}


def make_models(root: Path, hidden: int, layers: int, experts: int) -> tuple[str, list[str], int]:
    import torch
    import transformers

    if (root / "base" / "config.json").exists() and all((root / f"e{t}" / "config.json").exists()
                                                         for t in range(experts)):
        size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        return str(root / "base"), [str(root / f"e{t}") for t in range(experts)], size
    cfg = transformers.LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=int(2.6875 * hidden),
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    sd = base.state_dict()
    for t in range(experts):
        with torch.no_grad():
            e = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        base.load_state_dict(e)
        base.save_pretrained(root / f"e{t}")
        base.load_state_dict(sd)
    size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    return str(root / "base"), [str(root / f"e{t}") for t in range(experts)], size


def max_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file
    sa, sb = {}, {}
    for f in Path(a).glob("*.safetensors"):
        sa.update(load_file(f))
    for f in Path(b).glob("*.safetensors"):
        sb.update(load_file(f))
    common = set(sa) & set(sb)
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in common)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/hm-vs-mk")
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    base, experts, size = make_models(root, args.hidden, args.layers, args.experts)
    print(f"Llama-shaped d={args.hidden}, {args.layers} layers, float32: {size / 2**20:.0f} MiB per model, "
          f"{args.experts} experts + base; {args.threads} threads each side; each run in a fresh process")
    print("| method | hetmerge s | mergekit s | speedup | hetmerge peak RSS MiB | mergekit peak RSS MiB | max |Δ| |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        kw, shared, per_model = METHODS[method]
        out_hm, out_mk = str(root / f"hm-{method}"), str(root / f"mk-{method}")
        for o in (out_hm, out_mk):
            subprocess.run(["rm", "-rf", o])
        # each side in its own interpreter, itself the only child of a helper process, so that
        # getrusage(RUSAGE_CHILDREN) is that side's peak alone
        t_hm, rss_hm = _isolated(HM.format(threads=args.threads, base=base, experts=experts, out=out_hm,
                                           method=method, kw=kw))
        t_mk, rss_mk = _isolated(MK.format(threads=args.threads, base=base, experts=experts, out=out_mk,
                                           method=method, shared=shared, per_model=per_model))
        print(f"| {method} | {t_hm:.1f} | {t_mk:.1f} | {t_mk / t_hm:.2f}× | {rss_hm:.0f} | {rss_mk:.0f} | "
              f"{max_diff(out_hm, out_mk):.1e} |", flush=True)
    return 0


def _isolated(code: str) -> tuple[float, float]:
    """Run `code` in a child of a fresh helper process, so that RUSAGE_CHILDREN holds that child only."""
    wrapper = ("import sys, json, resource, subprocess\n"
               f"p = subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True)\n"
               "sys.stderr.write(p.stderr[-3000:]) if p.returncode else None\n"
               "print(json.dumps({'rc': p.returncode, 'out': p.stdout, "
               "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    if doc["rc"]:
        raise RuntimeError(proc.stderr[-3000:])
    seconds = json.loads(doc["out"].strip().splitlines()[-1])["seconds"]
    return seconds, doc["rss"] / 1024


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    raise SystemExit(rc)
