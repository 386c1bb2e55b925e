"""The built hetmerge._cuda really holds sm_80 and sm_90 machine code (plus PTX for newer GPUs).

Needs cuobjdump: from the CUDA toolkit, or `pip install nvidia-cuda-cuobjdump` (its binary lands in
site-packages/nvidia/cu13/bin or .../cuda_cuobjdump/bin). Skips with the reason when the module was
not built or no cuobjdump is found.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest


def _cuda_module_path():
    try:
        from hetmerge import _cuda  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"hetmerge._cuda was not built ({exc})")
    return _cuda.__file__


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    roots += [os.path.join(p, "nvidia") for p in sys.path if p.endswith("site-packages")]
    for root in roots:
        for cand in glob.glob(os.path.join(root, "**", "bin", "cuobjdump"), recursive=True) if root else []:
            if os.access(cand, os.X_OK):
                return cand
    pytest.skip("no cuobjdump found (pip install nvidia-cuda-cuobjdump, or a CUDA toolkit with it)")


def test_cuda_module_contains_sm80_sm90_and_ptx():
    path = _cuda_module_path()
    tool = _cuobjdump()
    elf = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True)
    assert elf.returncode == 0, elf.stderr
    assert ".sm_80." in elf.stdout, elf.stdout
    assert ".sm_90." in elf.stdout, elf.stdout
    ptx = subprocess.run([tool, "--list-ptx", path], capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    assert "sm_90" in ptx.stdout, ptx.stdout


def test_cuda_module_imports_without_libcudart():
    """The runtime is linked statically: nothing in the module's dynamic section names libcudart."""
    path = _cuda_module_path()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf")
    dyn = subprocess.run([readelf, "-d", path], capture_output=True, text=True).stdout
    assert "libcudart" not in dyn, dyn


def test_unavailable_reason_is_a_string():
    _cuda_module_path()
    from hetmerge import _cuda

    reason = _cuda.unavailable_reason()
    assert isinstance(reason, str)
    import hetmerge

    assert hetmerge.cuda_available() == (reason == "")
