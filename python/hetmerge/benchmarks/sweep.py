"""hm.sweep (K merging factors in one batched evaluation) vs per-λ loops, ratios in one process.

Case (default): digits MLP 64 -> 256 -> 256 -> 10, base and target of the same shape (seeded random
weights: the time does not depend on training), 25 λ, the 1,797 sklearn digits tiled to 9,000
samples. For `hetmerge bench --widths`, the hidden width is w and the sample count shrinks as
(256 / w)^2 (at least 256) so that every width costs about the same.
References, each giving the same loss and accuracy per λ:
  lean loop        for each λ: hm.merge(base, target, res, lam), one forward over all samples
  functional loop  target aligned once, then for each λ a merged state dict through
                   torch.func.functional_call (no module copies), one forward over all samples
  heavy loop       for each λ: hm.merge, then a DataLoader evaluation in batches of 256
ratio_vs_* = reference time / ours (higher is better). All sides run on the same threads (thr).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .common import best_times, print_table, set_threads, threads


def digits_data(n: int = 9000) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 sklearn digits (64 features), tiled to n samples."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    reps = -(-n // len(X))
    return X.repeat(reps, 1)[:n].contiguous(), y.repeat(reps)[:n].contiguous()


def _scores(out, y):
    return F.cross_entropy(out, y).item(), (out.argmax(-1) == y).float().mean().item()


@torch.no_grad()
def lean_loop(base, target, res, lambdas, X, y):
    import hetmerge as hm

    loss, acc = [], []
    for lam in lambdas.tolist():
        lo, ac = _scores(hm.merge(base, target, res, lam=lam)(X), y)
        loss.append(lo)
        acc.append(ac)
    return torch.tensor(loss), torch.tensor(acc)


@torch.no_grad()
def functional_loop(base, target, res, lambdas, X, y):
    import hetmerge as hm
    from hetmerge.merging import resolve
    from hetmerge.maps import transform, viewed

    pairing, maps = resolve(base, target, res)
    sa, sb = base.state_dict(), target.state_dict()
    aligned = {}
    for pp in pairing.params:
        rows, cols = transform(pp, maps)
        # in the view the maps refer to (cls tokens / position embeddings), stored back as the base's
        aligned[pp.base_key] = hm.ops.permute_pad(viewed(sb[pp.target_key], pp.target_view), rows, cols).reshape(sa[pp.base_key].shape)
    loss, acc = [], []
    for lam in lambdas.tolist():
        sd = dict(sa)
        for k, b in aligned.items():
            sd[k] = torch.lerp(sa[k], b, lam)
        lo, ac = _scores(functional_call(base, sd, (X,)), y)
        loss.append(lo)
        acc.append(ac)
    return torch.tensor(loss), torch.tensor(acc)


@torch.no_grad()
def heavy_loop(base, target, res, lambdas, X, y, batch_size: int = 256):
    import hetmerge as hm

    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch_size)
    loss, acc = [], []
    for lam in lambdas.tolist():
        m = hm.merge(base, target, res, lam=lam)
        tot, correct = 0.0, 0
        for xb, yb in dl:
            out = m(xb)
            tot += F.cross_entropy(out, yb, reduction="sum").item()
            correct += int((out.argmax(-1) == yb).sum())
        loss.append(tot / len(X))
        acc.append(correct / len(X))
    return torch.tensor(loss), torch.tensor(acc)


def bench_case(width: int = 256, n_samples: int = 9000, K: int = 25, repeat: int = 3,
               heavy: bool = True, seed: int = 0) -> dict:
    import hetmerge as hm
    from hetmerge import models as hmm

    X, y = digits_data(n_samples)
    torch.manual_seed(seed)
    base = hmm.mlp(64, [width, width], 10).eval()
    target = hmm.mlp(64, [width, width], 10).eval()
    res = hm.align(base, target, seed=seed)
    lams = torch.linspace(0, 1, K)
    fns = {"ours": lambda: hm.sweep(base, target, res, lams, data=(X, y)),
           "lean": lambda: lean_loop(base, target, res, lams, X, y),
           "functional": lambda: functional_loop(base, target, res, lams, X, y)}
    if heavy:
        fns["heavy"] = lambda: heavy_loop(base, target, res, lams, X, y)
    t = best_times(fns, repeat)
    curve = fns["ours"]()
    loss, acc = lean_loop(base, target, res, lams, X, y)
    thr_hm, thr_torch = threads()
    row = {"primitive": "sweep", "case": f"digits MLP 64-{width}-{width}-10, {K} λ, {n_samples} samples",
           "width": width, "ours_s": t["ours"], "lean_loop_s": t["lean"],
           "functional_loop_s": t["functional"]}
    if heavy:
        row["heavy_loop_s"] = t["heavy"]
    row.update({"ratio_vs_lean": t["lean"] / t["ours"], "ratio_vs_functional": t["functional"] / t["ours"]})
    if heavy:
        row["ratio_vs_heavy"] = t["heavy"] / t["ours"]
    row.update({"thr": f"{thr_torch} torch / {thr_hm} hm (all sides)",
                "max_loss_diff": float((curve.loss - loss).abs().max()),
                "same_acc": bool(torch.allclose(curve.acc, acc, atol=0.5 / n_samples))})
    return row


def run(widths, repeat: int = 3) -> list[dict]:
    """One row per hidden width (the DataLoader loop left out: it only adds time at large widths)."""
    return [bench_case(w, max(256, min(9000, int(9000 * (256 / w) ** 2))), repeat=repeat, heavy=False)
            for w in widths]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--samples", type=int, default=9000)
    p.add_argument("--lambdas", type=int, default=25)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch and hetmerge threads (default: torch's)")
    p.add_argument("--no-heavy", action="store_true", help="skip the DataLoader loop")
    args = p.parse_args(argv)
    set_threads(args.threads)
    row = bench_case(args.width, args.samples, args.lambdas, args.repeat, heavy=not args.no_heavy)
    print_table("hm.sweep vs per-λ loops (seconds best of repeat, interleaved; ratio = loop / sweep)", [row],
                [c for c in row if c not in ("primitive",)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
