"""One weight-matching sweep over Llama-7B-shaped layers: hetmerge vs a torch + scipy reference of the
same sweep.

    PYTHONPATH=python python bench/bench_llama_align.py [--layers 2] [--dtype bfloat16] [--threads 2]

Two random Llama-shaped states (hidden 4096, MLP 11008, 32 heads × 128, vocabulary 32000, `--layers`
blocks) are paired by `transformer_spec` (residual stream, heads, MLP units). For every free link,
in one fixed order, both sides compute the link's cost given the other links' current maps and
solve it:
  hetmerge   ops.cost_matrix on the tensors as stored (16-bit read directly, float32 accumulation;
             the neighbours' maps applied inside the kernel, padding never materialized) + ops.linear_assignment
  reference  the fastest plain code a user would write: each term's B gathered along its inner axis
             with the neighbour's map (torch.index_select on a float32 copy), one torch.mm per term
             (`out=` into one buffer), then scipy.optimize.linear_sum_assignment(maximize=True)
Attention heads are one step per block (a tie: the qk link, whose units are RoPE heads, and the vo
link, whose units are V dimensions): both sides solve one assignment per (base head, target head)
block of the vo cost, then one over heads (hetmerge.heads.solve_tie; the reference the same
algorithm with scipy, written out here). Both start from identity maps; the solutions are compared
(equal costs give equal assignments up to ties). Reported: time per step and per sweep, and peak
RSS of the process.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn as nn

import hetmerge as hm
from hetmerge import ops
from hetmerge.heads import solve_tie
from hetmerge.maps import expand_map
from hetmerge.methods.weight import WeightMatching
from hetmerge.pairing import pair_specs
from hetmerge.transformer_spec import layer_map_by_name, transformer_spec


def llama_state(layers: int, dtype, seed: int, hidden=4096, inter=11008, vocab=32000) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (0.02 * torch.randn(shape, generator=g)).to(dtype)
    s = {"model.embed_tokens.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            s[f"{p}self_attn.{n}_proj.weight"] = r(hidden, hidden)
        s[f"{p}mlp.gate_proj.weight"] = r(inter, hidden)
        s[f"{p}mlp.up_proj.weight"] = r(inter, hidden)
        s[f"{p}mlp.down_proj.weight"] = r(hidden, inter)
        s[f"{p}input_layernorm.weight"] = 1 + r(hidden)
        s[f"{p}post_attention_layernorm.weight"] = 1 + r(hidden)
    s["model.norm.weight"] = 1 + r(hidden)
    s["lm_head.weight"] = r(vocab, hidden)
    return s


class Weights(nn.Module):
    """hm.align reads only state dicts: a plain {key: tensor} as a module."""

    def __init__(self, state):
        super().__init__()
        self._state = state

    def state_dict(self, *args, keep_vars=False, **kwargs):
        return dict(self._state)


def reference_cost(terms, maps) -> torch.Tensor:
    C = None
    for av, bv, _, other, blk in terms:
        b = bv.float()
        if other is not None:
            m = expand_map(maps[other], blk)
            b = torch.cat([b, torch.zeros(b.shape[0], 1)], 1)          # column of zeros for -1
            b = torch.index_select(b, 1, torch.where(m >= 0, m, b.shape[1] - 1))
        part = av.float() @ b.T
        C = part if C is None else C.add_(part)
    return C


def reference_tie(tie, costs) -> dict:
    """The structured head solve with scipy: per head pair an assignment inside the heads, then one
    over heads on the summed optima."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    Ha, Hb = tie.heads_a, tie.heads_b
    score = np.zeros((Ha, Hb))
    inner = {}
    for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b):
        C = costs[ln].double().numpy().reshape(Ha, ua, Hb, ub)
        if ua == ub == 1:
            score += C[:, 0, :, 0]
            continue
        sub = np.full((Ha, Hb, ua), -1)
        for i in range(Ha):
            for j in range(Hb):
                r, c = linear_sum_assignment(C[i, :, j, :], maximize=True)
                sub[i, j, r] = c
                score[i, j] += C[i, r, j, c].sum()
        inner[ln] = sub
    hr, hc = linear_sum_assignment(score, maximize=True)
    head = np.full(Ha, -1)
    head[hr] = hc
    out = {}
    for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b):
        m = np.full((Ha, ua), -1)
        for i in range(Ha):
            if head[i] >= 0:
                m[i] = head[i] * ub + (inner[ln][i, head[i]] if ln in inner else np.arange(ua))
        out[ln] = torch.as_tensor(m.reshape(-1), dtype=torch.long)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from scipy.optimize import linear_sum_assignment

    torch.set_num_threads(args.threads)
    hm.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    sa, sb = llama_state(args.layers, dtype, 0), llama_state(args.layers, dtype, 1)
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
           "head_dim": 128}
    spa, spb = transformer_spec(sa, cfg), transformer_spec(sb, cfg)
    pairing = pair_specs(Weights(sa), Weights(sb), spa, spb, layer_map_by_name(spa, spb))
    wm = WeightMatching(pairing, sa, sb, incremental=False)
    links = [n for n, link in pairing.links.items() if link.free]
    print(f"{args.layers} Llama-7B-shaped blocks, {args.dtype}, {sum(t.numel() for t in sa.values()) / 1e9:.2f}B "
          f"parameters per model (made in {time.perf_counter() - t0:.0f} s); threads: torch {torch.get_num_threads()}, "
          f"hetmerge {hm.get_num_threads()}; links {[(n, pairing.links[n].n_a) for n in links]}")
    ours_maps = {n: torch.arange(link.n_a) for n, link in pairing.links.items()}
    ref_maps = {n: m.clone() for n, m in ours_maps.items()}
    print("| step | units | hetmerge cost s | hetmerge solve s | reference cost s | reference solve s | same map |")
    print("|---|---|---|---|---|---|---|")
    tot_o = tot_r = 0.0
    steps, seen = [], set()
    for n in links:
        tie = pairing.tie_of(n)
        if tie is None:
            steps.append((n, None))
        elif tie.name not in seen:
            seen.add(tie.name)
            steps.append((tie.name, tie))
    for name, tie in steps:
        group = tie.links if tie is not None else (name,)
        t0 = time.perf_counter()
        costs = {n: wm.cost(n, ours_maps) for n in group}
        t1 = time.perf_counter()
        if tie is None:
            row, col = ops.linear_assignment(costs[name], maximize=True)
            new = {name: torch.full((costs[name].shape[0],), -1, dtype=torch.long)}
            new[name][torch.as_tensor(row)] = torch.as_tensor(col, dtype=torch.long)
        else:
            new = solve_tie(tie, costs)
        t2 = time.perf_counter()
        t3 = time.perf_counter()
        ref_costs = {n: reference_cost(wm.terms[n], ref_maps) for n in group}
        t4 = time.perf_counter()
        if tie is None:
            rr, cr = linear_sum_assignment(ref_costs[name].numpy(), maximize=True)
            ref = {name: torch.full((ref_costs[name].shape[0],), -1, dtype=torch.long)}
            ref[name][torch.as_tensor(rr)] = torch.as_tensor(cr, dtype=torch.long)
        else:
            ref = reference_tie(tie, ref_costs)
        t5 = time.perf_counter()
        same = sum(float((new[n] == ref[n]).float().sum()) for n in group) / sum(len(new[n]) for n in group)
        ours_maps.update(new)
        ref_maps.update(ref)
        tot_o += t2 - t0
        tot_r += t5 - t3
        units = "+".join(str(len(new[n])) for n in group)
        print(f"| {name} | {units} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t4 - t3:.2f} | {t5 - t4:.2f} | {same:.0%} |",
              flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\none sweep: hetmerge {tot_o:.1f} s, reference {tot_r:.1f} s ({tot_r / tot_o:.2f}× faster); peak RSS "
          f"{rss:.0f} MiB (both models {2 * sum(t.numel() * t.element_size() for t in sa.values()) / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
