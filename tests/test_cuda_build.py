"""Facts about the built hetmerge._cuda, each checked against a source independent of our code:

- the machine code in the binary (cuobjdump) is exactly what the build was configured to hold
  (hetmerge._C.build_info(), i.e. CMAKE_CUDA_ARCHITECTURES): every `NN-real` as sm_NN SASS, every
  `NN-virtual` as sm_NN PTX, nothing else;
- the module is present exactly when the same build configured it (a missing _cuda is a failure);
- importing it maps no libcudart into the process (the runtime is linked statically), read from
  /proc/self/maps of a fresh interpreter whose loader path holds no CUDA directory;
- it is usable exactly when torch (which ships its own CUDA runtime) sees a GPU of compute
  capability 8.0 or newer.

Needs cuobjdump for the first (the CUDA toolkit's, or `pip install nvidia-cuda-cuobjdump`).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import hetmerge
from hetmerge import _backend, _C

BUILD = _C.build_info()
needs_cuda_module = pytest.mark.skipif(not BUILD["cuda_module"],
                                       reason="this build configured no CUDA module (no CUDA compiler, or HETMERGE_CUDA=OFF)")


def test_cuda_module_present_exactly_when_built():
    assert (_backend._cuda is not None) == BUILD["cuda_module"], (BUILD, _backend._CUDA_IMPORT_ERROR)


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


def _archs(listing: str, kind: str) -> set[str]:
    # cuobjdump lines: "ELF file    1: _cuda.1.sm_80.cubin" / "PTX file    1: _cuda.1.sm_90.ptx"
    return set(re.findall(rf"\.(sm_\d+a?)\.{kind}\b", listing))


@needs_cuda_module
def test_sass_and_ptx_are_exactly_the_configured_architectures():
    path = _backend._cuda.__file__
    tool = _cuobjdump()
    configured = [a for a in BUILD["cuda_architectures"].split(",") if a]
    want_sass = {f"sm_{a.split('-')[0]}" for a in configured if a.endswith("-real") or "-" not in a}
    want_ptx = {f"sm_{a.split('-')[0]}" for a in configured if a.endswith("-virtual") or "-" not in a}
    elf = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True)
    assert elf.returncode == 0, elf.stderr
    ptx = subprocess.run([tool, "--list-ptx", path], capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    assert _archs(elf.stdout, "cubin") == want_sass, elf.stdout
    assert _archs(ptx.stdout, "ptx") == want_ptx, ptx.stdout
    # The shipped default (docs/cuda.md): Ampere and Hopper SASS, Hopper PTX for newer GPUs.
    if "HETMERGE_CUDA_ARCHITECTURES" not in os.environ:
        assert configured == ["80-real", "90-real", "90-virtual"], configured


@needs_cuda_module
def test_import_maps_no_libcudart():
    """In a fresh interpreter with no CUDA directory on the loader path, import and query the module,
    then list the shared objects mapped into the process: the module adds no libcudart. (A CUDA
    build of torch maps its own libcudart when hetmerge imports it; that one is read before.)"""
    code = (
        "def libs():\n"
        "    maps = open('/proc/self/maps').read()\n"
        "    return sorted({l.split()[-1] for l in maps.splitlines() if '.so' in l.split()[-1]})\n"
        "import torch\n"
        "before = libs()\n"
        "import hetmerge._cuda as m\n"
        "reason = m.unavailable_reason()\n"
        "print(repr(reason)); print('\\n'.join(l for l in libs() if l not in before))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(hetmerge.__file__))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    added = run.stdout.splitlines()[1:]
    assert any("_cuda" in lib for lib in added), added
    assert not [lib for lib in added if "libcudart" in os.path.basename(lib)], added


@needs_cuda_module
def test_usable_exactly_when_torch_sees_an_ampere_or_newer_gpu():
    reason = _backend._cuda.unavailable_reason()
    torch_ok = torch.cuda.is_available() and any(
        torch.cuda.get_device_capability(d)[0] >= 8 for d in range(torch.cuda.device_count()))
    assert (reason == "") == torch_ok, reason
    assert hetmerge.cuda_available() == torch_ok
    if not torch_ok:
        assert reason.startswith(("no usable NVIDIA driver", "no CUDA device", "the CUDA runtime failed")), reason

