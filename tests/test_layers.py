"""The layer contracts of pyproject.toml hold (also run by scripts/test as lint-imports).

Here too, so that the plain pytest run every engineer does catches an import that points
up a layer (daemon <- observe, say) or trio in a pure layer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed: pip install -e '.[test]'")
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_directory_of_the_package_is_a_regular_package() -> None:
    """A directory without __init__.py is left out of the wheel (find_packages) and out of
    the layer contracts (lint-imports sees no module there), silently."""
    package = ROOT / "egressd"
    directories = [
        path
        for path in [package, *package.rglob("*")]
        if path.is_dir() and path.name != "__pycache__" and any(path.glob("*.py"))
    ]
    assert directories
    assert [d for d in directories if not (d / "__init__.py").exists()] == []
