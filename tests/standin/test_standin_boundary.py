"""The stand-in's boundary: a package of its own that never reaches back into tests/ and uses
only its libraries' public modules (kmock's private methods it calls are behind an exact pin).

Real: the stand-in's source, read with `ast`; pyproject.toml. Nothing runs or is emulated.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "standin"
TEST_HELPERS = {p.stem for p in (ROOT / "tests" / "support").glob("*.py")} | {"tests", "conftest"}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_stand_in_imports_nothing_from_the_tests() -> None:
    reach = {
        (path.name, name)
        for path in STANDIN.glob("*.py")
        for name in imported(path)
        if name.split(".")[0] in TEST_HELPERS
    }
    assert reach == set()


def test_the_stand_in_imports_no_private_module_of_a_library() -> None:
    private = {
        (path.name, name)
        for path in STANDIN.glob("*.py")
        for name in imported(path)
        if any(part.startswith("_") and part != "__future__" for part in name.split("."))
    }
    assert private == set()


def test_kmock_is_pinned_exactly_for_the_private_methods_the_api_server_calls() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "kmock==0.8" in dev["dev"]
    assert "kmock==0.8" in (STANDIN / "apiserver.py").read_text(encoding="utf-8")
