"""permute_pad, interpolate and weighted_sum: ours vs the fastest plain torch code, and a copy roofline.

Cases: a square base of width w against a target of 2x and 1/2x its width, K = 11 λ; a 3-model soup
at 4 coefficient rows. Both sides write into the same preallocated output (out=), and the torch
references reuse preallocated intermediates too:
  permute_pad   copy b into a zero-bordered buffer, index_select rows, index_select cols (out=)
  interpolate   the permute_pad above, then ONE broadcast torch.lerp over the K factors (out=)
  weighted_sum  ONE torch.mm of the [K, T] coefficients with the pre-stacked [T, numel] models
                (out=; the stacking is done beforehand and not timed, a head start for torch)
Columns: torch_s, ours_s (best of repeat, interleaved); speedup = torch / ours (higher is better);
ours_thr / torch_thr: threads each side ran with; gbps = bytes moved / ours_s; frac_copy_bw = that
over torch's copy bandwidth between two preallocated buffers.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .common import best_time, best_times, threads

K_LAMBDAS = 11


def _maps(n_base: int, n_target: int, rng: np.random.Generator) -> torch.Tensor:
    """Base-sized map: a random injection of target units, -1 where the base is wider."""
    src = np.full(n_base, -1, dtype=np.int64)
    n = min(n_base, n_target)
    src[rng.choice(n_base, n, replace=False)] = rng.choice(n_target, n, replace=False)
    return torch.from_numpy(src)


class TorchPermutePad:
    """The fastest plain-torch padded gather we know: buffers allocated once, -1 sent to a zero
    border row/column, two index_selects (the second into the caller's out)."""

    def __init__(self, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        nb, mb = b.shape
        self.padded = torch.zeros(nb + 1, mb + 1, dtype=b.dtype, device=b.device)
        self.r = torch.where(rows < 0, nb, rows).to(b.device)
        self.c = torch.where(cols < 0, mb, cols).to(b.device)
        self.tmp = torch.empty(len(rows), mb + 1, dtype=b.dtype, device=b.device)
        self.nb, self.mb = nb, mb

    def __call__(self, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.padded[: self.nb, : self.mb].copy_(b)
        torch.index_select(self.padded, 0, self.r, out=self.tmp)
        return torch.index_select(self.tmp, 1, self.c, out=out)


def copy_bandwidth(nbytes: int, repeat: int) -> float:
    """Bytes/s of torch's copy between two preallocated buffers (read + write counted)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeat)
    return 2 * nbytes / t


def run(widths, repeat: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    lambdas = np.linspace(0, 1, K_LAMBDAS)
    lam_t = torch.tensor(lambdas, dtype=torch.float32).view(K_LAMBDAS, 1, 1)
    ours_thr, torch_thr = threads()
    rows_out = []
    for w in widths:
        for ratio_name, n_target in (("base 2x target", w // 2), ("base 1/2x target", 2 * w)):
            a = torch.randn(w, w)
            b = torch.randn(n_target, n_target)
            rows, cols = _maps(w, n_target, rng), _maps(w, n_target, rng)
            elem = a.element_size()
            ref_pp = TorchPermutePad(b, rows, cols)

            # permute_pad: read w·w gathered, write w·w
            out = torch.empty(w, w)
            t = best_times({"torch": lambda: ref_pp(b, out),
                            "ours": lambda: ops.permute_pad(b, rows, cols, out=out)}, repeat)
            want = ref_pp(b, torch.empty(w, w))
            assert torch.equal(ops.permute_pad(b, rows, cols, out=out), want)
            moved = 2 * w * w * elem
            rows_out.append(dict(primitive="permute_pad", case=ratio_name, width=w, torch_s=t["torch"],
                                 ours_s=t["ours"], speedup=t["torch"] / t["ours"], ours_thr=ours_thr,
                                 torch_thr=torch_thr, gbps=moved / t["ours"] / 1e9))

            # interpolate, K factors: read a and b~, write K planes
            bt = torch.empty(w, w)
            outk = torch.empty(K_LAMBDAS, w, w)

            def torch_interp():
                ref_pp(b, bt)
                return torch.lerp(a.unsqueeze(0), bt.unsqueeze(0), lam_t, out=outk)

            moved = (2 + K_LAMBDAS) * w * w * elem
            bw = copy_bandwidth(min(moved, 1 << 30), repeat)
            t = best_times({"torch": torch_interp,
                            "ours": lambda: ops.interpolate(a, b, lambdas, rows, cols, out=outk)}, repeat)
            want = torch_interp().clone()
            torch.testing.assert_close(ops.interpolate(a, b, lambdas, rows, cols, out=outk), want)
            rows_out.append(dict(primitive="interpolate", case=ratio_name, width=w, torch_s=t["torch"],
                                 ours_s=t["ours"], speedup=t["torch"] / t["ours"], ours_thr=ours_thr,
                                 torch_thr=torch_thr, gbps=moved / t["ours"] / 1e9,
                                 frac_copy_bw=moved / t["ours"] / bw))
            del outk, want, bt, out, ref_pp

        # weighted_sum: a 3-model soup evaluated at 4 coefficient rows
        xs = [torch.randn(w, w) for _ in range(3)]
        coeffs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [1, -1, 1]])
        stacked = torch.stack(xs).view(3, -1)
        out = torch.empty(4, w, w)
        t = best_times({"torch": lambda: torch.mm(coeffs, stacked, out=out.view(4, -1)),
                        "ours": lambda: ops.weighted_sum(xs, coeffs, out=out)}, repeat)
        want = torch.mm(coeffs, stacked).view(4, w, w)
        torch.testing.assert_close(ops.weighted_sum(xs, coeffs, out=out), want)
        moved = (3 + 4) * w * w * 4
        rows_out.append(dict(primitive="weighted_sum", case="T=3, K=4", width=w, torch_s=t["torch"],
                             ours_s=t["ours"], speedup=t["torch"] / t["ours"], ours_thr=ours_thr,
                             torch_thr=torch_thr, gbps=moved / t["ours"] / 1e9))
    return rows_out
