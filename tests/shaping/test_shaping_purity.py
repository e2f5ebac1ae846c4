"""egressd.shaping stays pure: no trio, no sockets, no clock, and no upward imports."""

from __future__ import annotations

import ast
from pathlib import Path

import egressd.shaping

PACKAGE = Path(egressd.shaping.__file__).parent
ALLOWED_EGRESSD = ("egressd.shaping", "egressd.addresses", "egressd.kumo_grammar")
FORBIDDEN = {"trio", "socket", "asyncio", "time", "selectors", "threading", "dns"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_shaping_imports_only_the_standard_library_and_itself() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if top == "egressd":
                assert name.startswith(ALLOWED_EGRESSD), f"{path.name} imports {name}"
