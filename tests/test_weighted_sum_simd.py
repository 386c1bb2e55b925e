"""weighted_sum's vectorized CPU loops (16-byte portable, 32-byte AVX2, non-temporal stores for large
outputs) must round exactly like the scalar sum 0 + c_0·x_0 + c_1·x_1 + ... in the accumulator type:
checked bit for bit against numpy float32 arithmetic, over lengths that hit the alignment peel, whole
64-byte steps and the tail, on both loops (HETMERGE_NO_AVX2=1 selects the portable one per call)."""
import numpy as np
import pytest
import torch

from hetmerge import ops


def sequential_sum_f32(xs, coeffs):
    """[K, n] float32: 0 + c[k,0]*x_0 + c[k,1]*x_1 + ..., one IEEE rounding per operation."""
    c = np.asarray(coeffs, dtype=np.float64).astype(np.float32)
    x32 = [x.float().numpy().reshape(-1) for x in xs]
    out = np.zeros((c.shape[0], x32[0].size), dtype=np.float32)
    with np.errstate(all="ignore"):  # inf - inf, overflow: IEEE results wanted
        for k in range(c.shape[0]):
            s = np.zeros_like(x32[0])
            for t, x in enumerate(x32):
                s = s + c[k, t] * x
            out[k] = s
    return out


def bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_bit_exact(got, want):
    got = got.reshape(want.shape)
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    assert torch.equal(bits(got)[~nan], bits(want)[~nan])


def awkward_inputs(n, n_tensors, dtype, gen, misalign):
    """Wide-range values with signed zeros, infinities, subnormals and a NaN; optionally starting
    one element past an aligned buffer (so the loop peels before its first aligned step)."""
    xs = []
    for t in range(n_tensors):
        v = torch.randn(n + 1, generator=gen, dtype=torch.float64) * torch.exp(3 * torch.randn(n + 1, generator=gen, dtype=torch.float64))
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-41, -3e-39, 3e38, 1.0 + 2 ** -8])
        if n > 40:
            v[t + 1 : t + 1 + len(special)] = special.double()
        if n > 100 and t == 0:
            v[77] = float("nan")
        x = v.to(dtype)
        xs.append(x[1:] if misalign else x[:n])
    return xs


@pytest.mark.parametrize("avx2", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000, 4099])
@pytest.mark.parametrize("T,K", [(1, 1), (3, 4), (8, 1), (2, 11)])
@pytest.mark.parametrize("misalign", [False, True])
def test_weighted_sum_vector_loop_is_bit_exact(monkeypatch, avx2, dtype, n, T, K, misalign):
    monkeypatch.setenv("HETMERGE_NO_AVX2", "0" if avx2 == "1" else "1")
    gen = torch.Generator().manual_seed(n * 100 + T * 10 + K)
    xs = awkward_inputs(n, T, dtype, gen, misalign)
    coeffs = torch.randn(K, T, generator=gen, dtype=torch.float64)
    coeffs[0, 0] = -0.0  # 0 + (-0·x) must give +0 where x > 0
    base = torch.empty(K * n + 1, dtype=dtype)
    out = (base[1:] if misalign else base[:-1]).view(K, n)
    ops.weighted_sum(xs, coeffs, out=out)
    want = torch.from_numpy(sequential_sum_f32(xs, coeffs.numpy())).to(dtype)
    assert_bit_exact(out, want)


@pytest.mark.parametrize("avx2", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_streamed_output_is_bit_exact(monkeypatch, avx2, dtype):
    """Outputs of 4 MiB or more take the non-temporal store path; misaligned and with a tail here."""
    monkeypatch.setenv("HETMERGE_NO_AVX2", "0" if avx2 == "1" else "1")
    gen = torch.Generator().manual_seed(7)
    n, T, K = (1 << 20) + 24, 3, 4  # a multiple of 8 (planes share their alignment), not of a step
    xs = awkward_inputs(n, T, dtype, gen, misalign=True)
    coeffs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, -1.0, 1.0]])
    out = torch.empty(K * n + 1, dtype=dtype)[1:].view(K, n)
    ops.weighted_sum(xs, coeffs, out=out)
    assert_bit_exact(out, torch.from_numpy(sequential_sum_f32(xs, coeffs.numpy())).to(dtype))


def test_weighted_sum_strided_and_many_inputs_are_bit_exact():
    """Inputs with a non-unit inner stride are gathered per tile; more than 64 inputs chain partial
    sums in float32: both keep the one-pass rounding."""
    gen = torch.Generator().manual_seed(3)
    T, K = 70, 2
    xs = [torch.randn(37, 90, generator=gen)[:, ::2] for _ in range(T)]
    coeffs = torch.randn(K, T, generator=gen, dtype=torch.float64)
    out = ops.weighted_sum(xs, coeffs)
    want = torch.from_numpy(sequential_sum_f32([x.contiguous() for x in xs], coeffs.numpy()))
    assert_bit_exact(out, want.view(K, 37, 45))
