"""Environment for tests that run hetmerge in a subprocess: the child imports the same hetmerge as
this process (the installed wheel in CI, a source tree with built extensions in development), never
a source folder without its compiled modules."""
from __future__ import annotations

import os

import hetmerge


def subprocess_env(*extra_paths: str, **overrides: str) -> dict[str, str]:
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(hetmerge.__file__)))
    path = [package_parent, *extra_paths, os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **overrides)
