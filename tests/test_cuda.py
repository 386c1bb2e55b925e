"""hetmerge.ops on CUDA tensors against the CPU backend (runs where a GPU exists; skips only without one).

Data movement and index outputs must match the CPU exactly. interpolate and weighted_sum are built
without FMA contraction and use the CPU's formula and conversions, so they are compared bit for bit
too. cost_matrix sums in a different order than the CPU: fp32/fp64 are compared within 4·eps·k; the
tensor-core precisions against the fp64 product of operands rounded to their format (docs/cuda.md).
"""
from __future__ import annotations

import pytest
import torch

import hetmerge
from hetmerge import _backend, ops

# The one reason to skip: no GPU. A GPU with a missing or unusable CUDA module is a failure (the
# module is built whenever the build finds nvcc; tests/test_cuda_build.py checks that it is).
if not torch.cuda.is_available():
    pytest.skip(f"no CUDA device visible to torch (torch {torch.__version__}, built for CUDA {torch.version.cuda})",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _backend_usable():
    if not hetmerge.cuda_available():
        pytest.fail(f"torch sees a GPU but hetmerge's CUDA backend is unusable: {_backend.cuda_status()}")

from test_cuda_emulated import (  # noqa: E402  (shared pure-torch references and helpers)
    DTYPES, ROUND, cost_tol, rand, rand_map, ref_cost, ref_permute_pad)

DEV = torch.device("cuda")


def cuda(x):
    return None if x is None else x.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nr,nc", [((37, 29), 41, 23), ((64, 64), 64, None), ((5, 7, 3, 3), 9, 4),
                                        ((130,), 150, None), ((512, 1000), 500, 1003), ((3, 4), 0, 4)])
def test_permute_pad_cuda_equals_cpu(dtype, shape, nr, nc):
    gen = torch.Generator().manual_seed(0)
    w = rand(shape, dtype, gen)
    rows = rand_map(nr, shape[0], gen) if nr is not None else None
    cols = rand_map(nc, shape[1], gen) if nc is not None else None
    got = ops.permute_pad(cuda(w), cuda(rows), cuda(cols))
    assert got.is_cuda
    assert torch.equal(got.cpu(), ref_permute_pad(w, rows, cols))


def test_permute_pad_cuda_strided():
    gen = torch.Generator().manual_seed(1)
    w = rand((20, 9, 3, 5), torch.float16, gen).to(DEV).permute(1, 0, 3, 2)
    rows, cols = rand_map(11, 9, gen), rand_map(25, 20, gen)
    got = ops.permute_pad(w, cuda(rows), cuda(cols))
    assert torch.equal(got.cpu(), ref_permute_pad(w.cpu(), rows, cols))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", ["zero", "base"])
def test_interpolate_cuda_equals_cpu(dtype, fill):
    gen = torch.Generator().manual_seed(2)
    a, b = rand((300, 200, 3), dtype, gen), rand((310, 190, 3), dtype, gen)
    rows, cols = rand_map(300, 310, gen), rand_map(200, 190, gen)
    lambdas = torch.linspace(0, 1, 70).tolist()  # > 64: two launches
    want = ops.interpolate(a, b, lambdas, rows, cols, fill=fill)
    got = ops.interpolate(cuda(a), cuda(b), lambdas, cuda(rows), cuda(cols), fill=fill)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tensors", [1, 4, 20])
def test_weighted_sum_cuda_equals_cpu(dtype, n_tensors):
    gen = torch.Generator().manual_seed(3)
    xs = [rand((129, 65), dtype, gen) for _ in range(n_tensors)]
    xs[0] = xs[0].t().contiguous().t()  # one strided input
    coeffs = torch.randn(3, n_tensors, generator=gen, dtype=torch.float64)
    want = ops.weighted_sum(xs, coeffs)
    got = ops.weighted_sum([cuda(x) for x in xs], coeffs)
    assert torch.equal(got.cpu(), want)


def _terms(dtype, gen):
    n_a, n_b = 300, 257
    return [(rand((n_a, 130), dtype, gen), rand((n_b, 140), dtype, gen), rand_map(130, 140, gen), 1),
            (rand((n_a, 6 * 9), dtype, gen), rand((n_b, 8 * 9), dtype, gen), rand_map(6, 8, gen), 9),
            (rand((100, n_a), dtype, gen).t(), rand((n_b, 100), dtype, gen), None, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cost_matrix_cuda(dtype):
    gen = torch.Generator().manual_seed(4)
    terms = _terms(dtype, gen)
    got = hetmerge._backend._cuda  # entry point with the precision option
    out = torch.empty(300, 257, dtype=dtype, device=DEV)
    got.cost_matrix([(cuda(A), cuda(B), cuda(m), blk) for A, B, m, blk in terms], out,
                    stream=torch.cuda.current_stream().cuda_stream)
    tol = cost_tol(terms, dtype)
    torch.testing.assert_close(out.cpu().double(), ref_cost(terms), rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_cost_matrix_cuda_tensor_cores(precision):
    gen = torch.Generator().manual_seed(5)
    terms = _terms(torch.float32, gen)
    out = torch.empty(300, 257, device=DEV)
    hetmerge._backend._cuda.cost_matrix([(cuda(A), cuda(B), cuda(m), blk) for A, B, m, blk in terms], out,
                                        stream=torch.cuda.current_stream().cuda_stream, precision=precision)
    rnd = ROUND[precision]
    rounded = [(rnd(A), rnd(B), m, blk) for A, B, m, blk in terms]
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.cpu().double(), ref_cost(rounded), rtol=tol, atol=tol)


def test_linear_assignment_cuda_equals_cpu():
    cost = torch.randn(40, 55, dtype=torch.float64)
    try:
        want = ops.linear_assignment(cost, maximize=True)
    except RuntimeError as exc:  # the CPU solver lands on its own branch
        pytest.skip(str(exc))
    for c in (cost.to(DEV), cost.t().contiguous().to(DEV).t()):
        r, col = ops.linear_assignment(c, maximize=True)
        assert r.is_cuda and col.is_cuda
        assert torch.equal(r.cpu(), want[0]) and torch.equal(col.cpu(), want[1])


def test_bad_cuda_map_raises_value_error_naming_argument():
    w = torch.randn(5, 4, device=DEV)
    with pytest.raises(ValueError, match=r"permute_pad: rows\[1\] = 7 is out of range for w.shape\[0\] = 5"):
        ops.permute_pad(w, torch.tensor([0, 7], device=DEV))
    with pytest.raises(ValueError, match=r"permute_pad: cols repeats index 1 at positions 0 and 2"):
        ops.permute_pad(w, None, torch.tensor([1, 0, 1], device=DEV))
    A = torch.randn(6, 3, device=DEV)
    with pytest.raises(ValueError, match=r"terms\[0\].map\[2\] = 9"):
        ops.cost_matrix([(A, A, torch.tensor([0, 1, 9], device=DEV))])


def test_device_mix_is_rejected():
    w = torch.randn(5, 4, device=DEV)
    with pytest.raises(ValueError, match="interpolate: b is on cpu"):
        ops.interpolate(w, torch.randn(5, 4), [0.5])


def test_runs_on_the_callers_stream():
    """Work is queued on torch's current stream: results are ready after that stream syncs."""
    s = torch.cuda.Stream()
    a = torch.randn(2048, 2048, device=DEV)
    with torch.cuda.stream(s):
        b = a * 2  # produced on s
        out = ops.interpolate(a, b, [0.5])
    s.synchronize()
    torch.testing.assert_close(out[0], a * 1.5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    w = torch.randn(50, 40, device="cuda:1")
    rows = torch.randperm(50, device="cuda:1")
    got = ops.permute_pad(w, rows)
    assert got.device == w.device
    assert torch.equal(got.cpu(), w.cpu()[rows.cpu()])


# ---- float16 / bfloat16 cost_matrix, stride-0 inputs, map validation -----------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_cost_matrix_cuda_half_inputs(dtype, precision):
    gen = torch.Generator().manual_seed(6)
    terms = _terms(dtype, gen)
    out = ops.cost_matrix([(cuda(A), cuda(B), cuda(m), blk) for A, B, m, blk in terms], precision=precision)
    assert out.dtype == torch.float32 and out.is_cuda
    rnd = ROUND.get(precision, lambda x: x)
    want = ref_cost([(rnd(A.float()), rnd(B.float()), m, blk) for A, B, m, blk in terms])
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)


def test_cost_matrix_cuda_zero_width_first_term():
    """The kernel dropped a k-tile when a launch's first term had zero width."""
    gen = torch.Generator().manual_seed(7)
    terms = [(rand((300, 0), torch.float32, gen), rand((257, 0), torch.float32, gen), None, 1)] + _terms(torch.float32, gen)
    out = ops.cost_matrix([(cuda(A), cuda(B), cuda(m), blk) for A, B, m, blk in terms])
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(out.cpu().double(), ref_cost(terms), rtol=tol, atol=tol)


def test_expanded_inputs_work_on_cuda_as_on_cpu():
    """stride-0 (expanded) operands, costs and maps: accepted by the CPU backend, so by CUDA too."""
    gen = torch.Generator().manual_seed(8)
    A = rand((1, 40), torch.float32, gen).expand(90, 40)
    B = rand((40, 1), torch.float32, gen).expand(40, 130).t()
    pad = torch.tensor([-1]).expand(6)
    terms = [(A, B, None, 1), (rand((90, 6), torch.float32, gen), rand((130, 6), torch.float32, gen), pad, 1)]
    got = ops.cost_matrix([(cuda(a), cuda(b), cuda(m), blk) for a, b, m, blk in terms])
    tol = cost_tol(terms, torch.float32)
    torch.testing.assert_close(got.cpu().double(), ref_cost(terms), rtol=tol, atol=tol)
    w = rand((5, 7), torch.float32, gen)
    rows = torch.tensor([-1]).expand(4)
    assert torch.equal(ops.permute_pad(cuda(w), cuda(rows)).cpu(), torch.zeros(4, 7))
    assert torch.equal(ops.interpolate(cuda(w), cuda(w), [0.5], None, cuda(torch.tensor([-1]).expand(7))).cpu(),
                       ops.interpolate(w, w, [0.5], None, torch.tensor([-1]).expand(7)))
    cost = torch.randn(1, 30, dtype=torch.float64).expand(20, 30)  # every row the same: ties everywhere
    r, c = ops.linear_assignment(cost.to(DEV), maximize=True)
    r0, c0 = ops.linear_assignment(cost, maximize=True)
    assert cost[r.cpu(), c.cpu()].sum() == cost[r0, c0].sum()
    assert len(set(c.cpu().tolist())) == 20


def test_cuda_map_revalidated_after_in_place_write():
    """Maps are checked once per object; an in-place write makes the next call check it again."""
    w = torch.randn(5, 4, device=DEV)
    rows = torch.tensor([4, 0, -1], device=DEV)
    first = ops.permute_pad(w, rows)
    assert torch.equal(ops.permute_pad(w, rows), first)
    rows[1] = 9
    with pytest.raises(ValueError, match=r"permute_pad: rows\[1\] = 9 is out of range for w.shape\[0\] = 5"):
        ops.permute_pad(w, rows)
