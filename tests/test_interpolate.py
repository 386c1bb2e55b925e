import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge import ops
from reference import interpolate_ref, permute_pad_ref
from strategies import FLOAT_DTYPES, LAYOUTS, TOL, index_maps, random_map, randn, strided

LAMBDAS = [0.0, 0.1, 0.35, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fill", ["zero", "base"])
@pytest.mark.parametrize("a_shape,b_shape", [((8, 6), (4, 9)), ((4, 6), (8, 3)), ((5, 5), (5, 5)), ((6, 4, 3, 3), (3, 7, 3, 3)), ((9,), (4,))])
def test_matches_reference(dtype, layout, fill, a_shape, b_shape):
    rng = np.random.default_rng(0)
    a = strided(randn(a_shape, dtype), layout)
    b = strided(randn(b_shape, dtype), layout)
    rows = random_map(rng, a_shape[0], b_shape[0])
    cols = random_map(rng, a_shape[1], b_shape[1]) if len(a_shape) > 1 else None
    out = ops.interpolate(a, b, LAMBDAS, rows, cols, fill=fill)
    assert out.shape == (len(LAMBDAS), *a_shape) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, interpolate_ref(a, b, LAMBDAS, rows, cols, fill), **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_endpoints_are_exact(dtype):
    """λ = 0 gives the base and λ = 1 the padded target, bit for bit (invariance tests rely on it)."""
    rng = np.random.default_rng(1)
    a, b = randn((7, 5), dtype), randn((4, 6), dtype)
    rows, cols = random_map(rng, 7, 4), random_map(rng, 5, 6)
    out = ops.interpolate(a, b, [0.0, 1.0], rows, cols)
    assert torch.equal(out[0], a)
    assert torch.equal(out[1], permute_pad_ref(b, rows, cols))


def test_fill_base_keeps_unpartnered_units():
    a, b = torch.randn(4, 3), torch.randn(2, 3)
    out = ops.interpolate(a, b, [0.7], rows=[-1, 0, -1, 1], fill="base")[0]
    torch.testing.assert_close(out[[0, 2]], a[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[1], 0.3 * a[1] + 0.7 * b[0])


@settings(max_examples=50, deadline=None)
@given(data=st.data(), n0=st.integers(1, 6), n1=st.integers(1, 6), m0=st.integers(0, 6), m1=st.integers(0, 6),
       k=st.integers(0, 4), fill=st.sampled_from(["zero", "base"]))
def test_index_logic_hypothesis(data, n0, n1, m0, m1, k, fill):
    rows = data.draw(index_maps(n0, m0))
    cols = data.draw(index_maps(n1, m1))
    lambdas = data.draw(st.lists(st.floats(-1, 2), min_size=k, max_size=k))
    a = torch.arange(n0 * n1, dtype=torch.float64).reshape(n0, n1) + 1
    b = -torch.arange(m0 * m1, dtype=torch.float64).reshape(m0, m1) - 1
    out = ops.interpolate(a, b, lambdas, rows, cols, fill=fill)
    torch.testing.assert_close(out, interpolate_ref(a, b, lambdas, rows, cols, fill), rtol=1e-12, atol=1e-12)


def test_no_maps_same_shape_and_numpy():
    a = np.random.default_rng(2).standard_normal((5, 4))
    b = np.random.default_rng(3).standard_normal((4, 5)).T
    out = ops.interpolate(a, b, np.array([0.25, 0.75]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, interpolate_ref(a, b, [0.25, 0.75]).numpy(), rtol=1e-12)


def test_zero_lambdas_and_out_reuse():
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    assert ops.interpolate(a, b, []).shape == (0, 3, 2)
    out = torch.empty(2, 3, 2)
    assert ops.interpolate(a, b, torch.tensor([0.2, 0.4]), out=out) is out
    torch.testing.assert_close(out, interpolate_ref(a, b, [0.2, 0.4]))


def test_parameters_with_grad_are_accepted():
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3, 4))
    out = ops.interpolate(a, b, [0.5])
    assert not out.requires_grad
    torch.testing.assert_close(out[0], (0.5 * a + 0.5 * b).detach())


def test_wide_rows_are_split_across_column_blocks():
    rng = np.random.default_rng(4)
    a, b = torch.randn(3, 5000), torch.randn(2, 6000)
    rows, cols = random_map(rng, 3, 2), random_map(rng, 5000, 6000)
    out = ops.interpolate(a, b, [0.3, 0.6], rows, cols)
    torch.testing.assert_close(out, interpolate_ref(a, b, [0.3, 0.6], rows, cols))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(b=torch.randn(3, 4)), ValueError, r"a.shape\[0\] = 4 differs from b.shape\[0\] = 3; pass rows"),
        (dict(rows=[0, 1, 2]), ValueError, r"rows has 3 entries but a.shape\[0\] = 4"),
        (dict(rows=[0, 1, 2, 4]), ValueError, r"rows\[3\] = 4 is out of range for b.shape\[0\] = 4"),
        (dict(lambdas=[float("inf")]), ValueError, r"lambdas\[0\] = inf is not finite"),
        (dict(lambdas=[[0.1]]), ValueError, "lambdas must be 1-D"),
        (dict(fill="nearest"), ValueError, "fill must be 'zero' or 'base'"),
        (dict(b=torch.randn(4, 5, dtype=torch.float64)), TypeError, "b has dtype float64 but a has dtype float32"),
        (dict(b=torch.randn(4, 5, 2)), ValueError, "b must have the same number of dimensions as a"),
        (dict(b=np.zeros((4, 5), np.float32)), TypeError, "both be torch tensors or both numpy"),
    ],
)
def test_errors_name_the_argument(kwargs, exc, match):
    args = dict(a=torch.randn(4, 5), b=torch.randn(4, 5), lambdas=[0.5])
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.interpolate(**args)


def test_out_aliasing_input_is_refused():
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="out overlaps the memory of b"):
        ops.interpolate(a[0], a[1], [0.5], out=a[1:])
