"""HeteroFusion evidence on offline text: a GPT-2-style source and a Llama-style target, byte-level LMs
of different widths and depths, both pretrained on Python standard-library source (the corpus of
bench_transformers.py). The task: the same text in upper case (a shift the general models have
barely seen). The source is fine-tuned on it (full fine-tune, lr 3e-4); hm.fuse transfers its update into the
target as a LoRA adapter. Numbers go to docs/fusion.md.

    PYTHONPATH=python python bench/bench_fusion.py [--steps 400] [--task-steps 200] [--rank 8]

Reported on held-out task windows (test loss, lower is better): target before, target + fused
adapter, the source expert itself, a naive baseline (each source update copied by position into the
target's shape: zero-padded/cropped, what a weight copy does when shapes differ), and the
noisy-source runs (two experts fine-tuned with different data orders + a random update of the
expert's norm: agreement-weighted vs equal weights; and one expert + the noise, where agreement
cannot tell them apart), least-squares maps instead of the default Procrustes, the average of the two
experts' separately transferred adapters, and an ensemble of the target with the source expert.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hetmerge as hm  # noqa: E402
from bench_transformers import llama, lm_metrics, stdlib_corpus, train  # noqa: E402
from hetmerge.fusion import match_blocks, topology  # noqa: E402
from hetmerge.fusion.transfer import lora_factors  # noqa: E402


def gpt2(seed: int, hidden=64, heads=4, layers=3):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=256, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return tf.GPT2LMHeadModel(cfg)


def upper(chunks):
    """The task: the same windows in upper case (ASCII bytes a-z -> A-Z)."""
    return torch.where((chunks >= 97) & (chunks <= 122), chunks - 32, chunks)


def batches_of(data):
    def batches(model, g):
        x = data[torch.randint(0, len(data), (32,), generator=g)]
        logits = model(input_ids=x[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    return batches


def canon(model, p):
    return p.weight(model).detach().double()


def naive_copy(target, source, ft, rank):
    """Each source role update cropped / zero-padded by position into the target role's shape, rank r."""
    t_topo, s_topo = topology(target), topology(source)
    out = copy.deepcopy(target)
    pairs = match_blocks(t_topo.n_blocks, s_topo.n_blocks)
    with torch.no_grad():
        for i, j in pairs.items():
            for r, tp in t_topo.blocks[i].items():
                sp = s_topo.blocks[j].get(r)
                if r.startswith("norm") or sp is None:
                    continue
                d = canon(ft, sp) - canon(source, sp)
                w = tp.weight(out)
                pad = torch.zeros(w.shape, dtype=torch.float64)
                n0, n1 = min(w.shape[0], d.shape[0]), min(w.shape[1], d.shape[1])
                pad[:n0, :n1] = d[:n0, :n1]
                a, b = lora_factors(pad, rank)
                w.add_((b @ a).to(w.dtype))     # a view of the stored weight (Conv1D: transposed view)
    return out


def noisy_like(source, ft, seed):
    """source + a random update with the norm of ft − source in every projection."""
    out, g = copy.deepcopy(source), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (n, p), (_, q), (_, b) in zip(out.named_parameters(), ft.named_parameters(), source.named_parameters()):
            if p.dim() == 2 and ".h." in n:
                d = q - b
                p.add_(torch.randn(p.shape, generator=g) * d.norm() / p.numel() ** 0.5)
    return out


class Ensemble(torch.nn.Module):
    """Mean of two byte-level LMs' next-token probabilities (same vocabulary), as log-probabilities."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, input_ids):
        pa = torch.softmax(self.a(input_ids=input_ids).logits, -1)
        pb = torch.softmax(self.b(input_ids=input_ids).logits, -1)

        class Out:
            logits = torch.log(0.5 * (pa + pb))
        return Out()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="pretraining steps of each family")
    ap.add_argument("--task-steps", type=int, default=200, help="task fine-tuning steps of the source")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows (of 64 tokens)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    train_c, val_c, test_c, n_chars = stdlib_corpus(64)
    task_train, task_test, gen_test = upper(train_c), upper(test_c[:200]), test_c[:200]
    t0 = time.perf_counter()
    target = train(llama(0, hidden=48, heads=3, layers=2), batches_of(train_c), a.steps, 3e-3, 0)
    source = train(gpt2(1), batches_of(train_c), a.steps, 3e-3, 1)
    expert = train(copy.deepcopy(source), batches_of(task_train), a.task_steps, 3e-4, 2)
    expert2 = train(copy.deepcopy(source), batches_of(task_train), a.task_steps, 3e-4, 5)   # other data order
    t_train = time.perf_counter() - t0
    calib = train_c[-a.calib:, :-1]        # general text, not the task
    t0 = time.perf_counter()
    fused = hm.fuse(target, [(source, expert)], calib, rank=a.rank)
    t_fuse = time.perf_counter() - t0
    noisy = noisy_like(source, expert, 3)
    three = [(source, expert), (source, expert2), (source, noisy)]
    fused_noisy = hm.fuse(target, three, calib, rank=a.rank)
    equal_noisy = hm.fuse(target, three, calib, rank=a.rank, temperature=1e9)
    two = hm.fuse(target, [(source, expert), (source, noisy)], calib, rank=a.rank)
    lstsq = hm.fuse(target, [(source, expert)], calib, rank=a.rank, basis="lstsq")

    def apply(*results, weight=1.0):
        m = copy.deepcopy(target)
        with torch.no_grad():
            for res in results:
                for name, d in res.deltas.items():
                    k = f"base_model.model.{name}"
                    ba = weight * (res.tensors[k + ".lora_B.weight"] @ res.tensors[k + ".lora_A.weight"])
                    w = m.get_submodule(name).weight
                    w.add_(ba.t() if type(m.get_submodule(name)).__name__ == "Conv1D" else ba)
        return m

    # baselines: the two experts transferred one by one and their adapters averaged (no denoising),
    # and an ensemble of the target and the source expert (mean of their next-byte probabilities)
    single2 = hm.fuse(target, [(source, expert2)], calib, rank=a.rank)
    averaged = apply(fused, single2, weight=0.5)
    ensemble = Ensemble(target, expert)

    rows = [("target (Llama d48 L2) before", target), (f"target + fused adapter (r={a.rank})", apply(fused)),
            (f"target + naive copy by position (r={a.rank})", naive_copy(target, source, expert, a.rank)),
            (f"target + fused adapter, least-squares maps (r={a.rank})", apply(lstsq)),
            ("target + 2 experts & 1 noisy source, agreement-weighted", apply(fused_noisy)),
            ("target + 2 experts & 1 noisy source, equal weights", apply(equal_noisy)),
            ("target + 1 expert & 1 noisy source, agreement-weighted", apply(two)),
            ("target + average of the 2 experts' adapters (no denoising)", averaged),
            ("ensemble: target and source expert (mean of probabilities)", ensemble),
            ("source (GPT-2 d64 L3) base", source), ("source expert (full fine-tune)", expert)]
    print(f"\nstdlib source, {n_chars:,} characters, byte-level; {a.steps} pretraining steps each, "
          f"{a.task_steps} task steps ({t_train:.0f} s); calibration {a.calib}x64 general tokens; "
          f"fuse {t_fuse:.2f} s\nnoisy run (expert, expert 2, noisy): weights "
          f"{[round(x, 4) for x in fused_noisy.weights.tolist()]}, agreement "
          f"{[round(x, 3) for x in fused_noisy.agreement.tolist()]}; two sources (expert, noisy): weights "
          f"{[round(x, 3) for x in two.weights.tolist()]} (agreement is symmetric for two)\n")
    print("| model | task loss (upper case) | general loss |\n|---|---:|---:|")
    for name, m in rows:
        print(f"| {name} | {lm_metrics(m, task_test)[0]:.3f} | {lm_metrics(m, gen_test)[0]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
