import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge import ops
from reference import weighted_sum_ref
from strategies import FLOAT_DTYPES, LAYOUTS, TOL, randn, strided


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 2), (2000,), (3, 1500)])
def test_matches_reference(dtype, layout, shape):
    ts = [strided(randn(shape, dtype), layout) for _ in range(3)]
    coeffs = np.array([[0.5, 0.25, 0.25], [1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    out = ops.weighted_sum(ts, coeffs)
    assert out.shape == (3, *shape) and out.is_contiguous()
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, weighted_sum_ref(ts, coeffs), **tol)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 4), t=st.integers(1, 4), n=st.integers(0, 9), seed=st.integers(0, 1000))
def test_random_coefficients_hypothesis(k, t, n, seed):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for _ in range(t)]
    coeffs = torch.randn(k, t, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ops.weighted_sum(ts, coeffs), weighted_sum_ref(ts, coeffs.numpy()))


def test_single_row_of_coefficients_and_scalar_tensors():
    ts = [torch.tensor(2.0), torch.tensor(3.0)]
    torch.testing.assert_close(ops.weighted_sum(ts, [0.5, 1.0]), torch.tensor([4.0]))


def test_numpy_and_out():
    ts = [np.ones((2, 2)), np.full((2, 2), 2.0)]
    out = np.empty((1, 2, 2))
    assert ops.weighted_sum(ts, [[1.0, 1.0]], out=out) is out
    np.testing.assert_array_equal(out, np.full((1, 2, 2), 3.0))


@pytest.mark.parametrize(
    "tensors,coeffs,exc,match",
    [
        ([], [[1.0]], ValueError, "tensors must not be empty"),
        ([torch.ones(2), torch.ones(3)], [[1, 1]], ValueError, r"tensors\[1\] has shape \(3,\) but tensors\[0\] has shape \(2,\)"),
        ([torch.ones(2), torch.ones(2)], [[1, 1, 1]], ValueError, r"coeffs must have shape \(K, 2\)"),
        ([torch.ones(2), torch.ones(2).double()], [[1, 1]], TypeError, r"tensors\[1\] has dtype float64"),
        ([torch.ones(2)], [[float("nan")]], ValueError, "coeffs contains a non-finite value"),
        ([torch.ones(2, dtype=torch.int64)], [[1.0]], TypeError, r"tensors\[0\] must be float32"),
    ],
)
def test_errors(tensors, coeffs, exc, match):
    with pytest.raises(exc, match=match):
        ops.weighted_sum(tensors, coeffs)
