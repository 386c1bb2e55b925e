"""hetmerge.ops.cost_matrix against a pure numpy reference that materializes the padded, gathered operands.

C[i, j] = sum_terms sum_{q: map[q] >= 0} sum_{r < block} A[i, q*block + r] * B[j, map[q]*block + r]
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hetmerge as hm
from reference import cost_matrix_ref

EPS = {torch.float32: float(np.finfo(np.float32).eps), torch.float64: float(np.finfo(np.float64).eps)}


# ---- reference ---------------------------------------------------------------------------------

def _np64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()  # via torch: numpy has no bfloat16
    return np.asarray(x).astype(np.float64)


def reference(terms):
    """(C, mag, K_eff) in float64: mag = sum of |products| bounds the rounding error of any summation order."""
    c = mag = None
    k_eff = 0
    for term in terms:
        a, b = _np64(term[0]), _np64(term[1])
        m = term[2] if len(term) > 2 else None
        block = term[3] if len(term) > 3 else 1
        k_t = b.shape[1] // block
        m = np.arange(a.shape[1] // block) if m is None else _np64(m).astype(np.int64)
        b_pad = np.concatenate([b, np.zeros((b.shape[0], block))], axis=1)  # slot k_t is zeros
        src = np.where(m >= 0, m, k_t)
        bg = b_pad[:, (src[:, None] * block + np.arange(block)).reshape(-1)]
        ct, mt = a @ bg.T, np.abs(a) @ np.abs(bg).T
        c, mag = (ct, mt) if c is None else (c + ct, mag + mt)
        k_eff += int((m >= 0).sum()) * block
    return c, mag, k_eff


def assert_matches(out, terms, dtype):
    ref, mag, k_eff = reference(terms)
    # two independent references (this file's numpy one, tests/reference.py's torch one) must agree
    np.testing.assert_allclose(cost_matrix_ref(terms).numpy(), ref, rtol=1e-12, atol=1e-12 * (1 + mag.max(initial=0)))
    got = _np64(out)
    assert got.shape == ref.shape
    # Rounding of a K-term dot product is at most ~K*eps*sum|products| whatever the order; random signs
    # keep it near sqrt(K)*eps*sum|products|, which still exposes a single wrong or missing product.
    tol = 2.0 * math.sqrt(k_eff + 1) * EPS[dtype] * mag + 1e-30
    err = np.abs(got - ref)
    bad = err > tol
    assert not bad.any(), f"max err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}, tol there {tol.flat[err.argmax()]:.3g}"


# ---- sample generator --------------------------------------------------------------------------

LAYOUTS = ["contig", "T", "slice", "numpy", "numpy_T", "expand", "numpy_rev"]


NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def operand(rng: np.random.Generator, n: int, m: int, layout: str, dtype):
    """An [n, m] operand with the given memory layout (values are standard normal, rounded to dtype)."""
    npdt = np.float64 if dtype == torch.float64 else np.float32

    def t(shape):  # the layout's underlying buffer, as a torch tensor of dtype
        return torch.from_numpy(rng.standard_normal(shape).astype(npdt)).to(dtype)

    def a(shape):  # ... as a numpy array (numpy has no bfloat16: bfloat16 callers use torch layouts)
        return rng.standard_normal(shape).astype(npdt).astype(NP_DTYPE[dtype])

    if layout == "contig":
        return t((n, m))
    if layout == "T":  # e.g. W_{l+1}.T: rows adjacent in memory
        return t((m, n)).T
    if layout == "slice":  # both strides > 1, offset start
        return t((2 * n + 1, 3 * m + 2))[1::2, 2::3]
    if layout == "numpy":
        return a((n, m))
    if layout == "numpy_T":
        return a((m, n)).T
    if layout == "expand":  # row stride 0: every row the same
        return t((1, m)).expand(n, m)
    if layout == "numpy_rev":  # negative strides
        return a((n, m))[::-1, ::-1]
    raise ValueError(layout)


def index_map(rng, k: int, k_target: int, pad_frac: float):
    """[k] int64: distinct targets in range(k_target), about pad_frac of the slots (and any excess) -1."""
    m = np.full(k, -1, dtype=np.int64)
    n_valid = min(k_target, int(round(k * (1 - pad_frac))))
    slots = rng.permutation(k)[:n_valid]
    m[slots] = rng.permutation(k_target)[:n_valid]
    return m


def make_terms(rng, n_a, n_b, specs, dtype, numpy_ok=True):
    """specs: list of (k, k_target or None for identity, block, pad_frac, layout_a, layout_b)."""
    terms = []
    framework_numpy = specs[0][4].startswith("numpy")
    for k, k_t, block, pad_frac, la, lb in specs:
        # one framework per call (the output follows terms[0].A)
        if framework_numpy != la.startswith("numpy"):
            la = "numpy" if framework_numpy else "contig"
        if framework_numpy != lb.startswith("numpy"):
            lb = "numpy_T" if framework_numpy else "T"
        a = operand(rng, n_a, k * block, la, dtype)
        if k_t is None:
            terms.append((a, operand(rng, n_b, k * block, lb, dtype), None, block))
        else:
            m = index_map(rng, k, k_t, pad_frac)
            terms.append((a, operand(rng, n_b, k_t * block, lb, dtype), m if framework_numpy else torch.from_numpy(m), block))
    return terms


def samples():
    """Deterministic cases: tile-edge sizes, layouts, padding, identity, all -1, block > 1, several terms."""
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 9), (9, 1), (5, 7), (6, 16), (7, 17), (13, 40), (37, 5), (64, 64), (100, 33), (150, 290)]
    out = []
    for idx, (n_a, n_b) in enumerate(sizes):
        for dtype in (torch.float32, torch.float64):
            la, lb = LAYOUTS[idx % len(LAYOUTS)], LAYOUTS[(idx * 3 + 1) % len(LAYOUTS)]
            specs = [
                (int(rng.integers(1, 60)), int(rng.integers(1, 60)), 1, 0.25, la, lb),  # padding + cropping
                (int(rng.integers(1, 40)), None, 1, 0.0, lb, la),                       # identity map
                (int(rng.integers(1, 12)), int(rng.integers(1, 12)), 9, 0.3, la, "T"),  # conv 3x3 kernels
            ]
            out.append(pytest.param(n_a, n_b, specs[: 1 + idx % 3], dtype, id=f"{n_a}x{n_b}-{la}-{lb}-{str(dtype)[6:]}"))
    return out


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_a,n_b,specs,dtype", samples())
def test_matches_reference(n_a, n_b, specs, dtype):
    rng = np.random.default_rng(n_a * 1000 + n_b)
    terms = make_terms(rng, n_a, n_b, specs, dtype)
    out = hm.ops.cost_matrix(terms)
    assert out.dtype == (dtype if isinstance(out, torch.Tensor) else (np.float32 if dtype == torch.float32 else np.float64))
    assert tuple(out.shape) == (n_a, n_b)
    assert_matches(out, terms, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_portable_path_matches_reference(dtype, monkeypatch):
    # HETMERGE_NO_AVX2 selects the portable microkernel, which machines with AVX2 never run otherwise.
    monkeypatch.setenv("HETMERGE_NO_AVX2", "1")
    rng = np.random.default_rng(1)
    for n_a, n_b in [(1, 1), (7, 13), (70, 45)]:
        terms = make_terms(rng, n_a, n_b, [(50, 40, 1, 0.2, "contig", "contig"), (8, 8, 4, 0.1, "T", "slice")], dtype)
        assert_matches(hm.ops.cost_matrix(terms), terms, dtype)


@settings(max_examples=60, deadline=None)
@given(
    n_a=st.integers(1, 40), n_b=st.integers(1, 40),
    ks=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 30), st.integers(1, 4), st.floats(0, 1),
                          st.sampled_from(["contig", "T", "slice", "expand"]), st.sampled_from(["contig", "T", "slice", "expand"]),
                          st.booleans()), min_size=1, max_size=3),
    f64=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_random_maps_shapes_strides(n_a, n_b, ks, f64, seed):
    dtype = torch.float64 if f64 else torch.float32
    rng = np.random.default_rng(seed)
    specs = [(k, None if ident else k_t, block, pad, la, lb) for k, k_t, block, pad, la, lb, ident in ks]
    terms = make_terms(rng, n_a, n_b, specs, dtype)
    assert_matches(hm.ops.cost_matrix(terms), terms, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_padding_gives_zeros_and_overwrites_out(dtype):
    a, b = torch.randn(5, 6, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    out = torch.full((5, 4), float("nan"), dtype=dtype)
    hm.ops.cost_matrix([(a, b, torch.full((6,), -1, dtype=torch.int64), 1)], out=out)
    assert torch.equal(out, torch.zeros(5, 4, dtype=dtype))
    # a non-empty call overwrites out as well (never accumulates into it)
    out.fill_(float("nan"))
    hm.ops.cost_matrix([(a, b[:, :3], torch.tensor([0, -1, 2, -1, 1, -1]), 1)], out=out)
    assert_matches(out, [(a, b[:, :3], torch.tensor([0, -1, 2, -1, 1, -1]), 1)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_shapes(dtype):
    a, b = torch.randn(5, 0, dtype=dtype), torch.randn(4, 0, dtype=dtype)
    assert torch.equal(hm.ops.cost_matrix([(a, b, None, 1)]), torch.zeros(5, 4, dtype=dtype))
    assert hm.ops.cost_matrix([(torch.randn(0, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype))]).shape == (0, 4)


def test_empty_out_with_zero_target_units_is_contiguous():
    # TensorView::is_contiguous used to reject torch.empty(3, 0), whose strides are (1, 1).
    assert hm.ops.cost_matrix([(torch.randn(3, 3), torch.randn(0, 3))]).shape == (3, 0)


def test_large_k_crosses_block_and_term_boundaries():
    # K_eff > the microkernel's K-block, terms ending inside a block, and a row-major mapped B (the
    # gather path) next to a transposed one.
    rng = np.random.default_rng(7)
    specs = [(700, 650, 1, 0.1, "contig", "contig"), (300, 300, 1, 0.0, "T", "T"), (40, 40, 3, 0.5, "slice", "contig")]
    for dtype in (torch.float32, torch.float64):
        terms = make_terms(rng, 131, 77, specs, dtype)
        assert_matches(hm.ops.cost_matrix(terms), terms, dtype)


def test_float32_error_within_twice_torch_float32_error():
    # flash-attention's rule: our float32 error against a float64 reference at most ~2x that of the
    # same product done by torch in float32 (one matmul on the pre-gathered operands).
    rng = np.random.default_rng(3)
    terms = make_terms(rng, 200, 150, [(2000, 2000, 1, 0.2, "contig", "contig"), (1000, 900, 1, 0.1, "T", "T")],
                       torch.float32)
    ref, mag, _ = reference(terms)
    a_cat = np.concatenate([_np64(a)[:, np.flatnonzero(_np64(m) >= 0)] for a, _, m, _ in terms], 1)
    b_cat = np.concatenate([_np64(b)[:, _np64(m)[_np64(m) >= 0].astype(np.int64)] for _, b, m, _ in terms], 1)
    torch32 = (torch.from_numpy(a_cat).float() @ torch.from_numpy(b_cat).float().T).double().numpy()
    ours = _np64(hm.ops.cost_matrix(terms))
    err_ours, err_torch = np.abs(ours - ref).max(), np.abs(torch32 - ref).max()
    assert err_ours <= 2 * err_torch + 2 * EPS[torch.float32] * mag.max() / math.sqrt(a_cat.shape[1])


def test_result_independent_of_thread_count():
    # Each C tile is summed in the same K order by one task whatever the split: bitwise equal results.
    rng = np.random.default_rng(5)
    terms = make_terms(rng, 301, 203, [(600, 500, 1, 0.3, "contig", "contig"), (100, 100, 1, 0.0, "T", "T")],
                       torch.float32)
    before = hm.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            hm.set_num_threads(n)
            outs.append(hm.ops.cost_matrix(terms))
    finally:
        hm.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_permuting_target_units_permutes_columns():
    # Invariance: reordering B's rows (target units) reorders C's columns and changes nothing else.
    rng = np.random.default_rng(11)
    terms = make_terms(rng, 50, 60, [(80, 70, 1, 0.2, "contig", "contig"), (30, None, 2, 0.0, "T", "T")], torch.float64)
    perm = torch.from_numpy(rng.permutation(60))
    permuted = [(a, b[perm], m, blk) for a, b, m, blk in terms]
    torch.testing.assert_close(hm.ops.cost_matrix(permuted), hm.ops.cost_matrix(terms)[:, perm], rtol=1e-12, atol=1e-12)


def test_mlp_weight_matching_case():
    # The call align() makes for an MLP hidden group: (W_l, map of the input group), (W_{l+1}.T, map of
    # the output group), biases as [n, 1] columns.
    g = torch.Generator().manual_seed(0)
    w1a, w1b = torch.randn(64, 20, generator=g), torch.randn(48, 20, generator=g)
    w2a, w2b = torch.randn(10, 64, generator=g), torch.randn(10, 48, generator=g)
    b1a, b1b = torch.randn(64, generator=g), torch.randn(48, generator=g)
    terms = [(w1a, w1b, None, 1), (w2a.T, w2b.T, None, 1), (b1a[:, None], b1b[:, None], None, 1)]
    expected = w1a @ w1b.T + w2a.T @ w2b + b1a[:, None] * b1b[None, :]
    torch.testing.assert_close(hm.ops.cost_matrix(terms), expected, rtol=1e-5, atol=1e-5)


# ---- float16 / bfloat16 inputs: float32 accumulation, float32 C ----------------------------------
HALF = [torch.float16, torch.bfloat16]


def upcast(terms):
    """The same terms in float32: exact, every float16/bfloat16 value is a float32 value."""
    def f32(x):
        return x.float() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return [(f32(a), f32(b), m, blk) for a, b, m, blk in terms]


def assert_matches_upcast(out, terms):
    # The upcast is exact, so C must be the float32 cost of the upcast inputs up to float32
    # accumulation: the float32 bound of assert_matches, against a float64 reference.
    assert out.dtype in (torch.float32, np.float32), out.dtype
    assert_matches(out, upcast(terms), torch.float32)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layouts", [("contig", "contig"), ("T", "slice"), ("expand", "T"), ("slice", "expand")])
def test_half_inputs_accumulate_in_float32(dtype, layouts):
    # hm.align on bf16/fp16 models failed: cost_matrix rejected half dtypes.
    rng = np.random.default_rng(21)
    la, lb = layouts
    specs = [(70, 90, 1, 0.2, la, lb), (12, None, 9, 0.0, lb, la), (20, 15, 3, 0.4, la, "contig")]
    for n_a, n_b in [(1, 1), (7, 17), (150, 91)]:
        terms = make_terms(rng, n_a, n_b, specs, dtype)
        assert_matches_upcast(hm.ops.cost_matrix(terms), terms)


@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs_portable_path(dtype, monkeypatch):
    monkeypatch.setenv("HETMERGE_NO_AVX2", "1")
    rng = np.random.default_rng(22)
    terms = make_terms(rng, 45, 38, [(300, 280, 1, 0.1, "contig", "T"), (8, 8, 4, 0.1, "T", "slice")], dtype)
    assert_matches_upcast(hm.ops.cost_matrix(terms), terms)


def test_float16_numpy_inputs_give_float32_numpy():
    rng = np.random.default_rng(23)
    terms = make_terms(rng, 30, 20, [(40, 50, 1, 0.2, "numpy", "numpy_T"), (9, 9, 1, 0.0, "numpy_rev", "numpy")],
                       torch.float16)
    out = hm.ops.cost_matrix(terms)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert_matches_upcast(out, terms)


def test_half_large_k_crosses_block_boundaries():
    # K beyond the GEMM's K-block (256) and the B slab, with a mapped row-major B (the gather path).
    rng = np.random.default_rng(24)
    for dtype in HALF:
        terms = make_terms(rng, 131, 77, [(700, 650, 1, 0.1, "contig", "contig"), (300, 300, 1, 0.0, "T", "T")], dtype)
        assert_matches_upcast(hm.ops.cost_matrix(terms), terms)


@settings(max_examples=40, deadline=None)
@given(
    n_a=st.integers(1, 40), n_b=st.integers(1, 40),
    ks=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 30), st.integers(1, 4), st.floats(0, 1),
                          st.sampled_from(["contig", "T", "slice", "expand"]), st.sampled_from(["contig", "T", "slice", "expand"]),
                          st.booleans()), min_size=1, max_size=3),
    bf16=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_half_random_maps_shapes_strides(n_a, n_b, ks, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float16
    rng = np.random.default_rng(seed)
    specs = [(k, None if ident else k_t, block, pad, la, lb) for k, k_t, block, pad, la, lb, ident in ks]
    terms = make_terms(rng, n_a, n_b, specs, dtype)
    assert_matches_upcast(hm.ops.cost_matrix(terms), terms)


def test_half_out_must_be_float32():
    a = torch.randn(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="cost_matrix: out must be float32, got bfloat16"):
        hm.ops.cost_matrix([(a, a)], out=torch.empty(4, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"terms\[1\].A has dtype float16 but terms\[0\].A has dtype bfloat16"):
        hm.ops.cost_matrix([(a, a), (a.half(), a.half())])
