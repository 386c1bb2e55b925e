"""permute_pad, interpolate and weighted_sum: ours vs the obvious torch code and a copy roofline.

Cases follow issue 2: square base of width w against a target of 2x and 1/2x its width, K = 11 λ.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hetmerge import ops

from common import best_time

K_LAMBDAS = 11


def _maps(n_base: int, n_target: int, rng: np.random.Generator) -> torch.Tensor:
    """Base-sized map: a random injection of target units, -1 where the base is wider."""
    src = np.full(n_base, -1, dtype=np.int64)
    n = min(n_base, n_target)
    src[rng.choice(n_base, n, replace=False)] = rng.choice(n_target, n, replace=False)
    return torch.from_numpy(src)


def torch_permute_pad(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """F.pad one zero row/column, send -1 there, then two index_selects."""
    padded = F.pad(w, (0, 1, 0, 1))
    r = torch.where(rows < 0, w.shape[0], rows)
    c = torch.where(cols < 0, w.shape[1], cols)
    return padded.index_select(0, r).index_select(1, c)


def torch_interpolate(a, b, lambdas, rows, cols) -> torch.Tensor:
    bt = torch_permute_pad(b, rows, cols)
    return torch.stack([torch.lerp(a, bt, float(lam)) for lam in lambdas])


def copy_bandwidth(nbytes: int, repeat: int) -> float:
    """Bytes/s of torch's copy between two preallocated buffers (read + write counted)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeat)
    return 2 * nbytes / t


def run(widths, repeat: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    lambdas = np.linspace(0, 1, K_LAMBDAS)
    rows_out = []
    for w in widths:
        for ratio_name, n_target in (("base 2x target", w // 2), ("base 1/2x target", 2 * w)):
            a = torch.randn(w, w)
            b = torch.randn(n_target, n_target)
            rows, cols = _maps(w, n_target, rng), _maps(w, n_target, rng)
            elem = a.element_size()

            # permute_pad
            ref = best_time(lambda: torch_permute_pad(b, rows, cols), repeat)
            ours = best_time(lambda: ops.permute_pad(b, rows, cols), repeat)
            pp_out = torch.empty(w, w)
            ours_out = best_time(lambda: ops.permute_pad(b, rows, cols, out=pp_out), repeat)
            assert torch.equal(ops.permute_pad(b, rows, cols), torch_permute_pad(b, rows, cols))
            rows_out.append(dict(primitive="permute_pad", case=ratio_name, width=w, torch_s=ref, ours_s=ours,
                                 ours_out_s=ours_out, speedup=ref / ours, speedup_out=ref / ours_out))

            # interpolate, K = 11
            moved = (2 + K_LAMBDAS) * a.numel() * elem  # read a and b~, write K planes
            bw = copy_bandwidth(min(moved, 1 << 30), repeat)
            ref = best_time(lambda: torch_interpolate(a, b, lambdas, rows, cols), max(1, repeat - 1))
            ours = best_time(lambda: ops.interpolate(a, b, lambdas, rows, cols), repeat)
            out = torch.empty(K_LAMBDAS, w, w)
            ours_out = best_time(lambda: ops.interpolate(a, b, lambdas, rows, cols, out=out), repeat)
            torch.testing.assert_close(out, torch_interpolate(a, b, lambdas, rows, cols))
            rows_out.append(dict(primitive="interpolate", case=ratio_name, width=w, torch_s=ref, ours_s=ours,
                                 ours_out_s=ours_out, speedup=ref / ours, speedup_out=ref / ours_out,
                                 gbps_out=moved / ours_out / 1e9, frac_copy_bw=moved / ours_out / bw))
            del out, pp_out

        # weighted_sum: a 3-model soup evaluated at 4 coefficient rows
        xs = [torch.randn(w, w) for _ in range(3)]
        coeffs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [1, -1, 1]], dtype=torch.float64)
        ref_fn = lambda: torch.stack([sum(float(c) * x for c, x in zip(row, xs)) for row in coeffs])  # noqa: E731
        ref = best_time(ref_fn, repeat)
        ours = best_time(lambda: ops.weighted_sum(xs, coeffs), repeat)
        out = torch.empty(4, w, w)
        ours_out = best_time(lambda: ops.weighted_sum(xs, coeffs, out=out), repeat)
        rows_out.append(dict(primitive="weighted_sum", case="T=3, K=4", width=w, torch_s=ref, ours_s=ours,
                             ours_out_s=ours_out, speedup=ref / ours, speedup_out=ref / ours_out))
    return rows_out
