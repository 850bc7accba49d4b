"""The layering rule of docs/ARCHITECTURE.md, checked from the imports themselves.

The library (top-level modules and `methods/`) never imports an application subpackage, and the applications only
import downwards: data <- train <- experts, analysis <- bench <- cli (each may use everything to its left and the
library, nothing to its right)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "svdtune"
# The application subpackages, lowest layer first; an entry may import the library and the entries before it.
LAYERS = ["data", "train", "experts", "analysis", "bench", "cli"]
ENTRY_POINTS = {"__main__.py"}  # `python -m svdtune`: the command line's front door


def imported_modules(path: Path) -> set[str]:
    """Absolute dotted names of the svdtune modules `path` imports (relative or absolute imports)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = ["svdtune", *parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "svdtune":
                module = node.module
            else:
                continue
            found.update(f"{module}.{a.name}" for a in node.names) if not node.module else found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "svdtune")
    return found


def layer_of(module: str) -> str | None:
    """The application layer a dotted svdtune name belongs to, or None for the library."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def violations() -> dict[str, list[str]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if str(rel) in ENTRY_POINTS:
            continue
        mine = rel.parts[0] if rel.parts[0] in LAYERS else None
        allowed = set(LAYERS[: LAYERS.index(mine) + 1]) if mine else set()
        bad = sorted(m for m in imported_modules(path) if layer_of(m) is not None and layer_of(m) not in allowed)
        if bad:
            found[str(rel)] = bad
    return found


def test_the_library_never_imports_an_application_and_applications_import_only_downwards() -> None:
    library = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in LAYERS]
    assert {p.stem for p in library} >= {"core", "inject", "io", "linalg", "fused", "allocate"}
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(
        LAYERS + ["methods"])
    assert violations() == {}


def test_every_subpackage_says_what_it_is_for() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 10, f"{init.relative_to(PACKAGE)} needs a docstring paragraph"


def test_the_rule_sees_relative_and_absolute_imports(tmp_path, monkeypatch) -> None:
    sample = PACKAGE / "data" / "x.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "from ..train.loop import train\nfrom .. import bench\nimport svdtune.cli\nfrom ..core import A\n"
        "from .models import load_model\n"))
    assert imported_modules(sample) == {"svdtune.train.loop", "svdtune.bench", "svdtune.cli", "svdtune.core",
                                        "svdtune.data.models"}
    assert {layer_of(m) for m in imported_modules(sample)} == {"train", "bench", "cli", None, "data"}
