"""The DLPack boundary, thread settings and outputs: what crosses into C++ and what comes back."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hetmerge
from hetmerge import ops
from reference import interpolate_ref, permute_pad_ref


class ForeignArray:
    """A DLPack producer that is neither torch nor numpy (like cupy or jax would be)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, **kwargs):
        return self._t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_foreign_producer_comes_back_as_torch():
    w = torch.randn(4, 3)
    out = ops.permute_pad(ForeignArray(w), [3, -1])
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, permute_pad_ref(w, [3, -1]), rtol=0, atol=0)


def test_out_is_written_in_place_zero_copy():
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    out = torch.empty(3, 64, 32)
    ptr = out.data_ptr()
    res = ops.interpolate(a, b, [0, 0.5, 1], out=out)
    assert res is out and res.data_ptr() == ptr


def test_large_outputs_are_ordinary_tensors():
    """Outputs above the huge-page threshold live in their own mapping; they must behave normally."""
    a = torch.randn(1024, 4096)  # 3 planes of 16 MiB: above HUGE_PAGE_MIN_BYTES
    out = ops.interpolate(a, a, [0.25, 0.75, 1.0])
    assert out.is_contiguous() and out.shape == (3, 1024, 4096)
    torch.testing.assert_close(out[2], a, rtol=0, atol=0)
    kept = out[1].clone()
    del out
    torch.testing.assert_close(kept, a, rtol=0, atol=0)
    n = ops.permute_pad(np.tile(a.numpy(), (2, 2)), np.arange(2048)[::-1].copy())
    assert isinstance(n, np.ndarray) and n.flags.writeable
    np.testing.assert_array_equal(n, np.tile(a.numpy(), (2, 2))[::-1])


def test_numpy_negative_strides():
    w = np.arange(20.0).reshape(4, 5)[::-1, ::-2]
    rows = [3, 0, -1]
    np.testing.assert_array_equal(ops.permute_pad(w, rows), permute_pad_ref(torch.from_numpy(w.copy()), rows).numpy())


def test_int32_maps_are_accepted():
    w = torch.randn(4, 3)
    torch.testing.assert_close(ops.permute_pad(w, torch.tensor([2, -1], dtype=torch.int32)),
                               permute_pad_ref(w, [2, -1]), rtol=0, atol=0)


def test_read_only_out_is_refused():
    w = np.ones((3, 2))
    out = np.empty((3, 2))
    out.flags.writeable = False
    with pytest.raises((ValueError, TypeError), match="out"):
        ops.permute_pad(w, [0, 1, 2], out=out)


def test_unsupported_dtypes_name_the_argument():
    with pytest.raises(TypeError, match="w must be float32, float64, float16 or bfloat16, got int64"):
        ops.permute_pad(torch.ones(2, 2, dtype=torch.int64), [0])
    with pytest.raises(TypeError, match="a has an unsupported dtype"):
        ops.interpolate(torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.complex64), [0.5])


def test_thread_setting_gives_identical_results():
    a, b = torch.randn(300, 200), torch.randn(150, 400)
    rows, cols = np.arange(300) % 150, np.r_[np.arange(200) * 2]
    rows = np.where(np.arange(300) < 150, rows, -1)
    before = hetmerge.get_num_threads()
    try:
        hetmerge.set_num_threads(1)
        one = ops.interpolate(a, b, [0.3, 0.7], rows, cols)
        hetmerge.set_num_threads(3)
        three = ops.interpolate(a, b, [0.3, 0.7], rows, cols)
    finally:
        hetmerge.set_num_threads(before)
    assert torch.equal(one, three)
    torch.testing.assert_close(one, interpolate_ref(a, b, [0.3, 0.7], rows, cols))
    with pytest.raises(ValueError, match="n must be a positive int"):
        hetmerge.set_num_threads(0)


def test_default_threads_follow_torch():
    code = "import torch; torch.set_num_threads(1); import hetmerge; print(hetmerge.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_survives_fork():
    """A forked child (DataLoader workers) must not deadlock on the parent's thread pool."""
    a = torch.randn(600, 600)
    ops.interpolate(a, a, [0.5])  # start the pool in the parent
    code = (
        "import os, torch, hetmerge; from hetmerge import ops\n"
        "a = torch.randn(600, 600); ops.interpolate(a, a, [0.5])\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    r = ops.interpolate(a, a, [0.5]); os._exit(0 if torch.equal(r[0], a) else 3)\n"
        "_, status = os.waitpid(pid, 0); print(os.waitstatus_to_exitcode(status))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0", out.stderr


def test_concurrent_callers_share_the_pool_safely():
    """Python threads calling at once (the GIL is released in C++) get correct, independent results."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    cases = []
    for i in range(8):
        a, b = torch.randn(200 + i, 300), torch.randn(150, 320)
        rows = np.full(200 + i, -1)
        rows[rng.choice(200 + i, 150, replace=False)] = rng.permutation(150)
        cols = rng.choice(320, 300, replace=False)
        cases.append((a, b, rows, cols))

    def run(case):
        a, b, rows, cols = case
        return [ops.interpolate(a, b, [0.25, 0.5], rows, cols) for _ in range(20)][-1]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, cases))
    for (a, b, rows, cols), got in zip(cases, results):
        torch.testing.assert_close(got, interpolate_ref(a, b, [0.25, 0.5], rows, cols))
