"""systemd/egressd.service passes ``systemd-analyze verify`` and agrees with scripts/install.

``verify`` rejects an ExecStart whose binary does not exist, so the test verifies a copy
whose ExecStart points at this checkout's ``egressd`` script (the venv's, or any on PATH).
It needs no running systemd: verify only loads unit files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from egressd.cli import EXIT_CONFIG
from egressd.config import DEFAULT_CONFIG_PATH, load_config
from egressd.daemon import configured_listeners

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "egressd.service"
SOCKET_UNIT = ROOT / "systemd" / "egressd.socket"
INSTALLED_BINARY = "/usr/local/bin/egressd"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_lines() -> list[str]:
    return UNIT.read_text().splitlines()


def directive(name: str) -> list[str]:
    prefix = name + "="
    return [line[len(prefix) :] for line in unit_lines() if line.startswith(prefix)]


def local_egressd() -> Path:
    beside_python = Path(sys.executable).parent / "egressd"
    if beside_python.exists():
        return beside_python
    found = shutil.which("egressd")
    if found is None:
        pytest.skip("no egressd script installed (pip install -e .)")
    return Path(found)


def systemd_verify(unit: Path) -> tuple[int, str]:
    """``systemd-analyze verify`` of ``unit``: its exit status and what it printed."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).strip()


def test_unit_verifies_clean(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    copy = tmp_path / "egressd.service"
    copy.write_text(text.replace(f"{INSTALLED_BINARY} ", f"{local_egressd()} "))
    assert systemd_verify(copy) == (0, "")


def test_socket_unit_verifies_clean_and_names_the_shipped_listeners(tmp_path: Path) -> None:
    """systemd/egressd.socket (socket activation) loads beside the service, and each of
    its ListenStream= is the address of a listener of the shipped egressd.toml, as
    egressd matches them (egressd.net.activation)."""
    service = UNIT.read_text().replace(f"{INSTALLED_BINARY} ", f"{local_egressd()} ")
    (tmp_path / "egressd.service").write_text(service)
    socket_unit = tmp_path / "egressd.socket"
    socket_unit.write_text(SOCKET_UNIT.read_text())
    assert systemd_verify(socket_unit) == (0, "")
    streams = [
        line.removeprefix("ListenStream=")
        for line in SOCKET_UNIT.read_text().splitlines()
        if line.startswith("ListenStream=")
    ]
    config = load_config(ROOT / "config" / "egressd.toml")
    addresses = {str(key[1]) for key in configured_listeners(config)}
    assert streams and set(streams) == addresses, (streams, addresses)


def test_unit_directives() -> None:
    assert directive("Type") == ["notify"]
    assert directive("NotifyAccess") == ["main"]
    assert directive("ExecReload") == [
        f"{INSTALLED_BINARY} check -q -c {DEFAULT_CONFIG_PATH}",
        "/bin/kill -HUP $MAINPID",
    ]
    assert directive("RestartPreventExitStatus") == [str(EXIT_CONFIG)]
    assert directive("ProcSubset") == ["pid"]
    assert directive("Documentation") == ["file:/usr/local/share/doc/egressd/README.md"]
    assert directive("WatchdogSec") == ["30"]
    assert directive("User") == ["egressd"]
    assert directive("RuntimeDirectory") == ["egressd"]
    assert directive("RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX"]
    assert directive("CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]


def test_exec_start_runs_the_installed_binary_on_the_default_config() -> None:
    """scripts/install links INSTALLED_BINARY and copies the config (see test_install.py)."""
    assert directive("ExecStart") == [f"{INSTALLED_BINARY} run -c {DEFAULT_CONFIG_PATH}"]


def test_exec_reload_refuses_a_bad_file_before_signalling(tmp_path: Path) -> None:
    """The first ExecReload line, as systemd runs it: non-zero (reload fails) on a bad
    file, silent and zero on a good one."""
    check_line = directive("ExecReload")[0]
    good = tmp_path / "good.toml"
    good.write_text('[source.a]\nsource_address = "127.0.0.2"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[source.a]\nsource_address = "127.0.0.300"\n')

    def run(config: Path) -> subprocess.CompletedProcess[str]:
        argv = check_line.replace(INSTALLED_BINARY, str(local_egressd()))
        argv = argv.replace(DEFAULT_CONFIG_PATH, str(config))
        return subprocess.run(argv.split(), capture_output=True, text=True, timeout=60)

    ok, refused = run(good), run(bad)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    assert refused.returncode == 1
    assert "source_address" in refused.stderr and str(bad) in refused.stderr
