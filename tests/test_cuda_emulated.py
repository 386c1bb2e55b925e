"""The CUDA kernels' device logic, run on the CPU under an emulated launch (hetmerge._C.emulated).

Each emulated call builds the same parameters, grid and launch splits as csrc/cuda/*.cu and runs the
same per-thread / per-tile bodies from csrc/kernels, so these tests check the device code's index
arithmetic, padding, vector paths, grid-stride loops, tile staging and epilogues without a GPU.
References are pure torch; data movement must match exactly, arithmetic is compared with the CPU
backend bit for bit (same formula, same rounding) and with a float64 reference within tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hetmerge
from hetmerge import _C

E = _C.emulated
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---- references (pure torch) -------------------------------------------------------------------
def ref_permute_pad(w, rows, cols=None):
    """out[i, j, ...] = w[rows[i], cols[j], ...], 0 where an index is -1."""
    if w.ndim == 1:
        cols, rows = rows, None
        w = w[None]
        squeeze = True
    else:
        squeeze = False
    out = w
    for dim, m in ((0, rows), (1, cols)):
        if m is None:
            continue
        m = m.to(torch.int64)
        picked = out.index_select(dim, m.clamp(min=0))
        mask_shape = [1] * out.ndim
        mask_shape[dim] = len(m)
        out = torch.where((m >= 0).reshape(mask_shape), picked, torch.zeros((), dtype=out.dtype))
    return out[0] if squeeze else out.contiguous()


def ref_interpolate(a, b, lambdas, rows=None, cols=None, fill="zero"):
    """float64 reference of out[k] = (1 - l_k) a + l_k b~."""
    a64, b64 = a.double(), b.double()
    bt = ref_permute_pad(b64, rows, cols) if (rows is not None or cols is not None) else b64
    if fill == "base":
        pad = ref_permute_pad(torch.ones_like(b64), rows, cols) == 0 if (rows is not None or cols is not None) \
            else torch.zeros_like(a64, dtype=torch.bool)
        bt = torch.where(pad, a64, bt)
    lam = torch.tensor(lambdas, dtype=torch.float64).reshape(-1, *([1] * a.ndim))
    return (1 - lam) * a64 + lam * bt


def ref_cost(terms):
    """float64 reference: sum over terms of A[:, kept] @ B[:, map[kept]]^T per block."""
    C = None
    for A, B, m, block in terms:
        A64, B64 = A.double(), B.double()
        k = A.shape[1] // block
        if m is None:
            m = torch.arange(k)
        a_cols = torch.arange(A.shape[1]).reshape(k, block)
        keep = m >= 0
        a_idx = a_cols[keep].reshape(-1)
        b_idx = (m[keep][:, None] * block + torch.arange(block)[None]).reshape(-1)
        part = A64[:, a_idx] @ B64[:, b_idx].T
        C = part if C is None else C + part
    return C


def rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def rand_map(n_slots, n_source, gen, pad_frac=0.25):
    """n_slots entries, distinct sources in [0, n_source), about pad_frac of them -1."""
    perm = torch.randperm(n_source, generator=gen)[:n_slots]
    m = torch.full((n_slots,), -1, dtype=torch.int64)
    m[: len(perm)] = perm
    m = m[torch.randperm(n_slots, generator=gen)]
    drop = torch.rand(n_slots, generator=gen) < pad_frac
    m[drop] = -1
    return m


def misaligned_empty(shape, dtype):
    """A contiguous tensor whose data pointer is 1 element past a 16-byte boundary: scalar paths."""
    n = int(np.prod(shape)) if len(shape) else 1
    return torch.empty(n + 1, dtype=dtype)[1:].view(shape)


# ---- permute_pad ---------------------------------------------------------------------------------
PP_CASES = [
    # (w shape, rows (n_slots) or None, cols (n_slots) or None)
    ((37, 29), 41, 23),
    ((64, 64), 64, None),  # rows only, rows contiguous: vector loads
    ((5, 7, 3, 3), 9, 4),  # conv weight, trailing 3x3
    ((130,), 150, None),  # 1-D: rows map the only axis
    ((16, 1000), None, 1003),  # long rows, several chunks per row
    ((3, 4), 0, 4),  # empty map
    ((6, 8), 6, 0),  # empty columns (torch reports strides (1, 1) for this empty out)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PP_CASES)
@pytest.mark.parametrize("aligned", [True, False])
def test_permute_pad_matches_reference(dtype, case, aligned):
    gen = torch.Generator().manual_seed(0)
    shape, nr, nc = case
    w = rand(shape, dtype, gen)
    rows = rand_map(nr, shape[0], gen) if nr is not None else None
    cols = rand_map(nc, shape[1], gen) if nc is not None else None
    want = ref_permute_pad(w, rows, cols)
    out = torch.empty(want.shape, dtype=dtype) if aligned else misaligned_empty(tuple(want.shape), dtype)
    plan = E.permute_pad(w, rows, cols, out)
    assert torch.equal(out, want)
    if not aligned and out.numel() > 0:
        assert plan["vec_store"] == 0


def test_permute_pad_takes_vector_paths_when_aligned():
    w = torch.randn(64, 64)
    rows = torch.randperm(64)
    out = torch.empty(64, 64)
    plan = E.permute_pad(w, rows, None, out)
    assert plan["vec_load"] == 1 and plan["vec_store"] == 1
    assert torch.equal(out, ref_permute_pad(w, rows))


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_pad_strided_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    base = rand((20, 9, 3, 5), dtype, gen)
    w = base.permute(1, 0, 3, 2)  # [9, 20, 5, 3], no dim contiguous in order
    rows = torch.tensor([8, -1, 0, 3, 4, 5, 6, 7, 1, 2, -1])
    cols = rand_map(25, 20, gen)
    out = torch.empty(11, 25, 5, 3, dtype=dtype)
    E.permute_pad(w, rows, cols, out)
    assert torch.equal(out, ref_permute_pad(w, rows, cols))
    # strided maps
    rows2 = torch.stack([rows, rows])[:, :].t()[:, 0]
    out2 = torch.empty_like(out)
    E.permute_pad(w, rows2, cols, out2)
    assert torch.equal(out2, out)


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_permute_pad_grid_stride_loops(cap):
    """A grid smaller than the work: every block and thread loops over rows and chunks."""
    gen = torch.Generator().manual_seed(2)
    w = rand((50, 700), torch.float32, gen)
    rows, cols = rand_map(47, 50, gen), rand_map(690, 700, gen)
    out = torch.empty(47, 690)
    plan = E.permute_pad(w, rows, cols, out, grid_cap=cap)
    assert torch.equal(out, ref_permute_pad(w, rows, cols))
    assert plan["grid_y"] == 47 and plan["grid_x"] >= 1


def test_permute_pad_all_padding_rows_are_zero():
    w = torch.full((4, 6), float("nan"))
    out = torch.full((3, 6), 7.0)
    E.permute_pad(w, torch.tensor([-1, -1, -1]), None, out)
    assert torch.equal(out, torch.zeros(3, 6))


@settings(max_examples=40, deadline=None)
@given(n0=st.integers(1, 20), n1=st.integers(1, 40), t=st.sampled_from([(), (1,), (3,), (2, 3)]),
       m0=st.integers(0, 25), m1=st.integers(0, 45), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
       transpose=st.booleans(), cap=st.sampled_from([0, 1, 2]))
def test_permute_pad_random(n0, n1, t, m0, m1, dtype, seed, transpose, cap):
    gen = torch.Generator().manual_seed(seed)
    w = rand((n1, n0, *t), dtype, gen).transpose(0, 1) if transpose else rand((n0, n1, *t), dtype, gen)
    rows, cols = rand_map(m0, n0, gen), rand_map(m1, n1, gen)
    out = torch.empty(m0, m1, *t, dtype=dtype)
    E.permute_pad(w, rows, cols, out, grid_cap=cap)
    assert torch.equal(out, ref_permute_pad(w, rows, cols))


# ---- interpolate ---------------------------------------------------------------------------------
def cpu_interpolate(a, b, lambdas, rows, cols, fill):
    return hetmerge.ops.interpolate(a, b, lambdas, rows, cols, fill=fill)


TOL = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", ["zero", "base"])
@pytest.mark.parametrize("case", [
    ((33, 20), (40, 17), True, True),  # pad rows, crop/pad cols
    ((64, 32), (70, 32), True, False),  # rows only: vector loads of b
    ((6, 4, 3, 3), (5, 7, 3, 3), True, True),  # conv
    ((100,), (90,), True, False),  # 1-D
    ((16, 16), (16, 16), False, False),  # no maps
])
@pytest.mark.parametrize("aligned", [True, False])
def test_interpolate_matches_cpu_and_reference(dtype, fill, case, aligned):
    gen = torch.Generator().manual_seed(3)
    sa, sb, use_rows, use_cols = case
    a, b = rand(sa, dtype, gen), rand(sb, dtype, gen)
    rows = rand_map(sa[0], sb[0], gen) if use_rows else None
    cols = rand_map(sa[1], sb[1], gen) if use_cols else None
    lambdas = [0.0, 0.3, 1.0, 0.77, -0.5]
    want_cpu = cpu_interpolate(a, b, lambdas, rows, cols, fill)
    out = torch.empty((len(lambdas), *sa), dtype=dtype) if aligned else misaligned_empty((len(lambdas), *sa), dtype)
    E.interpolate(a, b, lambdas, rows, cols, fill == "base", out)
    # Same formula, same conversions: bit-identical to the CPU loop (the GPU build disables FMA
    # contraction in this kernel for the same reason).
    assert torch.equal(out, want_cpu)
    ref = ref_interpolate(a, b, lambdas, rows, cols, fill)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(out[0], a)  # lambda = 0 gives the base exactly


def test_interpolate_many_lambdas_split_launches():
    gen = torch.Generator().manual_seed(4)
    a, b = rand((9, 13), torch.float32, gen), rand((11, 13), torch.float32, gen)
    rows = rand_map(9, 11, gen)
    lambdas = np.linspace(0, 1, 150).tolist()
    out = torch.empty(150, 9, 13)
    plan = E.interpolate(a, b, lambdas, rows, None, False, out)
    assert plan["launches"] == -(-150 // E.limits()["lambdas_per_launch"])
    assert torch.equal(out, cpu_interpolate(a, b, lambdas, rows, None, "zero"))


@pytest.mark.parametrize("cap", [1, 2])
def test_interpolate_grid_stride_and_strided(cap):
    gen = torch.Generator().manual_seed(5)
    a = rand((30, 40), torch.bfloat16, gen).t()  # [40, 30] transposed
    b = rand((50, 33), torch.bfloat16, gen)[::2]  # [25, 33] row-strided
    rows, cols = rand_map(40, 25, gen), rand_map(30, 33, gen)
    out = torch.empty(3, 40, 30, dtype=torch.bfloat16)
    E.interpolate(a, b, [0.1, 0.5, 0.9], rows, cols, True, out, grid_cap=cap)
    assert torch.equal(out, cpu_interpolate(a, b, [0.1, 0.5, 0.9], rows, cols, "base"))


# ---- weighted_sum --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tensors,K", [(1, 1), (3, 4), (16, 2), (20, 3), (5, 60)])
@pytest.mark.parametrize("shape", [(37, 19), (8, 3, 3), (1000,), ()])
def test_weighted_sum_matches_cpu_and_reference(dtype, n_tensors, K, shape):
    gen = torch.Generator().manual_seed(6)
    xs = [rand(shape, dtype, gen) for _ in range(n_tensors)]
    coeffs = torch.randn(K, n_tensors, generator=gen, dtype=torch.float64)
    want_cpu = hetmerge.ops.weighted_sum(xs, coeffs)
    out = torch.empty((K, *shape), dtype=dtype)
    plan = E.weighted_sum(xs, coeffs.reshape(-1).tolist(), K, out)
    assert torch.equal(out, want_cpu)
    ref = torch.einsum("kt,t...->k...", coeffs, torch.stack([x.double() for x in xs]))
    tol = TOL[dtype] * n_tensors * 4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    if shape != () and n_tensors > E.limits()["tensors_per_launch"]:
        assert plan["launches"] >= 2  # partial sums chained through the accumulator


def test_weighted_sum_strided_and_misaligned():
    gen = torch.Generator().manual_seed(7)
    xs = [rand((12, 40), torch.float16, gen).t(), rand((40, 24), torch.float16, gen)[:, ::2],
          rand((40, 12), torch.float16, gen)]
    coeffs = [0.5, -1.0, 2.0, 1.0, 1.0, 1.0]
    out = misaligned_empty((2, 40, 12), torch.float16)
    plan = E.weighted_sum(xs, coeffs, 2, out, grid_cap=1)
    assert plan["vec_in"] == 0 and plan["vec_out"] == 0
    assert torch.equal(out, hetmerge.ops.weighted_sum(xs, torch.tensor(coeffs).reshape(2, 3)))


# ---- cost_matrix ---------------------------------------------------------------------------------
def emulated_cost(terms, precision="fp32", dtype=torch.float32):
    n_a, n_b = terms[0][0].shape[0], terms[0][1].shape[0]
    out = torch.full((n_a, n_b), float("nan"), dtype=dtype)
    plan = E.cost_matrix([(A, B, m, blk) for A, B, m, blk in terms], out, precision=precision)
    return out, plan


def cost_tol(terms, dtype):
    k = sum(A.shape[1] for A, _, _, _ in terms)
    eps = torch.finfo(dtype).eps
    return 4 * eps * k  # fp sum of k products of N(0,1) values: error grows about linearly in k at worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_a,n_b,k", [(1, 1, 1), (130, 70, 37), (64, 129, 8), (200, 150, 0), (5, 300, 17)])
def test_cost_matrix_ragged_tiles(dtype, n_a, n_b, k):
    gen = torch.Generator().manual_seed(8)
    A, B = rand((n_a, k), dtype, gen), rand((n_b, k + 5), dtype, gen)
    m = rand_map(k, k + 5, gen)
    terms = [(A, B, m, 1)]
    out, plan = emulated_cost(terms, dtype=dtype)
    tol = cost_tol(terms, dtype)
    torch.testing.assert_close(out.double(), ref_cost(terms), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cost_matrix_terms_blocks_and_layouts(dtype):
    """Several terms in one launch: identity map, block > 1 (conv), transposed A and B."""
    gen = torch.Generator().manual_seed(9)
    n_a, n_b = 90, 75
    t1 = (rand((n_a, 40), dtype, gen), rand((n_b, 40), dtype, gen), None, 1)
    t2 = (rand((n_a, 6 * 9), dtype, gen), rand((n_b, 8 * 9), dtype, gen), rand_map(6, 8, gen), 9)
    t3 = (rand((30, n_a), dtype, gen).t(), rand((33, n_b), dtype, gen).t(), rand_map(30, 33, gen), 1)  # k-major
    t4 = (rand((n_a, 10), dtype, gen), rand((n_b, 2 * 10), dtype, gen)[:, ::2], rand_map(10, 10, gen), 1)
    terms = [t1, t2, t3, t4]
    out, plan = emulated_cost(terms, dtype=dtype)
    assert plan["launches"] == 1
    tol = cost_tol(terms, dtype)
    torch.testing.assert_close(out.double(), ref_cost(terms), rtol=tol, atol=tol)


def test_cost_matrix_many_terms_accumulate_across_launches():
    gen = torch.Generator().manual_seed(10)
    n_terms = E.limits()["cost_terms_per_launch"] + 3
    terms = [(rand((20, 5), torch.float32, gen), rand((18, 7), torch.float32, gen), rand_map(5, 7, gen), 1)
             for _ in range(n_terms)]
    out, plan = emulated_cost(terms)
    assert plan["launches"] == 2
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.double(), ref_cost(terms), rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cost_matrix_all_padding_map_gives_zero_and_skips_inf(precision):
    """Padded groups never enter the sum: an inf in a dropped column of A must not turn C into NaN."""
    A = torch.randn(10, 6)
    A[:, 2] = float("inf")
    B = torch.randn(7, 6)
    m = torch.tensor([0, 1, -1, 3, 4, 5])
    out, _ = emulated_cost([(A, B, m, 1)], precision)
    assert torch.isfinite(out).all()
    out0, _ = emulated_cost([(A, B, torch.full((6,), -1), 1)], precision)
    assert torch.equal(out0, torch.zeros(10, 7))


def round_tf32(x):
    """Round float32 to TF32 (10 mantissa bits), nearest with ties away from zero (cvt.rna)."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    r = ((u + 0x1000) & 0xFFFFE000)
    r = torch.where(finite, r, u)
    r = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32)
    return r.view(torch.float32)


ROUND = {"tf32": round_tf32, "bf16": lambda x: x.to(torch.bfloat16).float(),
         "fp16": lambda x: x.to(torch.float16).float()}


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_cost_matrix_tensor_core_staging(precision):
    """Operands are rounded while staging: the product equals the fp64 product of rounded operands
    up to fp32 accumulation, and its error against fp32 is that of the format."""
    gen = torch.Generator().manual_seed(11)
    n_a, n_b, k = 150, 130, 70
    A, B = rand((n_a, k), torch.float32, gen), rand((n_b, k + 3), torch.float32, gen)
    m = rand_map(k, k + 3, gen)
    terms = [(A, B, m, 1)]
    out, plan = emulated_cost(terms, precision)
    rnd = ROUND[precision]
    rounded = [(rnd(a), rnd(b), mm, blk) for a, b, mm, blk in terms]
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.double(), ref_cost(rounded), rtol=tol, atol=tol)
    # Accuracy against the exact product: bounded by the format's unit roundoff times sqrt(k)-ish.
    err = (out.double() - ref_cost(terms)).abs().max().item()
    unit = {"tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}[precision]
    assert err < 4 * unit * k


def test_cost_matrix_tensor_core_block_terms():
    gen = torch.Generator().manual_seed(12)
    terms = [(rand((70, 4 * 9), torch.float32, gen), rand((66, 5 * 9), torch.float32, gen),
              torch.tensor([4, -1, 0, 2]), 9),
             (rand((33, 70), torch.float32, gen).t(), rand((66, 33), torch.float32, gen), None, 1)]
    out, _ = emulated_cost(terms, "tf32")
    rounded = [(round_tf32(a), round_tf32(b), mm, blk) for a, b, mm, blk in terms]
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.double(), ref_cost(rounded), rtol=tol, atol=tol)


# Zero-width terms: the CUDA launch walked its k-tiles from term 0 without asking cost_term_of_tile,
# so a launch whose first term had no tile (k = 0) staged tile 0 from that empty term: zeros, and the
# next term's first k-tile was dropped. The emulation had copied the same walk; both now run the
# shared cost_tile_schedule. Widths: 0 = a [n, 0] term; "pad" = k slots that are all padding.
ZERO_WIDTH_PATTERNS = {
    "first": [0, 37],
    "first_then_many": [0, 9, 20],
    "middle": [13, 0, 22],
    "last": [30, 11, 0],
    "several_in_a_row": [5, 0, 0, 0, 17],
    "leading_run": [0, 0, 0, 41],
    "all_but_one": [0, 0, 0, 0, 7, 0, 0],
    "alternating": [0, 3, 0, 12, 0, 8, 0],
    "all_padding_first": ["pad", 25],
}


def zero_width_terms(widths, dtype, gen, n_a=70, n_b=140):
    terms = []
    for i, w in enumerate(widths):
        if w == "pad":
            terms.append((rand((n_a, 6), dtype, gen), rand((n_b, 6), dtype, gen), torch.full((6,), -1), 1))
        elif i % 2:  # mapped, transposed A
            terms.append((rand((w, n_a), dtype, gen).t(), rand((n_b, w + 3), dtype, gen), rand_map(w, w + 3, gen), 1))
        else:  # identity map
            terms.append((rand((n_a, w), dtype, gen), rand((n_b, w), dtype, gen), None, 1))
    return terms


@pytest.mark.parametrize("pattern", list(ZERO_WIDTH_PATTERNS))
@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("fp32", torch.float64), ("tf32", torch.float32),
                                             ("fp32", torch.bfloat16)])
def test_cost_matrix_zero_width_term_drops_no_k_tile(pattern, precision, dtype):
    gen = torch.Generator().manual_seed(31)
    terms = zero_width_terms(ZERO_WIDTH_PATTERNS[pattern], dtype, gen)
    out, plan = emulated_cost(terms, precision, torch.float64 if dtype == torch.float64 else torch.float32)
    assert plan["launches"] == 1
    rnd = ROUND.get(precision, lambda x: x.double())
    want = ref_cost([(rnd(a.float() if a.dtype != torch.float64 else a), rnd(b.float() if b.dtype != torch.float64 else b),
                      m, blk) for a, b, m, blk in terms])
    tol = cost_tol(terms, torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_cost_matrix_zero_width_term_first_in_second_launch():
    """Terms beyond the per-launch limit start a new launch; that launch's first term has no tile."""
    gen = torch.Generator().manual_seed(32)
    per = E.limits()["cost_terms_per_launch"]
    widths = [5] * per + [0, 0, 19, 0]
    terms = zero_width_terms(widths, torch.float32, gen)
    out, plan = emulated_cost(terms)
    assert plan["launches"] == 2
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.double(), ref_cost(terms), rtol=tol, atol=tol)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_cost_matrix_half_inputs_emulated(in_dtype, precision):
    """float16/bfloat16 inputs are upcast while staging: the float32 kernels on the upcast values."""
    gen = torch.Generator().manual_seed(33)
    terms = [(rand((150, 70), in_dtype, gen), rand((131, 73), in_dtype, gen), rand_map(70, 73, gen), 1),
             (rand((40, 150), in_dtype, gen).t(), rand((131, 40), in_dtype, gen), None, 1)]
    out, _ = emulated_cost(terms, precision)
    rnd = ROUND.get(precision, lambda x: x)
    want = ref_cost([(rnd(a.float()), rnd(b.float()), m, blk) for a, b, m, blk in terms])
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    if precision == "fp32":  # the CPU backend computes the same (float32 accumulation, another order)
        torch.testing.assert_close(out, hetmerge.ops.cost_matrix(terms), rtol=tol, atol=tol)


# ---- stride 0 and other strides: the CUDA module takes what the CPU backend takes ----------------
@pytest.mark.parametrize("case", ["stride0_all_pad", "stride0_single", "negative", "strided", "empty", "contig"])
def test_cuda_fetch_index_map_any_stride(case):
    """The host copy of a device map: cudaMemcpy2D rejected a pitch of 0 (expanded map)."""
    if case == "stride0_all_pad":
        m = torch.tensor([-1]).expand(9)
    elif case == "stride0_single":
        m = torch.tensor([4]).expand(1)
    elif case == "negative":
        m = np.arange(10, dtype=np.int64)[::-3]  # numpy: torch has no negative strides (cupy does)
    elif case == "strided":
        m = torch.arange(30)[::4]
    elif case == "empty":
        m = torch.empty(0, dtype=torch.int64)
    else:
        m = torch.randperm(17)
    assert E.fetch_index_map(m) == np.asarray(m).tolist()


def test_cost_matrix_expanded_operands_and_map_emulated():
    """stride-0 A rows, B rows and an expanded all-padding map (the CPU backend took these)."""
    gen = torch.Generator().manual_seed(34)
    A = rand((1, 40), torch.float32, gen).expand(90, 40)
    B = rand((40, 1), torch.float32, gen).expand(40, 130).t()  # inner stride 0
    terms = [(A, B, None, 1), (rand((90, 6), torch.float32, gen), rand((130, 6), torch.float32, gen),
                               torch.tensor([-1]).expand(6), 1)]
    out, _ = emulated_cost(terms)
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.double(), ref_cost(terms), rtol=tol, atol=tol)
    torch.testing.assert_close(out, hetmerge.ops.cost_matrix(terms), rtol=tol, atol=tol)


def test_cuda_maps_validated_once_per_object():
    """CUDA maps are fetched and checked once per map object (each check syncs the stream), again
    after an in-place write, for another axis size, or for a new object; a failed check is not cached."""
    m = torch.randperm(12)
    assert E.map_checks([(m, 12)]) == [True]
    assert E.map_checks([(m, 12), (m, 12)]) == [False, False]
    assert E.map_checks([(m, 13)]) == [True]              # checked against another axis size
    m[0], m[1] = m[1].item(), m[0].item()                  # in-place write bumps torch's version
    assert E.map_checks([(m, 12)]) == [True]
    assert E.map_checks([(m.clone(), 12)]) == [True]      # same values, new object
    view = m[:]                                            # a view shares the version counter
    assert E.map_checks([(view, 12)]) == [True]
    m[2] = 99                                              # invalid now, written through the base
    with pytest.raises(ValueError, match=r"map_checks: maps\[0\]\[2\] = 99 is out of range"):
        E.map_checks([(view, 12)])
    with pytest.raises(ValueError, match="out of range"):
        E.map_checks([(view, 12)])                         # still invalid: the failure was not cached
    m[2] = -1
    assert E.map_checks([(torch.tensor([-1]).expand(5), 3)]) == [True]
    arr = np.arange(4)                                     # no version counter: checked every call
    assert E.map_checks([(arr, 4)]) == [True] and E.map_checks([(arr, 4)]) == [True]


# ---- errors: the same checks as the CPU backend --------------------------------------------------
def test_emulated_rejects_bad_maps_like_cpu():
    w = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"permute_pad: rows\[1\] = 7 is out of range for w.shape\[0\] = 5"):
        E.permute_pad(w, torch.tensor([0, 7]), None, torch.empty(2, 4))
    with pytest.raises(ValueError, match="repeats index 2"):
        E.permute_pad(w, torch.tensor([2, 2]), None, torch.empty(2, 4))


def test_emulated_cost_precision_errors():
    A = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="precision"):
        E.cost_matrix([(A.float(), A.float(), None, 1)], torch.empty(3, 3), precision="int8")
    with pytest.raises(ValueError, match="float32"):
        E.cost_matrix([(A, A, None, 1)], torch.empty(3, 3, dtype=torch.float64), precision="tf32")
