"""HeteroFusion evidence on offline data: a GPT-2-style source family and a Llama-style target family,
byte-level LMs of different widths and depths, both pretrained on Python standard-library source
(the corpus of bench_transformers.py). The source is fine-tuned on derived tasks, once fully and once
with a peft LoRA adapter (the paper's experts are adapters); hm.fuse transfers the experts into the
target as a LoRA adapter. Numbers go to docs/fusion.md.

    PYTHONPATH=python python bench/bench_fusion.py [--seeds 2] [--tasks upper prose add]
        [--steps 300] [--task-steps 120] [--ranks 4 8] [--scales 0.5 1 2]

Tasks (each has train / validation / test windows of 64 bytes; test loss, lower is better):
    upper   the stdlib code in upper case (a style shift the general models barely saw)
    prose   English documentation (pydoc_data.topics): another kind of text than code
    add     synthetic arithmetic lines "417+86=503"
    sort    synthetic sorting lines "dbca:abcd"

Per task and seed, on the test split: the target before, the target + the transferred adapter of the
full fine-tune and of the LoRA expert, the source experts themselves, a naive weight copy by
position (each source update cropped / zero-padded into the target's shape), the average of the two
experts' transferred adapters, their denoised fusion, an ensemble of the target with the source
expert (mean of next-byte probabilities), and two noisy runs: the two experts plus a random update
of the expert's norm, and plus another task's expert (a conflicting source), each as a plain average
of adapters and as the agreement-weighted fusion. Knobs (rank, scale of the adapter; temperature and
density of the fusion) are chosen per task and seed on the validation split, never on test.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
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

SEQ = 64


# ---- models -----------------------------------------------------------------------------------

def gpt2(seed: int, hidden=64, heads=4, layers=3):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=256, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return tf.GPT2LMHeadModel(cfg)


def lora_of(model, rank=8):
    """A peft LoRA adapter on every GPT-2 projection (c_attn, attn/mlp c_proj, c_fc)."""
    import peft
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, fan_in_fan_out=True,
                          target_modules=["c_attn", "c_proj", "c_fc"])
    return peft.get_peft_model(copy.deepcopy(model), cfg)


# ---- data -------------------------------------------------------------------------------------

def windows(text: str) -> torch.Tensor:
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = (len(ids) - 1) // (SEQ + 1) * (SEQ + 1)
    return ids[:n].view(-1, SEQ + 1)


def split(chunks):
    a, b = int(0.8 * len(chunks)), int(0.9 * len(chunks))
    return chunks[:a], chunks[a:b], chunks[b:]


def synthetic(line, n_chars: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out, size = [], 0
    while size < n_chars:
        s = line(g)
        out.append(s)
        size += len(s)
    return windows("".join(out))


def add_line(g):
    a, b = (int(x) for x in torch.randint(0, 1000, (2,), generator=g))
    return f"{a}+{b}={a + b}\n"


def sort_line(g):
    w = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(torch.randint(3, 9, (1,), generator=g)),),
                                                        generator=g))
    return f"{w}:{''.join(sorted(w))}\n"


def task_data(name: str, general):
    """(train, validation, test) windows [N, SEQ + 1] of task `name`; disjoint by position or seed."""
    tr, va, te = general
    if name == "upper":
        def up(c):
            return torch.where((c >= 97) & (c <= 122), c - 32, c)
        return up(tr), up(va), up(te)
    if name == "prose":
        import pydoc_data.topics as topics
        return split(windows("\n".join(topics.topics[k] for k in sorted(topics.topics))))
    line = {"add": add_line, "sort": sort_line}[name]
    return synthetic(line, 200_000, 1), synthetic(line, 20_000, 2), synthetic(line, 20_000, 3)


def batches_of(data):
    def batches(model, g):
        x = data[torch.randint(0, len(data), (32,), generator=g)]
        logits = model(input_ids=x[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    return batches


# ---- adapters and baselines -------------------------------------------------------------------

def canon(model, p):
    return p.weight(model).detach().double()


def naive_deltas(target, source, ft):
    """{target module: ΔW}: each source role update cropped / zero-padded by position into the target
    role's shape (what a weight copy does when shapes differ); blocks by relative depth."""
    t_topo, s_topo = topology(target), topology(source)
    out = {}
    for i, j in match_blocks(t_topo.n_blocks, s_topo.n_blocks).items():
        for r, tp in t_topo.blocks[i].items():
            sp = s_topo.blocks[j].get(r)
            if r.startswith("norm") or sp is None:
                continue
            d = canon(ft, sp) - canon(source, sp)
            shape = canon(target, tp).shape
            pad = torch.zeros(shape, dtype=torch.float64)
            n0, n1 = min(shape[0], d.shape[0]), min(shape[1], d.shape[1])
            pad[:n0, :n1] = d[:n0, :n1]
            out[tp.module] = pad
    return out


def low_rank(deltas: dict, rank: int) -> dict:
    """{module: B A}: each ΔW truncated to rank r (what the LoRA adapter adds)."""
    out = {}
    for name, d in deltas.items():
        a, b = lora_factors(d, rank)
        out[name] = b @ a
    return out


def applied(target, updates: dict, scale: float):
    """A copy of the target (Llama: weights [out, in]) with scale · update added."""
    m = copy.deepcopy(target)
    with torch.no_grad():
        for name, d in updates.items():
            w = m.get_submodule(name).weight
            w.add_((scale * d).to(w.dtype))
    return m


def noisy_like(source, ft, seed):
    """source + a random update with the norm of ft − source in every block projection."""
    ft = ft if not hasattr(ft, "merge_and_unload") else copy.deepcopy(ft).merge_and_unload()
    out, g = copy.deepcopy(source), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (n, p), (_, q), (_, b) in zip(out.named_parameters(), ft.named_parameters(), source.named_parameters()):
            if p.dim() == 2 and ".h." in n:
                p.add_(torch.randn(p.shape, generator=g) * (q - b).norm() / p.numel() ** 0.5)
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


# ---- one task, one seed -----------------------------------------------------------------------

def choose(target, candidates, val):
    """candidates: {knobs: update dict (scale folded in)} -> (validation task loss, knobs, model) of the
    candidate with the lowest validation task loss."""
    best = None
    for knobs, upd in candidates.items():
        m = applied(target, upd, 1.0)
        v = lm_metrics(m, val)[0]
        if best is None or v < best[0]:
            best = (v, knobs, m)
    return best


def grid(deltas_list, ranks, scales, weights=None):
    """{(rank, scale): Σ_k weights_k · scale · (B A)_k} over the grid: the adapters of several deltas
    averaged (weights default to equal) after each is truncated to rank r."""
    weights = weights or [1.0 / len(deltas_list)] * len(deltas_list)
    out = {}
    for r in ranks:
        lows = [low_rank(d, r) for d in deltas_list]
        names = set().union(*lows)
        for s in scales:
            out[(r, s)] = {n: sum(w * s * lo[n] for w, lo in zip(weights, lows) if n in lo) for n in names}
    return out


def run_task(a, seed, task, target, source, experts, other, calib, data, gen_test):
    """rows {name: (test task loss, test general loss, knobs)} for one task and seed."""
    _, val, test = data
    full, lora = experts
    val, test = val[:a.val], test[:a.test]
    rows = {}

    def fused(srcs, **kw):
        return hm.fuse(target, [(source, s) for s in srcs], calib, rank=max(a.ranks), **kw)

    def report_row(name, model, knobs=None):
        rows[name] = (lm_metrics(model, test)[0], lm_metrics(model, gen_test)[0], knobs)

    def pick(name, deltas_list):
        _, knobs, m = choose(target, grid(deltas_list, a.ranks, a.scales), val)
        report_row(name, m, knobs)

    def pick_fusion(name, srcs, temperatures, densities):
        best = None
        for t, d in itertools.product(temperatures, densities):
            res = fused(srcs, temperature=t, density=d)
            cand = {(r, s, t, d): u for (r, s), u in grid([res.deltas], a.ranks, a.scales).items()}
            v, knobs, m = choose(target, cand, val)
            if best is None or v < best[0]:
                best = (v, knobs, m, res)
        report_row(name, best[2], best[1])
        return best[3]

    report_row("target before", target)
    t_full, t_lora = fused([full]), fused([lora])
    pick("+ transfer of the full fine-tune", [t_full.deltas])
    pick("+ transfer of the LoRA expert", [t_lora.deltas])
    pick("+ transfer of the full fine-tune, blocks by CKA", [fused([full], blocks="cka").deltas])
    pick("+ naive copy by position (full fine-tune)", [naive_deltas(target, source, full)])
    pick("+ average of the 2 transferred adapters", [t_full.deltas, t_lora.deltas])
    temps, dens = a.temperatures, a.densities
    pick_fusion("+ fusion of the 2 experts (denoised)", [full, lora], temps, dens)
    noise = noisy_like(source, full, 100 + seed)
    t_noise = fused([noise])
    pick("noisy: average of adapters (2 experts + random)", [t_full.deltas, t_lora.deltas, t_noise.deltas])
    res = pick_fusion("noisy: fusion (2 experts + random)", [full, lora, noise], temps, dens)
    weights = {"random": [round(x, 3) for x in res.weights.tolist()],
               "cka pairs": fused([full], blocks="cka").pairs[0]}
    t_other = fused([other])
    pick("conflict: average of adapters (2 experts + other task)", [t_full.deltas, t_lora.deltas, t_other.deltas])
    res = pick_fusion("conflict: fusion (2 experts + other task)", [full, lora, other], temps, dens)
    weights["other task"] = [round(x, 3) for x in res.weights.tolist()]
    report_row("ensemble: target and full expert", Ensemble(target, full))
    for name, m in [("source base", source), ("source full fine-tune", full), ("source LoRA expert", lora)]:
        report_row(name, m)
    return rows, weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2, help="repeats (pretraining and fine-tuning seeds)")
    ap.add_argument("--tasks", nargs="+", default=["upper", "prose", "add"], choices=["upper", "prose", "add", "sort"])
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps of each family")
    ap.add_argument("--task-steps", type=int, default=120, help="task fine-tuning steps of each source expert")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8], help="adapter ranks tried on validation")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                    help="adapter scales tried on validation")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--calib", type=int, default=32, help="calibration windows (of 64 general tokens)")
    ap.add_argument("--val", type=int, default=48, help="validation windows per task")
    ap.add_argument("--test", type=int, default=200, help="test windows per task")
    a = ap.parse_args()
    if len(a.tasks) < 2:
        ap.error("--tasks: at least 2 (another task's expert is the conflicting source)")
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    general = stdlib_corpus(SEQ)[:3]
    gen_test = general[2][:a.test]
    data = {t: task_data(t, general) for t in a.tasks}
    results = {t: [] for t in a.tasks}     # task -> [rows per seed]
    notes = []
    for seed in range(a.seeds):
        target = train(llama(10 * seed, hidden=48, heads=3, layers=2), batches_of(general[0]), a.steps, 3e-3, 10 * seed)
        source = train(gpt2(10 * seed + 1), batches_of(general[0]), a.steps, 3e-3, 10 * seed + 1)
        calib = general[0][-a.calib:, :-1]        # general text, not any task
        experts = {}
        for k, t in enumerate(a.tasks):
            s = 10 * seed + 2 + k
            full = train(copy.deepcopy(source), batches_of(data[t][0]), a.task_steps, 3e-4, s)
            lora = train(lora_of(source), batches_of(data[t][0]), a.task_steps, 3e-3, s)
            experts[t] = (full, lora)
        for k, t in enumerate(a.tasks):
            other = experts[a.tasks[(k + 1) % len(a.tasks)]][0]
            rows, weights = run_task(a, seed, t, target, source, experts[t], other, calib, data[t], gen_test)
            results[t].append(rows)
            notes.append(f"seed {seed} {t}: fusion weights (full, LoRA, extra) with a random source "
                         f"{weights['random']}, with another task's expert {weights['other task']}; "
                         f"blocks by CKA {weights['cka pairs']} (relative depth {{0: 0, 1: 2}})")
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    report(a, results, notes, time.perf_counter() - t_start)
    return 0


def report(a, results, notes, seconds):
    print(f"\nHeteroFusion bench: target Llama d48 h3 L2, source GPT-2 d64 h4 L3, byte-level; {a.steps} "
          f"pretraining steps each, {a.task_steps} task steps per expert (full: lr 3e-4; LoRA r8: lr 3e-3); "
          f"calibration {a.calib}x64 general tokens; {a.seeds} seeds; knobs from ranks {a.ranks} x scales "
          f"{a.scales} (fusions also temperatures {a.temperatures} x densities {a.densities}) chosen on "
          f"{a.val} validation windows; test on {a.test} windows; {seconds:.0f} s\n")
    seeds = " / ".join(f"s{k}" for k in range(a.seeds))
    print(f"| task | model | test task loss ({seeds}) | mean | general loss (mean) | knobs (r, scale[, T, density]) |")
    print("|---|---|---|---:|---:|---|")
    for t, per_seed in results.items():
        for name in per_seed[0]:
            task = [r[name][0] for r in per_seed]
            gen = [r[name][1] for r in per_seed]
            knobs = "; ".join(str(r[name][2]) for r in per_seed if r[name][2] is not None)
            print(f"| {t} | {name} | {' / '.join(f'{x:.3f}' for x in task)} | {statistics.mean(task):.3f} | "
                  f"{statistics.mean(gen):.3f} | {knobs} |")
    print()
    for n in notes:
        print(n)
    print()
    mean = {t: {name: statistics.mean(r[name][0] for r in rs) for name in rs[0]} for t, rs in results.items()}
    for name in ("+ transfer of the full fine-tune", "+ transfer of the LoRA expert",
                 "+ fusion of the 2 experts (denoised)"):
        worse = [t for t in mean if mean[t][name] >= mean[t]["target before"]]
        print(f"{name}: no gain over the target (mean test loss) on {len(worse)}/{len(mean)} tasks {worse}; "
              f"gain per seed on {sum(r[name][0] < r['target before'][0] for rs in results.values() for r in rs)}"
              f"/{sum(len(rs) for rs in results.values())} task-seeds")
    for ref in ("+ naive copy by position (full fine-tune)", "+ average of the 2 transferred adapters",
                "ensemble: target and full expert"):
        lost = [t for t in mean if mean[t]["+ fusion of the 2 experts (denoised)"] >= mean[t][ref]]
        print(f"fusion of the 2 experts not better than '{ref}' on {lost}")
    for kind in ("noisy", "conflict"):
        extra = "random" if kind == "noisy" else "other task"
        lost = [t for t in mean if mean[t][f"{kind}: fusion (2 experts + {extra})"]
                >= mean[t][f"{kind}: average of adapters (2 experts + {extra})"]]
        print(f"{kind}: fusion not better than the average of adapters on {lost}")


if __name__ == "__main__":
    raise SystemExit(main())
