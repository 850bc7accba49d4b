"""The layering rule of docs/ARCHITECTURE.md: no library module imports an application module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "svdtune"
APPLICATIONS = {"models", "data", "evaldata", "userdata", "tasks", "lmtasks", "train", "checkpoint", "runrecord",
                "measure", "recipes", "references", "protocol", "suites", "bench", "cli", "demo",
                "__main__"}


def imported_modules(path: Path) -> set[str]:
    """svdtune modules `path` imports (relative or absolute), by their top-level name inside the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level:  # from .x import y / from ..x import y / from . import x
                names = [parts[0]] if parts[0] else [alias.name for alias in node.names]
            elif parts[0] == "svdtune":
                names = parts[1:2] or [alias.name for alias in node.names]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("svdtune."))
    return found


def test_no_library_module_imports_an_application_module() -> None:
    library = [p for p in PACKAGE.rglob("*.py") if p.stem not in APPLICATIONS or p.parent.name == "methods"]
    assert any(p.stem == "core" for p in library) and any(p.parent.name == "methods" for p in library)
    offending = {str(p.relative_to(PACKAGE)): sorted(imported_modules(p) & APPLICATIONS) for p in library}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_rule_sees_relative_and_absolute_imports(tmp_path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from .train import train\nfrom . import bench\nimport svdtune.recipes\nfrom ..core import A\n")
    assert imported_modules(sample) == {"train", "bench", "recipes", "core"}
