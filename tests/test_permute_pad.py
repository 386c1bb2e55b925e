import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge import ops
from reference import permute_pad_ref
from strategies import FLOAT_DTYPES, LAYOUTS, index_maps, random_map, randn, strided


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,m0,m1", [((7, 5), 9, 3), ((4, 6), 2, 8), ((5, 5), 5, 5), ((6, 3, 3, 2), 8, 2)])
def test_matches_reference(dtype, layout, shape, m0, m1):
    rng = np.random.default_rng(0)
    w = strided(randn(shape, dtype), layout)
    rows, cols = random_map(rng, m0, shape[0]), random_map(rng, m1, shape[1])
    out = ops.permute_pad(w, rows, cols)
    assert out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out, permute_pad_ref(w, rows, cols), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n0=st.integers(0, 6), n1=st.integers(0, 6), m0=st.integers(0, 8), m1=st.integers(0, 8))
def test_index_logic_hypothesis(data, n0, n1, m0, m1):
    rows = data.draw(index_maps(m0, n0))
    cols = data.draw(index_maps(m1, n1))
    w = torch.arange(n0 * n1, dtype=torch.float32).reshape(n0, n1) + 1
    out = ops.permute_pad(w, rows, cols)
    assert out.shape == (m0, m1)
    torch.testing.assert_close(out, permute_pad_ref(w, rows, cols), rtol=0, atol=0)


def test_one_d_and_identity():
    w = torch.randn(6)
    rows = np.array([5, -1, 0, 2, -1, 1, 3, 4])
    torch.testing.assert_close(ops.permute_pad(w, rows), permute_pad_ref(w, rows), rtol=0, atol=0)
    w2 = torch.randn(4, 3)
    torch.testing.assert_close(ops.permute_pad(w2, np.arange(4)), w2, rtol=0, atol=0)
    torch.testing.assert_close(ops.permute_pad(w2, None, np.arange(3)), w2, rtol=0, atol=0)


def test_cols_only_crop_and_trailing_strides():
    w = torch.randn(3, 5, 4).permute(2, 0, 1)  # [4, 3, 5] with scrambled strides
    w = w.permute(1, 2, 0)  # back to [3, 5, 4], non-contiguous trailing axis
    cols = np.array([4, 0])
    torch.testing.assert_close(ops.permute_pad(w, None, cols), permute_pad_ref(w, None, cols), rtol=0, atol=0)


def test_numpy_in_numpy_out():
    w = np.random.default_rng(1).standard_normal((6, 4)).T  # transposed view
    rows, cols = np.array([3, -1, 0]), np.array([1, 5, -1])
    out = ops.permute_pad(w, rows, cols)
    assert isinstance(out, np.ndarray) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, permute_pad_ref(w, rows, cols).numpy())


def test_out_buffer_is_reused():
    w = torch.randn(5, 4)
    out = torch.full((3, 4), 7.0)
    res = ops.permute_pad(w, [4, -1, 0], out=out)
    assert res is out
    torch.testing.assert_close(out, permute_pad_ref(w, [4, -1, 0]), rtol=0, atol=0)


def test_empty_maps():
    w = torch.randn(3, 4)
    assert ops.permute_pad(w, np.zeros(0, np.int64)).shape == (0, 4)
    assert ops.permute_pad(w, None, []).shape == (3, 0)
    torch.testing.assert_close(ops.permute_pad(w, [-1, -1]), torch.zeros(2, 4), rtol=0, atol=0)


def test_large_parallel_rows_match():
    rng = np.random.default_rng(3)
    w = torch.randn(300, 257)
    rows, cols = random_map(rng, 600, 300), random_map(rng, 129, 257)
    torch.testing.assert_close(ops.permute_pad(w, rows, cols), permute_pad_ref(w, rows, cols), rtol=0, atol=0)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda w: ops.permute_pad(w, [0, 5]), ValueError, r"rows\[1\] = 5 is out of range for w.shape\[0\] = 5"),
        (lambda w: ops.permute_pad(w, [0, -2]), ValueError, r"rows\[1\] = -2 is out of range"),
        (lambda w: ops.permute_pad(w, [1, 1]), ValueError, "rows repeats index 1"),
        (lambda w: ops.permute_pad(w, None, [0, 0]), ValueError, "cols repeats index 0"),
        (lambda w: ops.permute_pad(w, [[0, 1]]), ValueError, "rows must be 1-D"),
        (lambda w: ops.permute_pad(w, [0.5]), TypeError, "rows must be an integer index map"),
        (lambda w: ops.permute_pad(w[0], [0], [0]), ValueError, "cols must be None for a 1-D w"),
        (lambda w: ops.permute_pad(w.to(torch.int32), [0]), TypeError, "w must be float32"),
        (lambda w: ops.permute_pad(torch.tensor(1.0), [0]), ValueError, "at least 1 dimension"),
        (lambda w: ops.permute_pad(w, [0], out=torch.empty(2, 4)), ValueError, r"out must have shape \(1, 4\)"),
        (lambda w: ops.permute_pad(w, [0], out=torch.empty(1, 4, dtype=torch.float64)), TypeError, "out must be float32"),
        (lambda w: ops.permute_pad(w, [0], out=torch.empty(4, 2).T[:1]), ValueError, "out must be contiguous"),
        (lambda w: ops.permute_pad(w, [0, 1], out=w[:2]), ValueError, "out overlaps the memory of w"),
        (lambda w: ops.permute_pad(w, [0], out=np.empty((1, 4), np.float32)), TypeError, "out must be a Tensor"),
        (lambda w: ops.permute_pad([1.0, 2.0], [0]), TypeError, "w must be a torch.Tensor"),
    ],
)
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(5, 4))
