"""Merging small transformers trained on real data, offline: a ViT on sklearn digits and a Llama-style
causal LM (RMSNorm, SwiGLU, RoPE) on Python standard-library source text. Numbers go to
docs/transformers.md.

    PYTHONPATH=python python bench/bench_transformers.py [--part vit|lm|all] [--seeds 0 1]

Each pair of models is trained from different seeds (transformers' ViTForImageClassification /
LlamaForCausalLM built from configs), then merged along λ ∈ {0, 0.1, ..., 1} by hm.merge through
AlignView: unaligned (units by position) vs aligned by weight matching (residual stream, attention
heads, MLP units: hetmerge.transformer_spec). For each curve: the loss barrier on the test split,
max_λ [L(λ) − ((1−λ)L(0) + λL(1))], and the merged model's test metric at the λ in (0, 1) chosen on
the validation split (the best validation metric; never the test split). Heterogeneous pairs
(narrower residual stream, fewer heads, fewer blocks) are aligned into the larger base; λ = 0 is
the base, λ = 1 the zero-padded target.
"""
from __future__ import annotations

import argparse
import inspect
import math
import time

import torch
import torch.nn.functional as F

import hetmerge as hm
from hetmerge import data as hd
from hetmerge.transformer_spec import AlignView, layer_map_by_name, transformer_spec

LAMS = [i / 10 for i in range(11)]


# ---- data -------------------------------------------------------------------------------------

def digits_images():
    """sklearn digits as [N, 1, 8, 8] images: train / val (200) / test (450)."""
    return hd.digits(seed=0, image=True, val_size=200)


# a fixed list of standard-library modules: their source is the LM corpus (bytes as tokens)
STDLIB_MODULES = ["argparse", "json.decoder", "json.encoder", "csv", "textwrap", "string", "fractions",
                  "shlex", "heapq", "bisect", "calendar", "glob", "fnmatch", "difflib", "pprint",
                  "dataclasses", "statistics", "base64", "ipaddress", "configparser"]


def stdlib_corpus(seq: int):
    """Byte-level sequences of length seq+1 from the stdlib modules' source: 80% train, 10% val,
    10% test, split by contiguous position (no overlap between splits)."""
    import importlib
    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in STDLIB_MODULES)
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = (len(ids) - 1) // (seq + 1) * (seq + 1)
    chunks = ids[:n].view(-1, seq + 1)
    a, b = int(0.8 * len(chunks)), int(0.9 * len(chunks))
    return chunks[:a], chunks[a:b], chunks[b:], len(text)


# ---- models -----------------------------------------------------------------------------------

def vit(seed: int, hidden=64, heads=4, layers=4):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=2 * hidden, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.ViTForImageClassification(cfg)


def llama(seed: int, hidden=64, heads=4, layers=2, head_dim=16, kv_heads=None):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, head_dim=head_dim,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return tf.LlamaForCausalLM(cfg)


def train(model, batches, steps: int, lr: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        loss = batches(model, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ---- evaluation -------------------------------------------------------------------------------

def vit_metrics(model, X, y):
    with torch.no_grad():
        logits = model(pixel_values=X).logits
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def lm_metrics(model, chunks):
    with torch.no_grad():
        logits = model(input_ids=chunks[:, :-1]).logits
    loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1)))
    return loss, math.exp(loss)


def curve(base, target, res, evaluate, val, test):
    """[(λ, val (loss, metric), test (loss, metric))] of hm.merge through AlignView."""
    vb, vt = AlignView(base), AlignView(target)
    out = []
    for lam in LAMS:
        m = hm.merge(vb, vt, res, lam=lam).model
        out.append((lam, evaluate(m, *val), evaluate(m, *test)))
    return out


def summarize(points, higher_is_better: bool):
    losses = [p[2][0] for p in points]
    l0, l1 = losses[0], losses[-1]
    barrier = max(l - ((1 - lam) * l0 + lam * l1) for (lam, *_), l in zip(points, losses))
    inner = [p for p in points if 0 < p[0] < 1]
    pick = (max if higher_is_better else min)(inner, key=lambda p: p[1][1])
    return barrier, pick[0], pick[2][1], points[0][2][1], points[-1][2][1]


def align(base, target, max_iter=100, heads="inside"):
    """Weight matching through AlignView; max_iter=0 gives the unaligned maps (units by position);
    heads: transformer_spec's "inside" (Q/K and V/O dimensions move inside heads) or "whole"."""
    vb, vt = AlignView(base), AlignView(target)
    sb, st = transformer_spec(vb, heads=heads), transformer_spec(vt, heads=heads)
    t0 = time.perf_counter()
    res = hm.align(vb, vt, base_spec=sb, target_spec=st, layer_map=layer_map_by_name(sb, st),
                   restarts=2 if max_iter else 1, max_iter=max_iter)
    return res, time.perf_counter() - t0


def row(name, kind, s, align_s, metric_name):
    barrier, lam, m_lam, m0, m1 = s
    print(f"| {name} | {kind} | {m0:.3f} | {m1:.3f} | {lam:.1f} | {m_lam:.3f} | {barrier:.3f} | {align_s:.1f} |",
          flush=True)


def header(metric):
    print(f"| pair | alignment | {metric} λ=0 | {metric} λ=1 | λ (val) | {metric} at λ | test loss barrier | align s |")
    print("|---|---|---|---|---|---|---|---|")


# ---- parts ------------------------------------------------------------------------------------

def part_vit(seeds, steps):
    d = digits_images()
    Xtr, ytr = d.X_train, d.y_train

    def batches(model, g):
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        return F.cross_entropy(model(pixel_values=Xtr[idx]).logits, ytr[idx])

    def trained(seed, **kw):
        return train(vit(seed, **kw), batches, steps, 2e-3, seed)

    val, test = (d.X_val, d.y_val), (d.X_test, d.y_test)
    print(f"\nViT on sklearn digits (8×8, patch 2: 16 tokens + CLS; {len(ytr)} train, {len(d.y_val)} val, "
          f"{len(d.y_test)} test; {steps} AdamW steps of 64; metric: test accuracy)\n")
    header("acc")
    a, b = trained(seeds[0]), trained(seeds[1])
    row(f"d64 h4 L4, seeds {seeds[0]}/{seeds[1]}", "unaligned", summarize(curve(a, b, align(a, b, 0)[0], vit_metrics, val, test), True),
        0, "acc")
    res, t = align(a, b, heads="whole")
    row(f"d64 h4 L4, seeds {seeds[0]}/{seeds[1]}", "weight matching, whole heads", summarize(curve(a, b, res, vit_metrics, val, test), True),
        t, "acc")
    res, t = align(a, b)
    row(f"d64 h4 L4, seeds {seeds[0]}/{seeds[1]}", "weight matching, inside heads", summarize(curve(a, b, res, vit_metrics, val, test), True),
        t, "acc")
    narrow = trained(seeds[1], hidden=32, heads=2)            # head size 16 in both
    res, t = align(a, narrow)
    row("d64 h4 ← d32 h2 (head size 16)", "weight matching",
        summarize(curve(a, narrow, res, vit_metrics, val, test), True), t, "acc")
    fewer = trained(seeds[1], heads=2)                        # head size 32 vs the base's 16
    res, t = align(a, fewer)
    row("d64 h4 ← d64 h2 (head size 32 → 16)", "weight matching",
        summarize(curve(a, fewer, res, vit_metrics, val, test), True), t, "acc")
    shallow = trained(seeds[1], layers=2)
    res, t = align(a, shallow)
    row("L4 ← L2 (blocks 0,1 ← 0,1)", "weight matching",
        summarize(curve(a, shallow, res, vit_metrics, val, test), True), t, "acc")
    print("\n(d32 h2: fewer heads of the same size, zero-padded. d64 h2: 2 heads of 32 dims into 4 of 16: "
          "each target head keeps the 16 dims of its Q/K and of its V/O that weight matching pairs, the "
          "rest is dropped, and its Q takes the factor sqrt(16/32) of the base's softmax scale.)")


def part_lm(seeds, steps, seq=64):
    train_c, val_c, test_c, n_chars = stdlib_corpus(seq)

    def batches(model, g):
        idx = torch.randint(0, len(train_c), (32,), generator=g)
        x = train_c[idx]
        logits = model(input_ids=x[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))

    def trained(seed, **kw):
        return train(llama(seed, **kw), batches, steps, 3e-3, seed)

    val, test = (val_c[:200],), (test_c[:200],)
    print(f"\nLlama-style byte LM on {len(STDLIB_MODULES)} stdlib modules' source ({n_chars:,} characters; "
          f"{len(train_c)} train / {len(val_c)} val / {len(test_c)} test windows of {seq}; 200 val and 200 "
          f"test windows evaluated; {steps} AdamW steps of 32; metric: test perplexity, lower is better)\n")
    header("ppl")
    a, b = trained(seeds[0]), trained(seeds[1])
    row(f"d64 h4 L2, seeds {seeds[0]}/{seeds[1]}", "unaligned", summarize(curve(a, b, align(a, b, 0)[0], lm_metrics, val, test), False),
        0, "ppl")
    res, t = align(a, b, heads="whole")
    row(f"d64 h4 L2, seeds {seeds[0]}/{seeds[1]}", "weight matching, whole heads", summarize(curve(a, b, res, lm_metrics, val, test), False),
        t, "ppl")
    res, t = align(a, b)
    row(f"d64 h4 L2, seeds {seeds[0]}/{seeds[1]}", "weight matching, V/O inside heads", summarize(curve(a, b, res, lm_metrics, val, test),
                                                                                 False), t, "ppl")
    narrow = trained(seeds[1], hidden=48, heads=3)            # head size 16 in both
    res, t = align(a, narrow)
    row("d64 h4 ← d48 h3 (RMSNorm rescaled)", "weight matching",
        summarize(curve(a, narrow, res, lm_metrics, val, test), False), t, "ppl")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["vit", "lm", "all"], default="all")
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--vit-steps", type=int, default=600)
    ap.add_argument("--lm-steps", type=int, default=400)
    args = ap.parse_args()
    print(f"torch {torch.__version__}; threads: torch {torch.get_num_threads()}, hetmerge {hm.get_num_threads()}")
    t0 = time.perf_counter()
    if args.part in ("vit", "all"):
        part_vit(args.seeds, args.vit_steps)
    if args.part in ("lm", "all"):
        part_lm(args.seeds, args.lm_steps)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
