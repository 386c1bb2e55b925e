"""A bounded slice of bench/fuzz_primitives.py (the full run is >= 100,000 calls), and the
regressions its findings pinned."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from hetmerge import ops
from subprocess_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_primitives", os.path.join(ROOT, "bench", "fuzz_primitives.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_slice_has_no_crash_and_no_wrong_result():
    fuzz = load_fuzzer()
    env = subprocess_env()
    res = fuzz.fuzz(calls=3000, seed=2024, jobs=2, batch=500, env=env)
    report = fuzz.summary(res)
    assert res["calls"] == 3000, report  # every batch answered
    assert not res["crashes"], report
    assert res["wrong_count"] == 0, report
    for prim in fuzz.PRIMITIVES:  # each primitive ran, and both accepted and rejected inputs
        assert res["per"][prim].get("ok", 0) > 0 and res["per"][prim].get("rejected", 0) > 0, report


@pytest.mark.parametrize("flip_axis", [0, 1])
@pytest.mark.parametrize("maps", [(None, None), ([2, -1, 0, 1], None), (None, [3, -1, 0, 1]), ([2, 0, 1], [1, 3, -1, 0])])
def test_permute_pad_negative_strides_with_trailing_dims(flip_axis, maps):
    # Found by the fuzzer: with trailing dims, a real element's offset from w's data pointer can be
    # negative for numpy's reversed views, and was taken for the padding marker (-1): zeros out.
    x = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    w = np.flip(np.ascontiguousarray(np.flip(x, flip_axis)), flip_axis)
    assert w.strides[flip_axis] < 0 and np.array_equal(w, x)
    rows, cols = maps
    ref = x
    if rows is not None:
        ref = np.where(np.array(rows)[:, None, None] >= 0, ref[rows], 0)
    if cols is not None:
        ref = np.where(np.array(cols)[None, :, None] >= 0, ref[:, cols], 0)
    np.testing.assert_array_equal(ops.permute_pad(w, rows, cols), ref)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("primitive", ["permute_pad_rows", "permute_pad_cols", "interpolate_rows", "interpolate_cols",
                                       "cost_matrix_map"])
def test_out_overlapping_an_index_map_is_rejected(framework, primitive):
    # Found by the fuzzer: out= was checked against the data inputs but not the index maps, which
    # are read while out is written; out over a map's bytes gathered from garbage indices (segfault).
    import torch

    fuzz = load_fuzzer()  # its alias_map_out builds the shared buffer
    rng = np.random.default_rng(0)
    vals = np.array([2, 0, -1, 1], dtype=np.int64)
    a = rng.standard_normal((4, 4))
    b = rng.standard_normal((3, 3))
    if framework == "torch":
        a, b = torch.from_numpy(a), torch.from_numpy(b)
    kind, axis = primitive.rsplit("_", 1)
    if kind == "permute_pad":
        m, out = fuzz.alias_map_out(vals, [4, 3] if axis == "rows" else [3, 4], "float64", framework)
        call = lambda: ops.permute_pad(b, m, None, out=out) if axis == "rows" else ops.permute_pad(b, None, m, out=out)  # noqa: E731
    elif kind == "interpolate":
        m, out = fuzz.alias_map_out(vals, [1, 4, 4], "float64", framework)
        full = np.array([0, 1, 2, -1])
        call = lambda: ops.interpolate(a, b, [0.5], m if axis == "rows" else full, full if axis == "rows" else m, out=out)  # noqa: E731
    else:
        m, out = fuzz.alias_map_out(vals, [4, 3], "float64", framework)
        B = rng.standard_normal((3, 3))
        B = torch.from_numpy(B) if framework == "torch" else B
        call = lambda: ops.cost_matrix([(a, B, m)], out=out)  # noqa: E731
    before = fuzz.f64(m).copy()
    with pytest.raises(ValueError, match="out overlaps the memory of (rows|cols|terms\\[0\\].map)"):
        call()
    np.testing.assert_array_equal(fuzz.f64(m), before)  # nothing was written
