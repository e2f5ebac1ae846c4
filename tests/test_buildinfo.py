"""egressd says which build runs: pure Python, or its sans-IO layers compiled by mypyc.

scripts/test runs this file in both passes: pure, and against the compiled build (where it
also proves that ``python -m egressd`` started from the checkout, as the integration tests
start their daemons, imports the compiled build and not the checkout's .py files).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from egressd import __version__, buildinfo
from egressd.proto import smtp_client, smtp_server
from egressd.relay import core

REPO = Path(__file__).resolve().parents[1]


def module_from(file: str) -> ModuleType:
    module = ModuleType("fake")
    module.__file__ = file
    return module


def test_an_extension_module_is_compiled_a_python_file_is_not() -> None:
    assert buildinfo.is_compiled(module_from("/x/smtp_server.cpython-311-x86_64-linux-gnu.so"))
    assert buildinfo.is_compiled(module_from("/x/smtp_server.abi3.so"))
    assert not buildinfo.is_compiled(module_from("/x/smtp_server.py"))
    assert not buildinfo.is_compiled(module_from("/x/smtp_server.pyc"))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (("a.py", "b.py"), "pure Python"),
        (
            ("a.cpython-311-x86_64-linux-gnu.so", "b.cpython-311-x86_64-linux-gnu.so"),
            "compiled (mypyc)",
        ),
        (("a.cpython-311-x86_64-linux-gnu.so", "b.py"), "partly compiled (mypyc)"),
    ],
)
def test_the_build_is_compiled_only_when_every_hot_path_module_is(
    monkeypatch: pytest.MonkeyPatch, files: tuple[str, ...], expected: str
) -> None:
    monkeypatch.setattr(buildinfo, "_HOT_PATH", tuple(module_from(file) for file in files))
    assert buildinfo.build() == expected


def test_version_names_the_build_this_process_imported() -> None:
    """Run from the checkout as the integration tests run their daemons."""
    loaded = [buildinfo.is_compiled(module) for module in (smtp_server, smtp_client, core)]
    assert len(set(loaded)) == 1, "a build with only some hot-path modules compiled"
    expected = "compiled (mypyc)" if loaded[0] else "pure Python"
    done = subprocess.run(
        [sys.executable, "-m", "egressd", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert done.stdout == f"egressd {__version__}, {expected}\n"
