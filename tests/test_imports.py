"""`import hetmerge` stays light: the core install is torch, numpy and safetensors; the command line,
the demo and the benchmarks are extras imported only where they are used."""
import json
import subprocess
import sys

EXTRAS_ONLY = ("matplotlib", "sklearn", "yaml", "mnist1d", "scipy", "lapx", "tqdm")


def test_import_hetmerge_does_not_import_extras():
    # A fresh interpreter: this test process has imported the extras already. torch itself imports
    # tqdm in some builds, so only modules hetmerge adds on top of `import torch` count.
    code = ("import sys, json; import torch; before = set(sys.modules); import hetmerge; "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    added = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                      text=True).stdout)
    assert not [m for m in added if m in EXTRAS_ONLY], added
