"""linear_assignment against scipy.optimize.linear_sum_assignment: same optimal objective, a valid
assignment with rows sorted, the same errors. Both the AVX2 and the portable loops are exercised
(HETMERGE_NO_AVX2=1 selects the portable ones)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from hetmerge import ops

KERNELS = ["avx2", "portable"]


@pytest.fixture(params=KERNELS)
def kernels(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setenv("HETMERGE_NO_AVX2", "1")
    else:
        monkeypatch.delenv("HETMERGE_NO_AVX2", raising=False)
    return request.param


def as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def check(cost, maximize=False):
    """Solve with ours and scipy; assert validity and the same objective (in float64)."""
    c64 = as_numpy(cost).astype(np.float64)
    r, c = ops.linear_assignment(cost, maximize=maximize)
    if isinstance(cost, torch.Tensor):
        assert isinstance(r, torch.Tensor) and r.dtype == torch.int64 and c.dtype == torch.int64
    r, c = as_numpy(r), as_numpy(c)
    k = min(c64.shape)
    assert r.dtype == np.int64 and c.dtype == np.int64
    assert r.shape == (k,) and c.shape == (k,)
    assert np.all(np.diff(r) > 0), "rows must be sorted and distinct"
    assert len(np.unique(c)) == k, "columns must be distinct"
    assert (k == 0) or (r.min() >= 0 and r.max() < c64.shape[0] and c.min() >= 0 and c.max() < c64.shape[1])
    rr, cc = linear_sum_assignment(c64, maximize=maximize)
    ours, ref = c64[r, c].sum(), c64[rr, cc].sum()
    assert np.isfinite(ours)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12), (ours, ref)
    return r, c


def uniform(rng, n, m):
    return rng.random((n, m))


def weight_matching(rng, n, m, noise=0.5):
    """C = W_a @ W_b.T with W_b a noisy row-permuted copy of W_a (maximize)."""
    wa = rng.standard_normal((n, 32))
    wb = wa[rng.permutation(n)][:m] if m <= n else np.vstack([wa[rng.permutation(n)], rng.standard_normal((m - n, 32))])
    return wa @ (wb + noise * rng.standard_normal(wb.shape)).T


def integers(rng, n, m):
    return rng.integers(0, 4, (n, m)).astype(np.float64)  # many ties


def forbidden(rng, n, m):
    c = rng.integers(0, 10, (n, m)).astype(np.float64)
    c[rng.random((n, m)) < 0.4] = np.inf
    c[np.arange(min(n, m)), np.arange(min(n, m))] = 5.0  # keep it feasible
    return c


def huge(rng, n, m):
    return rng.standard_normal((n, m)) * 1e300


KINDS = {"uniform": uniform, "weight_matching": weight_matching, "integers": integers, "forbidden": forbidden,
         "huge": huge}
SHAPES = [(1, 1), (1, 7), (7, 1), (5, 5), (9, 23), (23, 9), (64, 64), (40, 97), (97, 40)]


def layout(c: np.ndarray, how: str):
    if how == "C":
        return np.ascontiguousarray(c)
    if how == "F":
        return np.asfortranarray(c)
    if how == "sliced":
        big = np.zeros((2 * c.shape[0] + 1, 3 * c.shape[1] + 2), dtype=c.dtype)
        big[1::2, 2::3][: c.shape[0], : c.shape[1]] = c
        return big[1::2, 2::3][: c.shape[0], : c.shape[1]]
    if how == "torch":
        return torch.from_numpy(np.ascontiguousarray(c))
    if how == "torch_T":
        return torch.from_numpy(np.ascontiguousarray(c.T)).T
    raise ValueError(how)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_scipy(kernels, kind, shape, maximize):
    # A fixed seed per case: hash() of a str differs in every process, so failures would not repeat.
    rng = np.random.default_rng(1000 * list(KINDS).index(kind) + SHAPES.index(shape))
    c = KINDS[kind](rng, *shape)
    if maximize:
        c = -c  # keeps the forbidden entries forbidden (-inf when maximizing)
    for how in ["C", "F", "sliced", "torch", "torch_T"]:
        check(layout(c, how), maximize)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("how", ["C", "F", "sliced", "torch", "torch_T"])
@pytest.mark.parametrize("shape", [(33, 33), (17, 45), (45, 17)])
def test_dtypes_and_layouts(kernels, dtype, how, shape):
    rng = np.random.default_rng(1)
    c = (rng.random(shape) * 100).astype(dtype)
    check(layout(c, how), maximize=False)
    check(layout(c, how), maximize=True)


@pytest.mark.parametrize("shape", [(300, 300), (200, 450), (450, 200)])
def test_larger_problems_reach_shortest_paths(kernels, shape):
    # Large enough that rows stay free after the row reduction and the Dijkstra work arrays get
    # compacted (gathered loads); integer costs add ties between free and assigned columns.
    rng = np.random.default_rng(2)
    check(uniform(rng, *shape))
    check(integers(rng, *shape))
    check(weight_matching(rng, *shape), maximize=True)
    check(uniform(rng, *shape).astype(np.float32), maximize=True)


@pytest.mark.parametrize("structure", ["outer", "absdiff", "lowrank"])
@pytest.mark.parametrize("shape", [(250, 250), (180, 260), (260, 180)])
def test_structured_problems_need_long_searches(kernels, structure, shape):
    # Row reduction makes little headway on these: most rows are placed by long Dijkstra searches
    # that finish most columns, so the work arrays are compacted and read by gathered loads.
    rng = np.random.default_rng(4)
    n, m = shape
    a, b = rng.random(n), rng.random(m)
    c = {"outer": np.outer(a, b), "absdiff": np.abs(a[:, None] - b[None, :]),
         "lowrank": rng.random((n, 3)) @ rng.random((3, m))}[structure]
    check(c, maximize=structure == "outer")
    check(c.astype(np.float32), maximize=structure != "outer")
    check(np.asfortranarray(c), maximize=False)


@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (3, 8), (8, 3), (50, 50)])
def test_constant_matrix(kernels, shape):
    check(np.full(shape, 3.5))
    check(np.zeros(shape), maximize=True)


def test_expanded_rows_with_zero_stride(kernels):
    # torch.expand gives stride 0 along rows: every row is the same memory.
    row = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0], dtype=torch.float64)
    check(row.expand(4, 5))
    check(row[:, None].expand(5, 3))


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
@pytest.mark.parametrize("make", [np.zeros, torch.zeros])
def test_zero_size(shape, make):
    r, c = ops.linear_assignment(make(shape))
    assert len(r) == 0 and len(c) == 0
    assert as_numpy(r).dtype == np.int64


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 7), m=st.integers(1, 7), maximize=st.booleans(),
       f32=st.booleans(), transpose=st.booleans())
def test_small_random_hypothesis(data, n, m, maximize, f32, transpose):
    bad = -np.inf if maximize else np.inf
    values = st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                       st.just(bad))
    c = np.array(data.draw(st.lists(values, min_size=n * m, max_size=n * m)), dtype=np.float64).reshape(n, m)
    if f32:
        c = c.astype(np.float32)
    if transpose:
        c = np.ascontiguousarray(c.T).T
    try:
        linear_sum_assignment(c.astype(np.float64), maximize=maximize)
    except ValueError:
        with pytest.raises(ValueError, match="infeasible"):
            ops.linear_assignment(c, maximize=maximize)
        return
    check(c, maximize)


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3)])
@pytest.mark.parametrize("where", [(0, 0), (-1, -1), (1, 2)])
def test_nan_raises(kernels, dtype, shape, where):
    for how in ["C", "F", "sliced", "torch_T"]:
        c = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
        c[where] = np.nan
        with pytest.raises(ValueError, match="cost contains NaN"):
            ops.linear_assignment(layout(c, how))


def test_nan_wins_over_infeasible(kernels):
    c = np.full((3, 3), np.inf)
    c[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.linear_assignment(c)


def test_wrong_direction_infinity_raises(kernels):
    c = np.ones((3, 3))
    c[1, 1] = -np.inf
    with pytest.raises(ValueError, match="-inf"):
        ops.linear_assignment(c)
    c[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        ops.linear_assignment(c, maximize=True)


@pytest.mark.parametrize("case", ["row_all_inf", "column_all_inf", "hall_violation", "rect_two_rows_one_column",
                                  "everything_inf"])
@pytest.mark.parametrize("maximize", [False, True])
def test_infeasible_raises(kernels, case, maximize):
    inf = np.inf
    c = {
        "row_all_inf": np.array([[1.0, 2, 3], [inf, inf, inf], [4, 5, 6]]),
        "column_all_inf": np.array([[1.0, inf, 3], [4, inf, 6], [7, inf, 9]]),
        "hall_violation": np.array([[1.0, inf, inf], [2, inf, inf], [3, 4, 5]]),
        "rect_two_rows_one_column": np.array([[1.0, inf, inf, inf], [2, inf, inf, inf]]),
        "everything_inf": np.full((4, 6), inf),
    }[case]
    if maximize:
        c = -c
    for cost in (c, np.ascontiguousarray(c.T)):
        with pytest.raises(ValueError, match="linear_assignment: cost matrix is infeasible"):
            ops.linear_assignment(cost, maximize=maximize)


def test_row_reduction_does_not_ping_pong_on_a_single_allowed_column(kernels):
    # Two rows whose only finite entry is the same column: the row reduction hands the column back
    # and forth with a zero price step. It must stop and report infeasibility, not loop forever.
    n = 40
    rng = np.random.default_rng(3)
    c = rng.random((n, 2 * n))
    c[:2, :] = np.inf
    c[:2, 5] = 1.0
    with pytest.raises(ValueError, match="infeasible"):
        ops.linear_assignment(c)
    with pytest.raises(ValueError, match="infeasible"):
        ops.linear_assignment(np.ascontiguousarray(c[:, :n]))


def test_huge_values_do_not_overflow(kernels):
    c = np.array([[1e300, -1e300, 0.0], [-1e300, 1e300, 1e300], [0.0, 1e300, -1e300]])
    check(c)
    check(c, maximize=True)


@pytest.mark.parametrize("shape", [(50, 50), (30, 60), (60, 30)])
def test_near_overflow_values_still_give_a_valid_assignment(kernels, shape):
    # Reduced costs of values near the float64 limit overflow to inf; the solver must still
    # terminate with a valid assignment (scipy's objective overflows too, so only validity is checked).
    c = np.random.default_rng(5).standard_normal(shape) * 1e307
    r, col = ops.linear_assignment(c)
    k = min(shape)
    assert np.all(np.diff(r) > 0) and len(np.unique(col)) == k


# ---- inputs converted as scipy converts them ---------------------------------------------------

SCIPY_DOC_EXAMPLE = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]  # linear_sum_assignment's docstring example


@pytest.mark.parametrize("make", [
    lambda: np.array(SCIPY_DOC_EXAMPLE),  # int64
    lambda: np.array(SCIPY_DOC_EXAMPLE, dtype=np.int8),
    lambda: np.array(SCIPY_DOC_EXAMPLE, dtype=np.uint64),
    lambda: np.array(SCIPY_DOC_EXAMPLE, dtype=object),
    lambda: SCIPY_DOC_EXAMPLE,  # list of lists
    lambda: [tuple(r) for r in SCIPY_DOC_EXAMPLE],
    lambda: np.array(SCIPY_DOC_EXAMPLE, dtype=np.float16),
    lambda: np.matrix(SCIPY_DOC_EXAMPLE),
    lambda: torch.tensor(SCIPY_DOC_EXAMPLE),  # int64 tensor
    lambda: torch.tensor(SCIPY_DOC_EXAMPLE, dtype=torch.int32).T,
    lambda: torch.tensor(SCIPY_DOC_EXAMPLE, dtype=torch.float16),
    lambda: torch.tensor(SCIPY_DOC_EXAMPLE, dtype=torch.bfloat16),
], ids=["int64", "int8", "uint64", "object", "list", "tuples", "float16", "matrix", "torch_int64", "torch_int32_T",
        "torch_float16", "torch_bfloat16"])
@pytest.mark.parametrize("maximize", [False, True])
def test_integer_object_list_and_half_inputs_are_converted_like_scipy(make, maximize):
    cost = make()
    # scipy itself refuses object arrays (numpy's "safe" cast rule); the values are what matter.
    dense = np.asarray(SCIPY_DOC_EXAMPLE, dtype=np.float64)
    rr, cc = linear_sum_assignment(dense, maximize=maximize)
    r, c = ops.linear_assignment(cost, maximize=maximize)
    assert isinstance(r, torch.Tensor) == isinstance(cost, torch.Tensor)
    np.testing.assert_array_equal(as_numpy(r), rr)
    assert dense[as_numpy(r), as_numpy(c)].sum() == dense[rr, cc].sum()


def test_boolean_input_like_scipy():
    eye = np.identity(4)
    for cost in (eye.astype(bool), torch.from_numpy(eye.astype(bool))):
        for maximize in (False, True):
            r, c = ops.linear_assignment(cost, maximize=maximize)
            rr, cc = linear_sum_assignment(eye, maximize=maximize)
            assert eye[as_numpy(r), as_numpy(c)].sum() == eye[rr, cc].sum()


def test_large_integers_convert_to_float64_like_scipy():
    c = np.array([[2**62, 3], [5, 2**62 + 7]], dtype=np.int64)
    r, col = ops.linear_assignment(c)
    np.testing.assert_array_equal(col, linear_sum_assignment(c)[1])


# Each bad input raises the exception type scipy raises for it.
@pytest.mark.parametrize("cost, exc", [
    (np.identity(3).astype(str), TypeError),
    (np.identity(3).astype(bytes), TypeError),
    (np.identity(3, dtype=complex), TypeError),
    (np.identity(3, dtype=np.longdouble), TypeError),
    (np.array([[1, 2], [3, 4]], dtype="datetime64[s]"), TypeError),
    ([[1, 2], [3]], ValueError),  # ragged
    ([["abc", "1"], ["2", "3"]], ValueError),
    ([[{}, 1], [2, 3]], TypeError),
    ("abc", ValueError),
    (None, ValueError),  # a 0-d array, not a matrix
    ([1, 2, 3], ValueError),
    (np.zeros((2, 2, 2)), ValueError),
], ids=["str", "bytes", "complex", "longdouble", "datetime", "ragged", "list_str",
        "list_dict", "string", "None", "1d", "3d"])
def test_bad_inputs_raise_what_scipy_raises(cost, exc):
    with pytest.raises(exc):
        linear_sum_assignment(cost)
    with pytest.raises(exc, match="linear_assignment: cost"):
        ops.linear_assignment(cost)


@pytest.mark.parametrize("rows", [[[None, 1], [2, 0]], [["abc", 1], [2, 0]], [[{}, 1], [2, 0]], [["4", 1], [2, 0]]],
                         ids=["None", "str", "dict", "numeric_str"])
def test_object_arrays_convert_like_the_lists_they_hold(rows):
    # scipy refuses every object array; we convert its elements as scipy converts a nested list.
    try:
        rr, cc = linear_sum_assignment(rows)
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc), match="linear_assignment: cost"):
            ops.linear_assignment(np.array(rows, dtype=object))
        return
    r, c = ops.linear_assignment(np.array(rows, dtype=object))
    np.testing.assert_array_equal(r, rr)
    np.testing.assert_array_equal(c, cc)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_rejects_complex_tensors(dtype):
    with pytest.raises(TypeError, match="linear_assignment: cost must hold real numbers"):
        ops.linear_assignment(torch.zeros(3, 3, dtype=dtype))


def test_constant_cost_matrix_gives_the_identity_like_scipy_11602():
    # every assignment of a constant matrix is optimal; scipy pins the identity, and so do we
    for n in (1, 2, 8, 33):
        for maximize in (False, True):
            r, c = ops.linear_assignment(np.ones((n, n)), maximize=maximize)
            assert np.array_equal(r, np.arange(n)) and np.array_equal(c, np.arange(n))
    # ties broken toward the diagonal only where the diagonal is minimal: the optimum is unchanged
    C = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    r, c = ops.linear_assignment(C)
    assert C[r, c].sum() == C[linear_sum_assignment(C)].sum() == 1.0
