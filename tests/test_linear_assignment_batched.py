"""ops.linear_assignment_batched: every matrix of a batch solved as scipy solves it alone (totals equal,
any strides and dtypes, both directions), and bad batches refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import hetmerge as hm
from hetmerge import ops


def _totals(cost: np.ndarray, rows, cols) -> np.ndarray:
    return np.array([cost[b][rows[b], cols[b]].sum() for b in range(cost.shape[0])])


@pytest.mark.parametrize("shape", [(7, 5, 5), (4, 3, 8), (4, 8, 3), (1, 1, 1), (33, 16, 16)])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_each_matrix_is_solved_like_scipy(shape, maximize, dtype, threads):
    g = torch.Generator().manual_seed(sum(shape) + maximize)
    cost = torch.randn(shape, generator=g, dtype=dtype)
    before = hm.get_num_threads()
    hm.set_num_threads(threads)
    try:
        rows, cols = ops.linear_assignment_batched(cost, maximize=maximize)
    finally:
        hm.set_num_threads(before)
    k = min(shape[1], shape[2])
    assert rows.shape == cols.shape == (shape[0], k) and rows.dtype == torch.int64
    c = cost.double().numpy()
    want = np.array([c[b][linear_sum_assignment(c[b], maximize=maximize)].sum() for b in range(shape[0])])
    np.testing.assert_allclose(_totals(c, rows.numpy(), cols.numpy()), want, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    for b in range(shape[0]):     # a valid assignment: rows sorted and distinct, columns distinct
        assert torch.equal(rows[b], torch.sort(rows[b]).values) and len(set(cols[b].tolist())) == k


def test_strided_and_numpy_batches():
    """The per-head blocks of a cost matrix as a permuted view (no copy needed by the caller), and
    numpy input giving numpy output."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * 4, 2 * 5, generator=g)
    blocks = big.reshape(3, 4, 2, 5).permute(0, 2, 1, 3)[:, 1]       # [3, 4, 5], strided
    rows, cols = ops.linear_assignment_batched(blocks, maximize=True)
    for b in range(3):
        r, c = linear_sum_assignment(blocks[b].numpy(), maximize=True)
        assert blocks[b][rows[b], cols[b]].sum() == pytest.approx(float(blocks[b].numpy()[r, c].sum()), rel=1e-6)
    rn, cn = ops.linear_assignment_batched(blocks.numpy().astype(np.float64))
    assert isinstance(rn, np.ndarray) and rn.dtype == np.int64 and rn.shape == (3, 4)


def test_empty_batches():
    r, c = ops.linear_assignment_batched(torch.zeros(0, 3, 4))
    assert r.shape == c.shape == (0, 3)
    r, c = ops.linear_assignment_batched(torch.zeros(2, 0, 4))
    assert r.shape == (2, 0)


def test_bad_batches_are_refused_by_name():
    with pytest.raises(ValueError, match="linear_assignment_batched: cost must be 3-D"):
        ops.linear_assignment_batched(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="infeasible|no finite assignment"):
        bad = torch.zeros(2, 2, 2)
        bad[1] = float("inf")
        ops.linear_assignment_batched(bad)
    with pytest.raises(ValueError, match="NaN|nan"):
        bad = torch.zeros(2, 2, 2)
        bad[0, 1, 1] = float("nan")
        ops.linear_assignment_batched(bad)
    with pytest.raises(TypeError, match="cost"):
        ops.linear_assignment_batched(torch.zeros(2, 2, 2, dtype=torch.complex64))
