"""The Python layer reads as a pipeline, and imports point down it only: a module may import
modules of its own level or lower, never a later stage (docs/architecture.md)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "hetmerge"

# level of every module (a package counts as one module); lower = closer to the primitives
LEVELS = {
    "_backend": 0, "_C": 0, "_cuda": 0,
    "ops": 1, "checkpoint": 1, "report": 1, "models": 1, "data": 1, "hf": 1,
    "maps": 2,
    "spec": 3,
    "trace": 4, "handlers": 4, "transformer_families": 4, "transformer_spec": 4, "transformer_layers": 4,
    "heads": 5, "pairing": 5,
    "methods": 6,
    "alignment": 7,
    "merging": 8, "tasks": 8, "many": 8, "repair": 8,
    "evaluate": 9, "hf_merge": 9, "search": 9, "fusion": 9,
    "assemble": 10,
    "architectures": 11, "options": 11, "plan": 11, "zoo": 11, "demo": 12, "benchmarks": 12, "fleet": 12,
    "cli": 13,
}


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    """(imported top-level hetmerge module, line) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    inner = len(path.relative_to(PKG).parts) - 1   # depth inside a subpackage
    typing_only = set()                              # imports under `if TYPE_CHECKING:` are annotations
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:                      # relative: resolve against the package root
                up = node.level - 1 - inner     # <0: inside this file's own subpackage
                if up >= 0 and node.module:
                    yield node.module.split(".")[0], node.lineno
                elif up >= 0:
                    for alias in node.names:
                        yield alias.name, node.lineno
            elif node.module and node.module.split(".")[0] == "hetmerge":
                parts = node.module.split(".")
                if len(parts) > 1:
                    yield parts[1], node.lineno
                else:
                    for alias in node.names:
                        yield alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "hetmerge" and len(parts) > 1:
                    yield parts[1], node.lineno


FILES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


def test_every_module_has_a_level():
    missing = sorted({_module_of(p) for p in FILES} - set(LEVELS))
    assert not missing, f"add these modules to LEVELS (and docs/architecture.md): {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down_the_pipeline(path):
    me = _module_of(path)
    up = [(name, line) for name, line in _imports(path)
          if name in LEVELS and name != me and LEVELS[name] > LEVELS[me]]
    assert not up, f"{path.relative_to(PKG)} (level {LEVELS[me]}) imports later stages: " + ", ".join(
        f"{n} (level {LEVELS[n]}, line {line})" for n, line in up)


def test_modules_stay_small_or_say_why():
    long = [str(p.relative_to(PKG)) for p in FILES
            if len(p.read_text().splitlines()) > 400 and "too long:" not in p.read_text()[:2000].lower()
            and "why this module is long" not in p.read_text()[:3000].lower()]
    assert not long, f"modules over 400 lines without a reason at their top: {long}"
