"""The package's metadata and data: what pip users and packagers get."""

from __future__ import annotations

import ast
import importlib.resources
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

ROOT = Path(__file__).resolve().parents[1]


def test_example_configs_and_unit_are_package_data() -> None:
    data = importlib.resources.files("egressd") / "data"
    for name, original in (
        ("egressd.toml", ROOT / "config" / "egressd.toml"),
        ("sources.toml", ROOT / "config" / "sources.toml"),
        ("egressd.service", ROOT / "systemd" / "egressd.service"),
        ("egressd.sysusers", ROOT / "systemd" / "egressd.sysusers"),
        ("egressd.tmpfiles", ROOT / "systemd" / "egressd.tmpfiles"),
    ):
        assert (data / name).read_text() == original.read_text(), name


def test_license_matches_the_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text


def imported_top_level_modules(package: Path) -> set[str]:
    modules: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    return modules


def test_runtime_dependencies_are_exactly_what_the_package_imports() -> None:
    """proxy-protocol is the tests' codec, so it is a test extra, not a dependency."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    imported = imported_top_level_modules(ROOT / "egressd")
    assert "proxyprotocol" not in imported
    assert not any(d.startswith("proxy-protocol") for d in project["dependencies"])
    assert any(d.startswith("proxy-protocol") for d in project["optional-dependencies"]["test"])
    distribution_modules = {
        "trio": "trio",
        "dnspython": "dns",
        "prometheus_client": "prometheus_client",
    }
    for requirement in project["dependencies"]:
        name = requirement.split(">")[0].split(";")[0].strip()
        if name in distribution_modules:
            assert distribution_modules[name] in imported, name
